"""Real multilingual HTML pages: the message catalogues (.mo) that Debian packages install, rendered as web pages.

Each page is one language's translations of the same messages (apt, dpkg, bash), set in a full HTML document
with the chrome a crawl has: navigation, a cookie banner, a related-links list and a footer in English.
The English pages use the catalogues' msgids. Nothing is written by hand but the chrome.
"""

from __future__ import annotations

import gettext
import html
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
DOMAINS = ("apt", "dpkg", "bash")
#: Languages with all DOMAINS on Debian, by their ISO 639-1 code as language ID reports it.
LANGUAGES = {"de": "de", "fr": "fr", "es": "es", "it": "it", "pt_BR": "pt", "ru": "ru", "pl": "pl", "nl": "nl"}
LANGUAGES |= {"ja": "ja", "tr": "tr", "sv": "sv", "zh_CN": "zh"}


def available() -> bool:
    """Whether this machine has the catalogues (Debian's locale files)."""
    return all((LOCALE_DIR / locale / "LC_MESSAGES" / f"{d}.mo").is_file() for locale in LANGUAGES for d in DOMAINS)


def _prose(msgid: str) -> bool:
    """A sentence-like message: long enough, no option tables or format-only strings."""
    return len(msgid) >= 60 and not msgid.startswith((" ", "-", "%", "\t")) and msgid.count("%") <= 2


def translations(locale: str) -> list[tuple[str, str]]:
    """(English msgid, translation) pairs of prose messages, in a stable order."""
    pairs = []
    for domain in DOMAINS:
        with open(LOCALE_DIR / locale / "LC_MESSAGES" / f"{domain}.mo", "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        pairs += sorted((k, v) for k, v in catalog.items() if isinstance(k, str) and v and _prose(k))
    return pairs


def page(title: str, paragraphs: list[str]) -> str:
    """A full HTML document with crawl chrome around `paragraphs`."""
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
<style>body {{ font-family: sans-serif; }}</style></head>
<body><header><a href="/">Home</a> <a href="/docs">Docs</a> <a href="/blog">Blog</a></header>
<nav><ul><li><a href="/a">Getting started</a></li><li><a href="/b">Download</a></li></ul></nav>
<div class="cookie-banner">We use cookies to improve your experience. <a href="/privacy">Privacy policy</a></div>
<main><article><h1>{html.escape(title)}</h1>
{body}
</article></main>
<aside><h3>Related</h3><ul><li><a href="/x">Other page</a></li><li><a href="/y">Another page</a></li></ul></aside>
<footer>Copyright 2024 Example Org. All rights reserved.</footer></body></html>"""


def pages(per_language: int = 2, messages: int = 12) -> list[dict]:
    """{"id", "lang", "html"} records: `per_language` pages per language and as many English ones per language."""
    out, seen = [], set()
    for locale, lang in LANGUAGES.items():
        pairs = translations(locale)
        for i in range(per_language):
            chunk = pairs[i * messages : (i + 1) * messages]
            for code, texts in (("en", [k for k, _ in chunk]), (lang, [v for _, v in chunk])):
                paragraphs = [t.replace("\n", " ").strip() for t in texts]
                if tuple(paragraphs) in seen:  # the English side of two catalogues can be the same messages
                    continue
                seen.add(tuple(paragraphs))
                out.append({"id": f"{locale}-{i}-{code}", "lang": code, "html": page(paragraphs[0][:60], paragraphs)})
    return out
