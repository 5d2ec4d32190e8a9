"""Property tests: the text functions never raise on arbitrary input, mask_pii is idempotent, and
html_to_text never lets a tag from the markup through."""

from __future__ import annotations

import html as html_lib
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cpt.pipelines.text import (
    check_code,
    check_language,
    check_length,
    dedup_key,
    detect_language,
    html_to_text,
    mask_pii,
    normalize_for_dedup,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Any code point, lone surrogates included (they arrive from bytes decoded with errors="surrogateescape").
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=400)


@PROPERTY
@given(ANY_TEXT)
@example("A\ud800")  # a lone surrogate: fastText's binding raised TypeError on it
def test_no_text_function_raises_on_arbitrary_text(text):
    assert isinstance(html_to_text(text), str)
    for secrets in (True, False):
        masked, counts = mask_pii(text, secrets=secrets)
        assert isinstance(masked, str) and sum(counts.values()) >= 0
    lang, prob = detect_language(text)
    assert isinstance(lang, str) and 0.0 <= prob <= 1.0
    assert check_length(text) in (None, "too_short", "too_long")
    assert check_language(text) in (None, "language", "language_low_confidence")
    assert check_code(text, min_chars=0) in (None, "not_utf8", "syntax_error", "comment_ratio", "max_line_length")
    assert len(dedup_key(text)) == 64


@PROPERTY
@given(st.binary(max_size=400))
def test_check_code_never_raises_on_arbitrary_bytes(data):
    assert check_code(data, min_chars=0) in (None, "not_utf8", "syntax_error", "comment_ratio", "max_line_length")


# Fragments that sit near the edges of the PII patterns: digit runs and separators, addresses, keys.
PII_FRAGMENTS = st.sampled_from(
    [
        "4111 1111 1111 1111",
        "4111111111111111",
        "123-45-6789",
        "(555) 123-4567",
        "+44 20 7946 0958",
        "jane@example.com",
        "192.168.1.10",
        "10.0.0.0/8",
        "2001:db8::1",
        "fe80::1ff:fe23:4567:890a",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        'password = "hunter2"',
        "DB_PASSWORD=s3cr3t",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n",
        "-----END RSA PRIVATE KEY-----",
        "SSN",
        "token: ",
        "[SECRET]",
        "[EMAIL]",
        "x",
        "ext",
        "@",
        ".",
        ":",
        "::",
        "-",
        "/",
        " ",
        "\n",
        "'",
        '"',
    ]
)
PII_LIKE_TEXT = st.lists(
    st.one_of(PII_FRAGMENTS, st.text(alphabet="0123456789abcdefxAKIS.:-@/ ()+=\"'\n_[]", max_size=20)),
    max_size=12,
).map("".join)


@PROPERTY
@given(st.one_of(PII_LIKE_TEXT, ANY_TEXT))
def test_mask_pii_is_idempotent(text):
    once, _ = mask_pii(text)

    assert mask_pii(once) == (once, dict.fromkeys(("email", "phone", "ssn", "card", "ip", "secret"), 0))


TAGS = [
    "div",
    "p",
    "span",
    "b",
    "pre",
    "code",
    "ul",
    "li",
    "table",
    "td",
    "h1",
    "a",
    "nav",
    "script",
    "style",
    "textarea",
    "xmp",
    "title",
    "noscript",
    "iframe",
    "svg",
    "select",
    "template",
    "form",
]
# Text nodes without '<', '>' or '&': whatever '<' or '>' the output holds must then come from markup.
PLAIN = st.text(st.characters(exclude_characters="<>&", exclude_categories=("Cs",)), max_size=30)
# Quoted values hide markup from the tokenizer; an unquoted `x>y` would end the tag and leave "y" as text.
HOSTILE_VALUE = st.sampled_from(['"<b>x</b>"', "'<i>'", '"<script>"', '">"', "'a > b'", "plain"])


@st.composite
def attribute(draw):
    return f" {draw(st.sampled_from(['class', 'title', 'href', 'hidden', 'data-x']))}={draw(HOSTILE_VALUE)}"


@st.composite
def element(draw, depth=0):
    tag = draw(st.sampled_from(TAGS))
    attrs = "".join(draw(st.lists(attribute(), max_size=2)))
    leaves = st.one_of(PLAIN, st.just("<!-- <b>c</b> -->"))
    children = draw(st.lists(leaves if depth >= 2 else st.one_of(leaves, element(depth=depth + 1)), max_size=3))
    closing = draw(st.sampled_from([f"</{tag}>", ""]))  # unclosed tags too
    return f"<{tag}{attrs}>{''.join(children)}{closing}"


@PROPERTY
@given(st.lists(element(), min_size=1, max_size=4).map("".join))
def test_html_to_text_output_never_contains_markup(document):
    text = html_to_text(document)

    assert "<" not in text and ">" not in text


@PROPERTY
@given(st.text(st.characters(exclude_characters="&"), max_size=300))
def test_html_to_text_never_outputs_a_tag_from_arbitrary_markup(document):
    # Without '&' nothing is escaped, so a '<' before an ASCII letter in the output would be a leaked tag.
    assert re.search(r"</?[A-Za-z]", html_to_text(document)) is None


@PROPERTY
@given(PLAIN)
def test_escaped_markup_in_text_comes_out_as_text(text):
    assert html_to_text(f"<p>{html_lib.escape('<b>')}{html_lib.escape(text)}</p>").startswith("<b>")


@PROPERTY
@given(ANY_TEXT)
def test_normalize_for_dedup_is_idempotent(text):
    assert normalize_for_dedup(normalize_for_dedup(text)) == normalize_for_dedup(text)
