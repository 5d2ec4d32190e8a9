"""detect_language / language_reason / check_language: deterministic, bounded, right on short texts and on
the 30-language lingua sentences (tests/pipelines/data/language)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cpt.pipelines.text import check_language, detect_language, language_reason
from cpt.pipelines.text import language as language_module
from cpt.pipelines.text.language import BACKENDS, sample_text

LINGUA = Path(__file__).parent / "data" / "language" / "lingua_sentences.json"

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
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_simple_sentences_get_their_language(text, lang, backend):
    detected, prob = detect_language(text, backend=backend)

    assert detected == lang
    # langdetect is near-certain on these; fastText's softmax is flatter, but well above the cascade threshold
    assert prob > (0.99 if backend == "langdetect" else 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text", ["", "   ", "12345 !!! 3.14 -- ##", "\x00\x01", "🙂🙂🙂"])
def test_text_without_letters_is_und(text, backend):
    assert detect_language(text, backend=backend) == ("und", 0.0)


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
    # Below the cascade threshold (fastText 0.53 here), so both the fastText and the langdetect path are run.
    texts = [mixed, ENGLISH, "日本語のテキストです", GERMAN * 40]
    code = (
        "from cpt.pipelines.text import detect_language; "
        f"print(repr([detect_language(t, backend=b) for t in {texts!r} for b in {BACKENDS!r}]))"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.strip() == repr([detect_language(t, backend=b) for t in texts for b in BACKENDS])


def test_a_long_document_is_read_at_its_start_middle_and_end():
    text = ENGLISH * 12 + GERMAN * 200  # ~1,000 English characters, then ~19,000 German ones

    sample = sample_text(text, max_chars=1000)

    assert len(sample) <= 1000
    assert sample.startswith(text[:300]) and text[len(text) // 2 : len(text) // 2 + 100] in sample
    assert sample.endswith(text[-300:])
    assert detect_language(text)[0] == "de"  # two of three windows are German
    assert sample_text(ENGLISH, max_chars=1000) == ENGLISH  # a short text is read whole


# The finding: a Chinese page full of Latin shell commands was read from a 1,000-character prefix.
SHELL = (
    "$ sudo apt-get update && sudo apt-get install -y build-essential git curl\n"
    "$ git clone https://github.com/example/project.git && cd project\n"
    "$ python3 -m venv .venv && source .venv/bin/activate\n"
    "$ pip install -r requirements.txt\n"
    "$ export CUDA_VISIBLE_DEVICES=0,1 && make test\n"
)
CHINESE = (
    "本教程介绍如何在服务器上安装和配置这个项目。首先需要更新系统的软件包列表，然后安装编译工具和版本控制软件。"
    "安装完成以后，请克隆代码仓库并创建一个独立的虚拟环境，这样不会影响系统自带的其他程序。"
    "如果运行测试时出现错误，请检查显卡驱动的版本是否正确，并确认环境变量已经设置好。\n"
)


def test_a_chinese_page_that_opens_with_shell_commands_is_chinese():
    page = SHELL * 4 + CHINESE + SHELL + CHINESE * 3 + SHELL + CHINESE * 2

    assert detect_language(page[:1000], backend="langdetect")[0] != "zh-cn"  # what the prefix alone said
    assert detect_language(page)[0] == "zh"
    assert check_language(page, langs=("zh-cn",)) is None


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


def test_a_plain_code_matches_a_requested_region_and_a_region_matches_its_language():
    assert language_reason("zh", 0.99, langs=("zh-cn",)) is None  # fastText names no region
    assert language_reason("zh-tw", 0.99, langs=("zh-cn",)) == "language"  # langdetect's regions differ
    assert language_reason("zh-tw", 0.99, langs=("zh",)) is None


def test_an_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'fasttex' is not one of cascade, fasttext, langdetect"):
        detect_language(ENGLISH, backend="fasttex")


def test_a_missing_fasttext_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(language_module, "FASTTEXT_MODEL", ("no-such-wheel", "lid.176.ftz"))
    language_module._fasttext.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install 'cpt\\[pipeline\\]'.*lang_backend: langdetect"):
            detect_language(ENGLISH, backend="fasttext")
        assert detect_language(ENGLISH, backend="langdetect")[0] == "en"
    finally:
        language_module._fasttext.cache_clear()


def test_the_fasttext_model_comes_from_the_installed_wheel_and_needs_no_download():
    path = language_module.fasttext_model_path()

    assert path.name == "lid.176.ftz" and "site-packages" in path.parts and path.stat().st_size > 900_000


def lingua_sentences() -> list[tuple[str, str]]:
    data = json.loads(LINGUA.read_text(encoding="utf-8"))
    return [(lang, sentence) for lang, sentences in data["sentences"].items() for sentence in sentences]


def test_the_cascade_is_accurate_on_thirty_languages():
    """1,500 real sentences of 30 languages (lingua-py's test data): tests/bench/bench_language.py compares the
    backends side by side (langdetect 0.981, fastText 0.971, cascade 0.986 when measured); here, floors."""
    items = lingua_sentences()
    assert len({lang for lang, _ in items}) == 30

    wrong = Counter(lang for lang, s in items if detect_language(s)[0].split("-")[0] != lang)
    fasttext_right = sum(detect_language(s, backend="fasttext")[0] == lang for lang, s in items)

    assert 1 - sum(wrong.values()) / len(items) >= 0.98, wrong
    assert max(wrong.values(), default=0) <= 10, wrong  # no language below 80%
    assert fasttext_right / len(items) >= 0.95


def test_the_filter_lets_fasttext_decide_alone_only_above_its_own_floor():
    assert detect_language(ENGLISH, backend="fasttext")[1] < 0.99  # fastText alone would fail a 0.99 floor

    assert check_language(ENGLISH, min_prob=0.99) is None  # so langdetect, near-certain, decides
    assert check_language(ENGLISH, min_prob=0.99, backend="fasttext") == "language_low_confidence"
