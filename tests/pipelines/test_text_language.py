"""detect_language / language_reason / check_language: deterministic, bounded, right on short texts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cpt.pipelines.text import check_language, detect_language, language_reason

ENGLISH = "The patient was admitted with chest pain and discharged after three days of observation."
GERMAN = "Der Patient wurde mit Brustschmerzen aufgenommen und nach drei Tagen Beobachtung entlassen. "


@pytest.mark.parametrize(
    "text, lang",
    [
        (ENGLISH, "en"),
        # datatrove#365: a language filter that missed simple, short French
        ("Bonjour, comment allez-vous ?", "fr"),
        ("Je suis très content de vous voir.", "fr"),
        ("Il fait beau aujourd'hui.", "fr"),
        ("Wie geht es dir heute?", "de"),
        ("Das ist gut.", "de"),
        ("Hola, ¿cómo estás?", "es"),
        ("日本語のテキストです", "ja"),
    ],
)
def test_short_simple_sentences_get_their_language(text, lang):
    detected, prob = detect_language(text)

    assert detected == lang
    assert prob > 0.99


@pytest.mark.parametrize("text", ["", "   ", "12345 !!! 3.14 -- ##", "\x00\x01", "🙂🙂🙂"])
def test_text_without_letters_is_und(text):
    assert detect_language(text) == ("und", 0.0)


def test_the_answer_is_the_same_on_every_call():
    mixed = "Le code est dans le module. The code is in the module. Der Code ist im Modul."

    assert len({detect_language(mixed) for _ in range(20)}) == 1


def test_the_answer_does_not_depend_on_langdetects_global_seed():
    import langdetect

    mixed = "Le code est dans le module. The code is in the module. Der Code ist im Modul."
    before = detect_language(mixed)
    langdetect.DetectorFactory.seed = 12345  # what other code in the process may do
    try:
        assert detect_language(mixed) == before
    finally:
        langdetect.DetectorFactory.seed = None


def test_the_answer_is_the_same_in_a_fresh_process():
    mixed = "Le code est dans le module. The code is in the module. Der Code ist im Modul."
    code = f"from cpt.pipelines.text import detect_language; print(repr(detect_language({mixed!r})))"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == repr(detect_language(mixed))


def test_only_a_bounded_prefix_is_read():
    text = ENGLISH * 12 + GERMAN * 200  # ~1,000 English characters, then ~19,000 German ones

    assert detect_language(text)[0] == "en"
    assert detect_language(text, max_chars=len(text))[0] == "de"


def test_the_prefix_starts_at_the_first_letter():
    assert detect_language("1234567890 " * 200 + "Bonjour, comment allez-vous ?")[0] == "fr"


@pytest.mark.parametrize(
    "lang, prob, langs, min_prob, reason",
    [
        ("en", 0.99, ("en",), 0.65, None),
        ("fr", 0.99, ("en",), 0.65, "language"),
        ("und", 0.0, ("en",), 0.65, "language"),
        ("en", 0.50, ("en",), 0.65, "language_low_confidence"),
        ("en", 0.65, ("en",), 0.65, None),  # the threshold itself passes
        ("zh-cn", 0.99, ("zh",), 0.65, None),  # a region suffix matches its language
        ("de", 0.99, ("en", "de"), 0.65, None),
        ("de", 0.30, (), 0.65, "language_low_confidence"),  # no language list: any language, still a floor
    ],
)
def test_language_reason(lang, prob, langs, min_prob, reason):
    assert language_reason(lang, prob, langs=langs, min_prob=min_prob) == reason


def test_check_language_is_detect_then_reason():
    assert check_language(ENGLISH) is None
    assert check_language(GERMAN) == "language"
    assert check_language(GERMAN, langs=("de",)) is None
    assert check_language("1234") == "language"
