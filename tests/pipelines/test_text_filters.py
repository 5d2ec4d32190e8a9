"""check_length, check_code (ast.parse, never exec) and the exact-dedup key."""

from __future__ import annotations

import hashlib
import inspect
import textwrap

import pytest

from cpt.pipelines.text import check_code, check_length, dedup_key, normalize_for_dedup

# -- length ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kwargs, reason",
    [
        ("x" * 49, {}, "too_short"),
        ("x" * 50, {}, None),
        ("x" * 100_000, {}, None),
        ("x" * 100_001, {}, "too_long"),
        ("one two three", {"min_chars": 0, "min_words": 4}, "too_few_words"),
        ("one two three four", {"min_chars": 0, "min_words": 4}, None),
        ("", {"min_chars": 0}, None),
    ],
)
def test_check_length(text, kwargs, reason):
    assert check_length(text, **kwargs) == reason


# -- code -----------------------------------------------------------------------------------------------

GOOD = textwrap.dedent(
    '''
    import os


    def list_python_files(root):
        """Every .py file under root, sorted."""
        found = []
        for folder, _, files in os.walk(root):
            found.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
        return sorted(found)
    '''
)


def test_valid_python_is_kept():
    assert check_code(GOOD) is None
    assert check_code(GOOD.encode()) is None


def test_a_real_standard_library_module_is_kept():
    assert check_code(inspect.getsource(textwrap)) is None


def test_python2_print_statement_is_a_syntax_error():
    assert check_code('import sys\n\nfor name in sys.argv:\n    print "hello", name\n' * 2) == "syntax_error"


def test_truncated_file_is_a_syntax_error():
    assert check_code(GOOD[: GOOD.index("os.walk(") + 8]) == "syntax_error"


@pytest.mark.parametrize(
    "source",
    [
        "x = " + "-" * 100_000 + "1",  # MemoryError in the parser
        "x = a" + ".b" * 40_000,  # RecursionError while building the AST
        "x = " + "not " * 20_000 + "y",  # MemoryError
        "x = " + "(" * 1000 + "1" + ")" * 1000,  # "too many nested parentheses"
    ],
    ids=["unary", "attributes", "not", "parentheses"],
)
def test_deeply_nested_code_is_a_reason_not_a_crash(source):
    assert check_code(source, max_line_length=10**6, max_chars=10**6) == "syntax_error"


def test_nul_bytes_are_a_syntax_error():
    assert check_code(GOOD.replace("import os", "import\x00os")) == "syntax_error"


def test_code_is_parsed_never_executed(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.remove({str(marker)!r})\n"

    assert check_code(source) is None
    assert not marker.exists()


@pytest.mark.parametrize("source", [b"x = '\xff\xfe'\n" * 10, "x = '\udcff'\n" * 10], ids=["bytes", "surrogate"])
def test_undecodable_source_is_not_utf8(source):
    assert check_code(source) == "not_utf8"


def test_utf8_bytes_with_a_bom_are_decoded():
    assert check_code(b"\xef\xbb\xbf" + GOOD.encode()) is None


def test_size_bounds():
    assert check_code("x = 1\n") == "too_short"
    assert check_code(GOOD * 3, max_chars=len(GOOD)) == "too_long"


def test_a_line_longer_than_the_limit():
    assert check_code(GOOD + "data = [" + "1, " * 400 + "]\n") == "max_line_length"
    assert check_code(GOOD + "data = [" + "1, " * 400 + "]\n", max_line_length=2000) is None


def test_comment_ratio_counts_comment_lines_among_non_blank_lines():
    code = "x = 1\ny = 2\n\n\n"
    assert check_code("# note\n# note\n" + code, min_chars=0) is None  # 2 of 4 lines: 0.5 is allowed
    assert check_code("# note\n# note\n# note\n" + code, min_chars=0) == "comment_ratio"  # 3 of 5


# -- dedup ----------------------------------------------------------------------------------------------


def test_normalize_for_dedup_applies_nfkc_casefold_and_collapses_whitespace():
    assert normalize_for_dedup("  Ｈｅｌｌｏ\u00a0\tWORLD\n\nStraße ") == "hello world strasse"


def test_dedup_key_is_sha256_of_the_normalised_text():
    assert dedup_key("Hello   World") == hashlib.sha256(b"hello world").hexdigest()
    assert dedup_key("ＨＥＬＬＯ world") == dedup_key("hello\nworld")
    assert dedup_key("hello world") != dedup_key("hello, world")


def test_dedup_key_never_raises_on_lone_surrogates():
    assert len(dedup_key("bad \udcff")) == 64
