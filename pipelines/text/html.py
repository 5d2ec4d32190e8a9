"""HTML → plain text with resiliparse (lexbor): block structure as newlines, code blocks verbatim."""

from __future__ import annotations

import re

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import DOMNode, HTMLTree, NodeType

#: Elements whose content is never training text: page chrome, scripts, forms, and the raw-text
#: containers (xmp, plaintext, iframe, noembed, noframes, textarea, title, svg, math) whose "text" is literal
#: markup that would otherwise come out as `<b>`-looking tags (a `<title>` misplaced in the body included).
DROPPED_ELEMENTS = (
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "header",
    "footer",
    "aside",
    "form",
    '[role="navigation"]',
    "xmp",
    "plaintext",
    "iframe",
    "noembed",
    "noframes",
    "textarea",
    "title",
    "svg",
    "math",
)

#: A start tag with this many attributes is hostile: lexbor checks attribute names pairwise, so one tag
#: with 40,000 distinct attributes takes seconds and 200,000 take minutes.
MAX_ATTRIBUTES = 256

# One attribute the way the HTML tokenizer reads it: separators (whitespace or '/'), a name, and an optional
# quoted or unquoted value (a quote left open runs to the end, as in the tokenizer). Possessive quantifiers
# never backtrack, so matching is linear in the page.
_ATTRIBUTE = r"""(?:[\s/]*+[^\s/>][^\s/>=]*+(?:\s*+=\s*+(?:"[^"]*+"?+|'[^']*+'?+|[^\s>]*+))?+)"""
# Elements whose content the tokenizer reads as raw text, not as markup (not noscript: lexbor parses with
# scripting off, so its content is markup).
_RAW_TEXT = "script|style|xmp|iframe|noembed|noframes|textarea|title|plaintext"
# A whole start tag in one pass: group 1 is `<name` (group 2 the name of a raw-text element), group 3 the
# attributes from the MAX_ATTRIBUTES-th on when it has that many; a raw-text element's content is consumed
# up to its end tag, as the tokenizer does. Every tag is consumed where it starts, so text with many `<`
# (minified scripts) is read once, not once per `<` as an unanchored "tag with N attributes" search would
# (that search was 4/5 of html_to_text's time), and a `</script>` is never taken for attributes.
_START_TAG = re.compile(
    rf"(<(?:({_RAW_TEXT})(?=[\s/>])|[a-z])[^\s/>]*+){_ATTRIBUTE}{{0,{MAX_ATTRIBUTES - 1}}}+({_ATTRIBUTE}++)?+"
    r"(?(2)(?:>[^<]*+(?:<(?!/\2[\s/>])[^<]*+)*+)?+)",
    re.IGNORECASE,
)
# Unicode space separators that pages use for layout become ' ' (nbsp, by far the most common, separately:
# str.replace is several times faster than a regex there). C0 controls other than tab and newline, and DEL,
# are dropped: never text, and NUL breaks downstream tools.
_SPACES = re.compile(r"[\u1680\u2000-\u200a\u202f\u205f\u3000]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# The same, minus the HTML whitespace (\f, \r), removed before parsing too: `<\x00b>` is text to the parser,
# and would turn into a `<b>` tag in the output if the NUL were only dropped afterwards.
_CONTROLS_IN_MARKUP = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_BLANK_LINES = re.compile(r"\n{3,}")
# Subtrees whose `<code>` is never a block of its own (inside pre or p), or that hold no text.
_CODE_OUTSIDE_PRE_AND_P = "code:not(pre *):not(p *)"
_CODE_WALK_PRUNED = frozenset({"pre", "p", "script", "style", "template", "svg", "math"})


#: The extraction modes of html_to_text.
HTML_MODES = ("full", "main", "trafilatura")


def _strip_crowded_tags(html: str) -> str:
    """Drop the attributes of start tags that have MAX_ATTRIBUTES or more (keeps parsing linear)."""
    crowded = [m for m in _START_TAG.finditer(html) if m.group(3) is not None]
    if not crowded:
        return html
    parts, end = [], 0
    for m in crowded:
        parts += (html[end : m.start()], m.group(1), " ")
        end = m.end(3)
    parts.append(html[end:])
    return "".join(parts)


def _block_code_elements(body: DOMNode) -> list[DOMNode]:
    """The multi-line `<code>` elements of `body` that are neither inside `<pre>` nor inside `<p>`.

    One depth-first walk that does not descend into `pre`, `p` or `code` (own walk: iterating a resiliparse
    query result costs time proportional to its length per item, quadratic on pages with thousands of
    inline `<code>`).
    """
    found = []
    stack = [body]
    while stack:
        child = stack.pop().first_child
        while child is not None:
            if child.type == NodeType.ELEMENT:
                tag = child.tag
                if tag == "code":
                    if "\n" in child.text:
                        found.append(child)
                elif tag not in _CODE_WALK_PRUNED:
                    stack.append(child)
            child = child.next
    return found


def _mark_code_blocks(tree: HTMLTree) -> None:
    """Wrap multi-line `<code>` that stands as a block (not in `<pre>`, not inside a paragraph) in `<pre>`.

    Many sites style `<code>` as a block with CSS instead of using `<pre>`; the extractor would otherwise
    collapse its line breaks and indentation. A `<code>` nested in a block `<code>` ends up inside the new
    `<pre>`, so only the outermost one is wrapped.
    """
    body = tree.body
    # Counting the matches of a selector is cheap in lexbor (only reading them is not): most pages have no
    # `<code>` outside `pre`/`p`, and skip the walk.
    if body is None or not len(body.query_selector_all(_CODE_OUTSIDE_PRE_AND_P)):
        return
    for code in _block_code_elements(body):
        pre = tree.create_element("pre")
        code.parent.replace_child(pre, code)
        pre.append_child(code)


def _normalise_whitespace(text: str) -> str:
    """Unicode spaces → ' ', no control characters, no trailing spaces, at most one blank line in a row."""
    text = _CONTROLS.sub("", _SPACES.sub(" ", text.replace("\xa0", " ")))
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def html_to_text(html: str, mode: str = "full") -> str:
    """The readable text of an HTML page; never raises, returns "" when there is none.

    `mode` chooses how much of the page: "full" (everything but DROPPED_ELEMENTS), "main" (the main content:
    resiliparse's boilerplate removal drops menus, link lists, related-article blocks, comment sections and
    banners as well), or "trafilatura" (the trafilatura library, the `trafilatura` extra: slower, most precise).

    Keeps headings, paragraphs, list items (with bullets), table cells (tab-separated) and `pre`/code
    blocks with their line breaks and indentation; drops DROPPED_ELEMENTS; decodes entities. Block
    elements become newlines, whitespace inside a line is collapsed (except inside `pre`).
    """
    if not isinstance(html, str):
        raise TypeError(f"html_to_text expects str, got {type(html).__name__}: decode bytes first")
    if mode not in HTML_MODES:
        raise ValueError(f"html_to_text: unknown mode {mode!r}; choose one of {', '.join(HTML_MODES)}")
    if mode == "trafilatura":
        return _trafilatura_text(html)
    # Lone surrogates (text decoded with errors="surrogateescape") cannot be handed to the C parser.
    html = html.encode("utf-8", "replace").decode("utf-8")
    try:
        tree = HTMLTree.parse(_strip_crowded_tags(_CONTROLS_IN_MARKUP.sub("", html)))
        _mark_code_blocks(tree)
        text = extract_plain_text(
            tree,
            preserve_formatting=True,
            main_content=mode == "main",
            list_bullets=True,
            alt_texts=False,
            links=False,
            form_fields=False,
            noscript=False,
            skip_elements=list(DROPPED_ELEMENTS),
        )
    except Exception:  # the contract is "text or empty": a parser failure on one page means no text
        return ""
    return _normalise_whitespace(text)


def _trafilatura_text(html: str) -> str:
    """trafilatura's main text (tables and comments excluded as in its defaults, formatting kept)."""
    try:
        import trafilatura
    except ImportError as err:
        raise ImportError(
            "html mode 'trafilatura' needs the trafilatura extra: pip install 'cpt[trafilatura]'"
        ) from err
    html = html.encode("utf-8", "replace").decode("utf-8")
    try:
        text = trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=False)
    except Exception:  # same contract as the other modes: a failure on one page means no text
        return ""
    return _normalise_whitespace(text or "")


# A document starts like an HTML page: optional BOM, whitespace and comments, then a doctype or an <html>,
# <head> or <body> tag.
_HTML_START = re.compile(
    r"\A\ufeff?\s*(?:<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)\b", re.IGNORECASE | re.DOTALL
)
# Tags of the HTML vocabulary only: `a < b > c` or `List<String>` in code never match.
_HTML_TAG = re.compile(
    r"</?(?:a|abbr|article|b|blockquote|body|br|code|div|em|footer|form|h[1-6]|head|header|hr|html|i|img|input|"
    r"label|li|link|main|meta|nav|ol|p|pre|script|section|span|strong|style|table|td|th|tr|ul)\b[^<>]{0,2000}>",
    re.IGNORECASE,
)
#: sniff_html reads this many leading characters: enough for a page's head and first blocks.
SNIFF_CHARS = 20_000
#: Markup density: at least this many HTML tags in the sniffed part ...
SNIFF_MIN_TAGS = 10
#: ... that cover at least this share of its characters.
SNIFF_MIN_MARKUP_SHARE = 0.2


def sniff_html(text: str) -> str | None:
    """Why `text` is an HTML document ("doctype", "html_root", "markup_density"), or None for plain text or code.

    "doctype" / "html_root": it opens with `<!DOCTYPE html>` or an `<html>`/`<head>`/`<body>` tag (after
    whitespace and comments); "markup_density": its first SNIFF_CHARS characters hold SNIFF_MIN_TAGS or more
    HTML tags that make up at least SNIFF_MIN_MARKUP_SHARE of them (a fragment without a root).
    """
    head = text[:SNIFF_CHARS]
    start = _HTML_START.match(head)
    if start is not None:
        return "doctype" if start.group(1).lower().startswith("!") else "html_root"
    tags = _HTML_TAG.findall(head)
    if len(tags) >= SNIFF_MIN_TAGS and sum(map(len, tags)) >= SNIFF_MIN_MARKUP_SHARE * len(head):
        return "markup_density"
    return None
