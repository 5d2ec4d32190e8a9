"""html_to_text: real pydoc pages, the keep/drop list, code blocks, entities, and hostile input."""

from __future__ import annotations

import json
import pydoc

import pytest

from cpt.pipelines.text import html_to_text, sniff_html


def pydoc_page(module) -> str:
    return pydoc.html.page(pydoc.describe(module), pydoc.html.document(module))


def test_pydoc_page_keeps_docstring_lines_and_doctest_indentation():
    lines = html_to_text(pydoc_page(json)).split("\n")

    assert lines[0] == f"json (version {json.__version__})\t\tindex"
    assert "Encoding basic Python object hierarchies::" in lines
    # pydoc indents with &nbsp;: it comes out as plain spaces, so the doctest keeps its shape.
    assert "    >>> import json" in lines
    assert "    >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])" in lines


def test_pydoc_page_has_no_markup_or_entities_left():
    text = html_to_text(pydoc_page(json))

    assert "<a href" not in text and "&nbsp;" not in text and "&lt;" not in text and "\xa0" not in text
    assert "JSON (JavaScript Object Notation) <https://json.org> is a subset of" in text  # &lt;...&gt; decoded


def test_page_chrome_scripts_and_forms_are_dropped():
    html = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
    <body><header>Site header</header><nav><a href="/">Home</a> | <a href="/blog">Blog</a></nav>
    <div role="navigation">Breadcrumbs</div>
    <main><h1>Article</h1><p>Body text.</p></main>
    <aside>Related posts</aside><form><label>Search</label><input value="q"><button>Go</button></form>
    <template><p>Template</p></template><noscript>Enable JavaScript</noscript>
    <footer>Copyright</footer></body></html>"""

    assert html_to_text(html) == "Article\n\nBody text."


def test_headings_paragraphs_lists_and_table_cells_are_kept_as_lines():
    html = (
        "<h2>Dosage</h2><p>Take with food.</p><ul><li>Morning</li><li>Evening</li></ul>"
        "<ol><li>First</li><li>Second</li></ol>"
        "<table><tr><th>Drug</th><th>mg</th></tr><tr><td>Aspirin</td><td>81</td></tr></table>"
    )

    assert html_to_text(html) == (
        "Dosage\n\nTake with food.\n\n  \u2022 Morning\n  \u2022 Evening\n  1. First\n  2. Second\n"
        "Drug\t\tmg\nAspirin\t\t81"
    )


def test_pre_code_block_keeps_line_breaks_indentation_and_comparison_operators():
    html = (
        "<p>Example:</p><pre><code class='python'>def f(a, b):\n"
        "    if a &lt; b and b &gt; 0:\n        return <span class='n'>a</span>\n    return b\n</code></pre>"
    )

    assert html_to_text(html) == "Example:\n\ndef f(a, b):\n    if a < b and b > 0:\n        return a\n    return b"


def test_multiline_code_element_outside_pre_is_a_code_block():
    assert html_to_text("<div><code>for x in xs:\n    print(x)</code></div>") == "for x in xs:\n    print(x)"


def test_code_inside_a_paragraph_stays_inline():
    assert html_to_text("<p>Call <code>f(\n  x)</code> once.</p>") == "Call f( x) once."


def test_entities_are_decoded():
    html = "<p>Fish &amp; chips &lt;b&gt; &quot;q&quot; &#39;s&#39; caf&eacute; &#x1F600; &euro;5</p>"

    assert html_to_text(html) == "Fish & chips <b> \"q\" 's' caf\u00e9 \U0001f600 \u20ac5"


def test_whitespace_inside_lines_is_collapsed_and_unicode_spaces_become_spaces():
    html = "<p>  many    spaces\n\tand\nnewlines  </p><p>nbsp&nbsp;&nbsp;em\u2003thin\u2009end   </p>"

    assert html_to_text(html) == "many spaces and newlines\n\nnbsp  em thin end"


def test_runs_of_blank_lines_collapse_to_one():
    assert html_to_text("<p>a<br><br><br><br>b</p><pre>x\n\n\n\ny</pre>") == "a\n\nb\n\nx\n\ny"


def test_raw_text_elements_do_not_leak_their_markup():
    html = (
        "<p>kept</p><xmp><b>xmp</b></xmp><textarea><i>t</i></textarea><noembed><b>n</b></noembed>"
        "<iframe><b>i</b></iframe><svg><![CDATA[<b>c</b>]]></svg><math><mi><![CDATA[<b>m</b>]]></mi></math>"
        "<plaintext><b>everything after plaintext is raw</b>"
    )

    assert html_to_text(html) == "kept"


def test_unclosed_and_misnested_tags_still_give_the_text():
    assert html_to_text("<div><p>one<p>two<li>three</b></i><span>four") == "one\n\ntwo\n\n  \u2022 threefour"


def test_comments_and_attributes_are_not_text():
    assert html_to_text('<p title="<b>x</b>">a<!-- <b>hidden</b> -->b</p>') == "ab"


@pytest.mark.parametrize("html", ["", "   \n\t ", "<html><body></body></html>", "<script>only()</script>"])
def test_documents_without_text_give_an_empty_string(html):
    assert html_to_text(html) == ""


def test_bytes_are_a_type_error_that_says_to_decode():
    with pytest.raises(TypeError, match="decode bytes first"):
        html_to_text(b"<p>x</p>")


def test_plain_text_without_tags_passes_through():
    assert html_to_text("if a < b and c > d: pass") == "if a < b and c > d: pass"


def test_nul_and_control_characters_are_removed():
    assert html_to_text("<p>a\x00b\x01c</p>" + "\x00" * 100_000 + "<p>d\x7fe</p>") == "abc\n\nde"


def test_lone_surrogates_do_not_raise():
    assert html_to_text("<p>bad \udcff byte</p>") == "bad ? byte"


@pytest.mark.timeout(60)
def test_200000_nested_divs_give_the_text():
    assert html_to_text("<div>" * 200_000 + "deep" + "</div>" * 200_000) == "deep"


@pytest.mark.timeout(60)
def test_multi_megabyte_single_line_is_kept_whole():
    line = "word " * 1_000_000

    assert html_to_text(f"<p>{line}</p>") == line.strip()


@pytest.mark.timeout(60)
def test_tag_with_200000_attributes_parses_in_linear_time():
    # lexbor compares attribute names pairwise: unguarded, this one tag takes minutes.
    attributes = " ".join(f'a{i}=">"' for i in range(200_000))

    assert html_to_text(f"<p {attributes}>text</p><p>after</p>") == "text\n\nafter"


@pytest.mark.timeout(60)
def test_minified_script_full_of_comparisons_is_read_in_linear_time():
    # 700 KB of `a<b` without spaces or `>`: the guard once tried every `<` as a tag start (3.5 KB took 5 s).
    script = "for(i=0;i<n.length;i++){x=y<z?a:b}" * 20_000

    assert html_to_text(f"<script>{script}</script><p>after</p>") == "after"


def test_script_end_tag_is_never_taken_for_attributes():
    # `<d) x = 1; ...` looks like a tag with hundreds of attributes; the tokenizer reads script content as raw
    # text, so the guard must not strip up to the `>` of `</script>` (the page's text was lost).
    script = "if (a < b.length && c <d) x = 1; " * 300

    assert html_to_text(f"<script>{script}</script><p>after</p>") == "after"


@pytest.mark.timeout(60)
def test_crowded_tag_inside_noscript_is_stripped_too():
    # lexbor parses with scripting off: noscript content is markup, so the guard must read it as markup.
    attributes = " ".join(f"a{i}" for i in range(200_000))

    assert html_to_text(f"<noscript><p {attributes}>x</p></noscript><p>after</p>").endswith("after")


def test_crowded_raw_text_start_tag_is_stripped_and_its_content_kept_out():
    attributes = " ".join(f"a{i}" for i in range(300))

    assert html_to_text(f"<SCRIPT {attributes}>x<y</SCRIPT><p>after</p>") == "after"


def test_crowded_tag_guard_keeps_ordinary_attributes():
    assert html_to_text('<nav class="a" id="b" data-x=">">menu</nav><p>body</p>') == "body"


@pytest.mark.timeout(60)
def test_thousands_of_code_elements_are_marked_in_one_walk():
    # Documentation pages have thousands of <code>: reading them back from a selector query is quadratic.
    html = "<ul>" + "<li><code>a\nb</code> and <code>c</code></li>" * 5000 + "</ul>" + "<p><code>x</code></p>" * 5000

    lines = html_to_text(html).split("\n")

    assert lines[:4] == ["  \u2022 a", "b", "    and c", "  \u2022 a"]
    assert lines.count("b") == 5000 and lines.count("x") == 5000


ARTICLE_PAGE = """<!DOCTYPE html><html><head><title>T</title></head><body>
<div class="menu"><a href="/">Home</a> <a href="/news">News</a> <a href="/sport">Sport</a> <a href="/tv">TV</a></div>
<div class="cookie">We use cookies. <a href="/p">Accept</a> <a href="/q">Settings</a></div>
<div class="content"><h1>Closures in Rust</h1>
<p>A closure is an anonymous function that can capture values from the scope in which it is defined, which makes
it a convenient way to pass behaviour to iterator adapters and threads without writing a named function.</p>
<pre><code>let add_one = |x: u32| -> u32 {
    x + 1
};</code></pre>
<p>The compiler infers the parameter and return types of most closures from how they are used, so annotations are
optional in the common case and required only where the use does not pin the types down.</p></div>
<div class="related"><a href="/1">Ten things about Go</a><br><a href="/2">Why C is fast</a><br>
<a href="/3">Kotlin tips</a><br><a href="/4">More Rust</a></div>
</body></html>"""


def test_main_mode_drops_menus_banners_and_link_lists_and_keeps_headings_prose_and_code():
    text = html_to_text(ARTICLE_PAGE, mode="main")

    assert "Closures in Rust" in text.split("\n")
    assert "let add_one = |x: u32| -> u32 {\n    x + 1\n};" in text
    assert "anonymous function" in text and "compiler infers" in text
    for chrome in ("Home", "cookies", "Ten things about Go", "Kotlin tips"):
        assert chrome not in text
    assert "Ten things about Go" in html_to_text(ARTICLE_PAGE, mode="full")


def test_main_mode_keeps_a_pydoc_page_whole():
    assert (
        html_to_text(pydoc_page(json), mode="main").split("\n")[:1] == html_to_text(pydoc_page(json)).split("\n")[:1]
    )
    assert "    >>> import json" in html_to_text(pydoc_page(json), mode="main").split("\n")


def test_trafilatura_mode_uses_the_library():
    pytest.importorskip("trafilatura", reason="the trafilatura extra is not installed")

    text = html_to_text(ARTICLE_PAGE, mode="trafilatura")

    assert "anonymous function" in text and "Kotlin tips" not in text


def test_an_unknown_mode_is_a_value_error_naming_the_modes():
    with pytest.raises(ValueError, match="full, main, trafilatura"):
        html_to_text("<p>x</p>", mode="readability")


@pytest.mark.parametrize(
    "text, why",
    [
        ("<!DOCTYPE html><html><body><p>x</p></body></html>", "doctype"),
        ("\ufeff  <!-- saved --> <!doctype HTML>\n<p>x", "doctype"),
        ("<html lang='en'><p>x</p></html>", "html_root"),
        ("\n<body><p>x</p>", "html_root"),
        ("<div><p>one</p><p>two</p></div>" * 5, "markup_density"),
        ("if a < b and c > d: pass", None),
        ("List<String> xs = new ArrayList<>(); Map<K, V> m;" * 20, None),
        ("The <p> tag starts a paragraph and <br> breaks a line; write <b>bold</b> for bold. " * 3, None),
        (open(__file__, encoding="utf-8").read(), None),  # Python source that quotes HTML
    ],
)
def test_sniff_html_finds_documents_and_fragments_but_not_text_or_code(text, why):
    assert sniff_html(text) == why


def test_main_mode_is_more_precise_than_full_on_committed_benchmark_pages():
    # Six pages of scrapinghub's article-extraction-benchmark (MIT), scored as the benchmark does.
    from tests.bench.bench_extract import FIXTURE_DIR, load_pages, score

    pages = load_pages(FIXTURE_DIR)
    main = score(pages, [html_to_text(html, mode="main") for _, html, _ in pages])
    full = score(pages, [html_to_text(html, mode="full") for _, html, _ in pages])

    assert main["precision"] > full["precision"] + 0.1
    assert main["f1"] > full["f1"] and main["f1"] > 0.85
