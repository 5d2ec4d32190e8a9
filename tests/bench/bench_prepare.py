"""`cpt prepare` at corpus scale: per-step profile of every preset, cpt side by side with datatrove, 1 vs 2 workers.

`python -m tests.bench prepare` (`make bench ARGS=prepare`). All figures come from one run on one machine:

1. Per-step CPU seconds of each preset's text functions on documentation pages, crawl-like pages (menus of
   many links, inline scripts), plain text and Python files: where the time goes.
2. On ONE JSONL file of real documentation HTML pages (the system's HTML docs, e.g. Node.js's API pages with
   thousands of inline <code>, IDLE's Sphinx help, then pydoc pages; repeated with a revision note per copy
   up to DOCS_MB): a bare Python loop of the web preset's
   text functions, `cpt prepare --preset web` (language on, perplexity off, and the steps neither baseline has,
   quality and near_dedup, skipped) with 1 and 2 workers, and
   datatrove (Trafilatura + PII + length, one worker; the `bench` extra installs it). Each contender runs
   in its own process; wall seconds, CPU seconds (the process and its children) and MB/s of input, and the
   ratios. datatrove has no language step here: its LanguageFilter downloads a fastText model at run time.
3. CPT_BENCH_MEMORY=0.5,2 (GB): a single-file corpus of that size built from real local text (pydoc topics
   and module docs, each copy edited), through `--preset text --workers 2`: peak RSS of the launcher and
   of each worker process, and the bytes the shuffles spilled to disk. CPT_BENCH_SHUFFLE=files,beam adds a run
   with Beam's in-memory GroupByKey (`shuffle: beam`) at each size, the baseline. Needs about 2.5x the largest
   size free under the temp folder; deleted after.
CPT_BENCH_DOCS_MB sets the size of the documentation file (default DOCS_MB, 100), CPT_BENCH_DASK=1 adds a local Dask
cluster of 2 workers to part 2.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

from cpt.pipelines.config import resolve_config
from cpt.shared.corpus import pydoc_page, stdlib_module_names

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A page over this is skipped when the corpus is built: e.g. Node.js's all.html repeats every other page.
MAX_PAGE_BYTES = 2_000_000
# Size of part 2's documentation file: large enough that 2 worker processes' fixed start-up (each imports
# Beam's SDK harness and sets the steps up, ~2.5 CPU s) is small next to the work, small enough that the
# whole benchmark stays near 5 minutes on an idle 2-core machine (datatrove takes most of it). 200 MB since
# the machines got ~3x faster per core: at 100 MB the start-up was again ~13% of a 2-worker run's CPU.
DOCS_MB = 200

# ---- corpora, all from text this machine has ---------------------------------------------------------------


def doc_html_pages() -> list[tuple[str, str]]:
    """(name, HTML) of real documentation pages: the system's HTML docs and IDLE's Sphinx help, then pydoc pages."""
    roots = ["/usr/share/doc", os.path.join(sys.prefix, "share", "doc")]
    paths = sorted({p for root in roots for p in glob.glob(os.path.join(root, "**", "*.html"), recursive=True)})
    paths.append(str(STDLIB / "idlelib" / "help.html"))
    pages, seen = [], set()
    for path in paths:
        if os.path.isfile(path) and os.path.getsize(path) <= MAX_PAGE_BYTES:
            html = Path(path).read_text(encoding="utf-8", errors="replace")
            if html not in seen:  # packages install the same page under several names
                seen.add(html)
                pages.append((path, html))
    return pages


def pydoc_pages() -> list[tuple[str, str]]:
    return [(f"pydoc/{name}", page) for name in stdlib_module_names() if (page := pydoc_page(name))]


def revised(html: str, copy: int) -> str:
    """The page with a revision note as its body's first paragraph (copy 0: the page as it is)."""
    if copy == 0:
        return html
    # In the first paragraph, which main-content extraction keeps (a paragraph of its own may be dropped).
    at = html.find(">", max(html.find("<p>"), html.find("<p "), html.find("<body"), 0)) + 1
    return html[:at] + f"(Revision {copy} of this page, republished under another address.) " + html[at:]


def write_docs_jsonl(path: Path, target_bytes: int) -> tuple[int, int, int]:
    """One JSONL file of documentation pages, about `target_bytes` of HTML; returns (pages, copies, bytes of file).

    The machine's pages come to ~25 MB; past that they repeat, each copy with a revision note in its body (so
    exact dedup keeps it), as a crawl meets the same documentation under several addresses.
    """
    pages, copy, written = 0, 0, 0
    source = [page for get in (doc_html_pages, pydoc_pages) for page in get()]
    with path.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            for name, html in source:
                if written >= target_bytes:
                    break
                text = revised(html, copy)
                f.write(json.dumps({"id": f"{name}#{copy}" if copy else name, "text": text}) + "\n")
                written += len(text.encode())
                pages += 1
            copy += 1
    return pages, copy, path.stat().st_size


def plain_texts() -> list[str]:
    """Real English prose: the help topics and the plain-text pydoc of stdlib modules."""
    import pydoc
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items())]
    for name in stdlib_module_names()[:80]:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                module = __import__(name)
                texts.append(pydoc.render_doc(module, renderer=pydoc.plaintext)[:50_000])
            except Exception:  # noqa: BLE001  (platform-specific modules fail to import)
                continue
    return texts


def crawl_like_pages(texts: list[str], n: int) -> list[str]:
    """Pages shaped like a crawl: a menu of many links, inline scripts and a footer around real prose."""
    names = stdlib_module_names()
    pages = []
    for i in range(n):
        links = "".join(f'<li><a href="/{m}/{i}.html" class="nav">{m}</a></li>' for m in names[(i % 50) :][:150])
        script = (
            "<script>window.dataLayer=window.dataLayer||[];function gtag(){dataLayer.push(arguments)}"
            f"gtag('js',new Date());gtag('config','UA-{i:06d}');var items={json.dumps(names[:40])};</script>"
        )
        body = "".join(f"<p>{para}</p>" for para in texts[i % len(texts)].split("\n\n")[:40])
        pages.append(
            f"<html><head><title>Page {i}</title>{script}</head><body><nav><ul>{links}</ul></nav>{script}"
            f"<main><article><h1>Page {i}</h1>{body}</article></main><footer><ul>{links}</ul></footer></body></html>"
        )
    return pages


def code_texts(n: int) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))[:n]]


# ---- 1. per-step profile -----------------------------------------------------------------------------------


def step_functions(preset: str, html: bool):
    """(step, fn(text) -> (text, reject reason or None)) for a preset's text steps, with the preset's thresholds."""
    from cpt.pipelines import text as t

    cfg = resolve_config(preset, None, {"inputs": ["x"], "output": "x"})
    f, c = cfg.filters, cfg.code

    def length(s):
        return s, t.check_length(s, min_chars=f.min_chars, max_chars=f.max_chars, min_words=f.min_words)

    def language(s):
        lang, prob = t.detect_language(s, max_chars=f.lang_max_chars)
        return s, t.language_reason(lang, prob, langs=f.langs, min_prob=f.min_lang_prob)

    def code(s):
        limits = dict(min_chars=f.min_chars, max_chars=f.max_chars, max_line_length=c.max_line_length)
        return s, t.check_code(s, max_comment_ratio=c.max_comment_ratio, **limits)

    def dedup(s):
        t.dedup_key(s)  # the per-document part of exact dedup; the grouping is the pipeline's
        return s, None

    steps = {
        "html": lambda s: (t.html_to_text(s, mode=cfg.html.mode), None),  # the preset's mode ("main" for web)
        "pii": lambda s: (t.mask_pii(s, secrets=cfg.pii.secrets)[0], None),
        "length": length,
        "language": language,
        "code": code,
        "dedup": dedup,
    }
    return [(name, steps[name]) for name in cfg.active_steps() if name in steps and (html or name != "html")]


def bare_loop(preset: str, docs: list[str], html: bool = True) -> dict[str, float]:
    """CPU seconds per step of a plain Python loop over the preset's text functions (rejected docs stop early)."""
    seconds = dict.fromkeys([name for name, _ in step_functions(preset, html)], 0.0)
    functions = step_functions(preset, html)
    for text in docs:
        for name, fn in functions:
            start = time.process_time()
            text, rejected = fn(text)
            seconds[name] += time.process_time() - start
            if rejected:
                break
    return seconds


def profile_presets(docs: list[str], crawl: list[str], plain: list[str], code: list[str]) -> None:
    print("1. CPU seconds per step (bare loop of the text functions; rejected documents skip later steps)")
    rows = [
        ("web", "documentation pages", docs, True),
        ("web", "crawl-like pages", crawl, True),
        ("text", "plain text", plain, False),
        ("code", "stdlib .py files", code, False),
    ]
    for preset, name, texts, html in rows:
        seconds = bare_loop(preset, texts, html)
        mb = sum(len(s.encode()) for s in texts) / 1e6
        total = sum(seconds.values())
        parts = "  ".join(f"{step} {s:.2f}" for step, s in seconds.items())
        print(f"  {preset:<4} {name:<20} {len(texts):>5} docs {mb:>6.2f} MB  {mb / total:>5.2f} MB/cpu-s | {parts}")


# ---- 2. one documentation file, side by side -------------------------------------------------------------------


# Web preset steps that neither baseline runs (the bare loop has no grouping, datatrove here no quality or MinHash
# step): skipped, so that all contenders do the same work; the README gives the whole preset's figures too.
NOT_IN_BASELINES = ("quality", "near_dedup")


def run_cpt(path: str, out: str, workers: int, dask: bool = False) -> dict:
    from cpt.pipelines.run import prepare

    overrides = {"inputs": [path], "output": out, "records_are_html": True, "skip": list(NOT_IN_BASELINES)}
    cfg = resolve_config("web", None, overrides)
    if not dask:
        return prepare(cfg, [], quiet=True, workers=workers)["counts"]
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        args = ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"]
        return prepare(cfg, [*args, "--dask_client_address", cluster.scheduler_address], quiet=True)["counts"]


def run_datatrove(path: str, out: str) -> dict:
    """Trafilatura + PII + the web preset's length bounds, one task, one worker, written as JSONL."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    f = resolve_config("web", None, {"inputs": ["x"], "output": "x"}).filters
    folder, name = os.path.split(path)
    pipeline = [
        JsonlReader(folder, glob_pattern=name),
        # A generous timeout: the default 1 s drops the long pages unextracted, which would flatter it.
        Trafilatura(favour_precision=True, timeout=120),
        PIIFormatter(),
        LambdaFilter(lambda doc: f.min_chars <= len(doc.text) <= f.max_chars and len(doc.text.split()) >= f.min_words),
        JsonlWriter(out),
    ]
    LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=f"{out}-logs").run()
    return {}


def run_bare(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    bare_loop("web", docs)
    return {}


def contender_main(name: str, path: str, out: str, workers: int) -> None:
    """Run one contender in this process and print {wall, cpu, counts} as the last line."""
    import apache_beam  # noqa: F401  (imports are not the contenders' work: paid before the clock starts)

    import cpt.pipelines.run  # noqa: F401
    import cpt.pipelines.text  # noqa: F401

    if name == "datatrove":
        import datatrove.pipeline.extractors  # noqa: F401
    runs = {
        "bare": lambda: run_bare(path),
        "cpt": lambda: run_cpt(path, out, workers),
        "cpt-dask": lambda: run_cpt(path, out, workers, dask=True),
        "datatrove": lambda: run_datatrove(path, out),
    }
    before, start = os.times(), time.perf_counter()
    counts = runs[name]()
    wall, after = time.perf_counter() - start, os.times()
    cpu = sum(getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user", "children_system"))
    print(json.dumps({"wall": wall, "cpu": cpu, "counts": counts}))


def contender(name: str, path: Path, out: Path, workers: int = 1) -> dict:
    cmd = [sys.executable, "-m", "tests.bench.bench_prepare", name, str(path), str(out), str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side(base: Path) -> None:
    target = int(float(os.environ.get("CPT_BENCH_DOCS_MB", str(DOCS_MB))) * 1e6)
    path = base / "docs.jsonl"
    pages, copies, size = write_docs_jsonl(path, target)
    mb = size / 1e6
    print(
        f"2. one JSONL file of {pages} documentation pages ({mb:.1f} MB: {copies} pass(es) over the machine's "
        "pages, each copy edited); each contender in its own process"
    )
    runs = [("bare loop (web text functions)", "bare", 1), ("datatrove (1 worker)", "datatrove", 1)]
    runs += [("cpt --preset web --workers 1", "cpt", 1), ("cpt --preset web --workers 2", "cpt", 2)]
    if os.environ.get("CPT_BENCH_DASK") == "1":
        runs.append(("cpt on a local Dask cluster (2 workers)", "cpt-dask", 2))
    results = {}
    print(f"  {'':<40} {'wall s':>7} {'MB/s':>6} {'cpu s':>7} {'MB/cpu-s':>8}")
    for label, name, workers in runs:
        r = contender(name, path, base / f"out-{name}-{workers}", workers)
        results[label] = r
        print(
            f"  {label:<40} {r['wall']:>7.1f} {mb / r['wall']:>6.2f} {r['cpu']:>7.1f} {mb / r['cpu']:>8.2f}",
            flush=True,
        )
        if r["counts"]:
            print(f"  {'':<40} counts {r['counts']}")
    one, two = results["cpt --preset web --workers 1"], results["cpt --preset web --workers 2"]
    dt, bare = results["datatrove (1 worker)"], results["bare loop (web text functions)"]
    print(f"  cpt 1 worker vs datatrove: {dt['wall'] / one['wall']:.2f}x wall, {dt['cpu'] / one['cpu']:.2f}x cpu")
    print(
        f"  cpt 1 worker vs the bare loop: {bare['wall'] / one['wall']:.2f}x wall, {bare['cpu'] / one['cpu']:.2f}x cpu"
    )
    print(
        f"  cpt 2 workers vs 1 worker: {one['wall'] / two['wall']:.2f}x wall; CPU s of all processes "
        f"{two['cpu']:.1f} vs {one['cpu']:.1f} ({two['cpu'] / one['cpu']:.2f}x: what a second core can buy back)"
    )


# ---- 3. bounded memory -------------------------------------------------------------------------------------------


def write_text_corpus(path: Path, target_bytes: int, texts: list[str]) -> int:
    """Real prose repeated up to `target_bytes`, each copy edited (a revision line) so dedup keeps it."""
    written, copy = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target_bytes:
            for i, text in enumerate(texts):
                line = json.dumps({"id": f"r{copy}/{i}", "text": f"Revision {copy} of this page.\n{text}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target_bytes:
                    break
            copy += 1
    return written


def peak_rss(cmd: list[str]) -> tuple[float, dict[str, float]]:
    """Run `cmd`; (wall seconds, peak RSS in MB of the launcher and of each worker process), polled every 0.5 s."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher = psutil.Process(proc.pid)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for p in [launcher, *launcher.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 1e6)
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"cpt prepare failed: {stderr[-3000:]}")
    workers = sorted((rss for pid, rss in peaks.items() if pid != proc.pid), reverse=True)
    spilled = re.search(r"shuffle\.spilled_bytes: (\d+)", stdout)
    return time.perf_counter() - start, {
        "launcher": peaks.get(proc.pid, 0.0),
        **{f"w{i}": r for i, r in enumerate(workers)},
        "spilled_mb": int(spilled.group(1)) / 1e6 if spilled else 0.0,
    }


def bounded_memory(base: Path, sizes_gb: list[float], shuffles: list[str]) -> None:
    """Peak RSS per process for each size and each `shuffle` mode ("files": the default on DirectRunner; "beam":
    Beam's in-memory GroupByKey, the baseline)."""
    print("3. peak RSS, --preset text --workers 2 on one JSONL file (MB; w0.. are processes under the launcher)")
    texts = plain_texts()
    for gb in sizes_gb:
        path = base / f"text-{gb}.jsonl"
        size = write_text_corpus(path, int(gb * 1e9), texts)
        try:
            for mode in shuffles:
                out = base / f"out-mem-{gb}-{mode}"
                config = base / f"shuffle-{mode}.yaml"
                config.write_text(f"shuffle: {mode}\n")
                cmd = [str(Path(sys.executable).parent / "cpt"), "prepare", "--preset", "text", "--input", str(path)]
                cmd += ["--config", str(config), "--output", str(out), "--workers", "2"]
                wall, peaks = peak_rss(cmd)
                subprocess.run(["rm", "-rf", str(out)], check=True)
                spilled = peaks.pop("spilled_mb")
                shown = "  ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v > 50)
                print(
                    f"  {size / 1e9:.2f} GB, shuffle {mode:<5}: {wall:.0f} s ({size / 1e6 / wall:.2f} MB/s) | {shown}"
                    + (f" | spilled {spilled:.0f} MB" if spilled else ""),
                    flush=True,
                )
        finally:
            path.unlink()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        base = Path(tmp)
        memory = os.environ.get("CPT_BENCH_MEMORY")
        if memory:
            shuffles = os.environ.get("CPT_BENCH_SHUFFLE", "files").split(",")
            bounded_memory(base, [float(x) for x in memory.split(",")], shuffles)
            return
        docs = [html for _, html in doc_html_pages()] or [html for _, html in pydoc_pages()[:100]]
        plain = plain_texts()
        profile_presets(docs, crawl_like_pages(plain, 150), plain, code_texts(150))
        side_by_side(base)


if __name__ == "__main__":
    if len(sys.argv) == 5:  # a contender of part 2, run by contender() in its own process
        contender_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
