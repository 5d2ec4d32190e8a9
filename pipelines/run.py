"""`cpt prepare`: raw text / HTML / code -> a prepared dataset (sharded Arrow + manifest), on any Beam runner.

    read -> html -> pii -> length -> language -> quality -> perplexity -> code -> dedup -> near_dedup
         -> decontaminate -> tokenize -> write shards

The launcher validates everything a user can get wrong before any work starts, resolves the input
files, cleans a previous run, runs the pipeline, checks the accounting and writes the manifest last.
Unknown flags go to Beam's PipelineOptions (--runner, --direct_num_workers, --dask_client_address, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cpt.pipelines.config import SHUFFLE_MODES, STEPS, InputError, PrepareConfig, preset_names, resolve_config
from cpt.shared.config import ConfigError, config_hash, to_dict

DEFAULT_RUNNER = "DirectRunner"
# --workers by default: the cores, at most MAX_WORKERS (each worker holds its own models and langdetect
# profiles), and no more than one per BYTES_PER_WORKER of input: each costs ~2.5 CPU s to start (Beam's SDK
# harness, the steps' setup), and on documentation pages a second one broke even at ~25 MB (README).
MAX_WORKERS = 8
BYTES_PER_WORKER = 32 << 20
# The writer holds one shard's records at once (to sort them by id): larger inputs get more shards than
# --num-shards, one per MAX_SHARD_BYTES of input, so that a worker's share stays bounded.
MAX_SHARD_BYTES = 128 << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpt prepare",
        description="Clean, PII-mask, filter, dedup and shard raw text/HTML/code with Apache Beam. "
        "Any other --flag is passed to Beam (e.g. --runner, --direct_num_workers 2 "
        "--direct_running_mode multi_processing, --dask_client_address HOST:PORT).",
    )
    p.add_argument("--input", action="append", dest="inputs", metavar="PATTERN", help="path, glob or URL; repeatable")
    p.add_argument("--output", help="output folder or URL (replaced if it holds a previous run)")
    p.add_argument("--preset", help=f"{', '.join(preset_names())} (default: text, or the config's)")
    p.add_argument("--config", help="YAML with any PrepareConfig field; flags override it")
    p.add_argument("--domain")
    p.add_argument("--format", choices=["jsonl", "parquet", "arrow", "text", "html", "code"])
    p.add_argument("--text-field")
    p.add_argument("--html-field", help="records' HTML column: read instead of --text-field and cleaned as HTML")
    p.add_argument("--id-field")
    p.add_argument("--skip", nargs="+", metavar="STEP", help=f"steps to leave out: {' '.join(STEPS)}")
    p.add_argument("--lang", nargs="+", help="languages to keep (default en)")
    p.add_argument("--min-lang-prob", type=float)
    p.add_argument("--min-chars", type=int)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--ppl-model", help="local folder of a HF causal LM for the perplexity step")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--max-ppl", type=float)
    cut.add_argument("--ppl-keep-percentile", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--ppl-max-tokens", type=int)
    p.add_argument("--ppl-batch-size", type=int)
    p.add_argument("--ppl-device", help="cpu (default), cuda or cuda:N: where each worker runs the perplexity model")
    p.add_argument("--tokenizer", help="tokenizer folder: adds input_ids and n_tokens")
    p.add_argument(
        "--num-shards",
        type=int,
        help=f"shards per output folder (default 4; at least one per {MAX_SHARD_BYTES >> 20} MB of input)",
    )
    p.add_argument("--max-bytes", type=int, help="size guard per record (default 10 MB)")
    p.add_argument(
        "--workers",
        type=int,
        help=f"worker processes on this machine (default: the cores, at most {MAX_WORKERS} and one per "
        f"{BYTES_PER_WORKER >> 20} MB of input); DirectRunner only, --direct_num_workers overrides it",
    )
    p.add_argument(
        "--shuffle",
        choices=SHUFFLE_MODES,
        help="files: dedup, near dedup and the writer shuffle through files under the output (flat memory); "
        "beam: the runner's GroupByKey; auto (default): files on DirectRunner, beam elsewhere",
    )
    eval_help = "prepared eval datasets: reject training documents that overlap them"
    p.add_argument("--decontaminate", nargs="+", metavar="DIR", help=eval_help)
    return p


def flags_to_dict(args: argparse.Namespace) -> dict:
    """Only the flags a user gave, as a nested dict that overrides the preset and --config YAML."""
    flat = {
        ("inputs",): args.inputs,
        ("output",): args.output,
        ("domain",): args.domain,
        ("format",): args.format,
        ("text_field",): args.text_field,
        ("id_field",): args.id_field,
        ("html_field",): args.html_field,
        ("skip",): args.skip,
        ("tokenizer",): args.tokenizer,
        ("num_shards",): args.num_shards,
        ("max_bytes",): args.max_bytes,
        ("shuffle",): args.shuffle,
        ("decontaminate", "datasets"): args.decontaminate,
        ("filters", "langs"): args.lang,
        ("filters", "min_lang_prob"): args.min_lang_prob,
        ("filters", "min_chars"): args.min_chars,
        ("filters", "max_chars"): args.max_chars,
        ("perplexity", "model"): args.ppl_model,
        ("perplexity", "max_ppl"): args.max_ppl,
        ("perplexity", "keep_percentile"): args.ppl_keep_percentile,
        ("perplexity", "max_tokens"): args.ppl_max_tokens,
        ("perplexity", "batch_size"): args.ppl_batch_size,
        ("perplexity", "device"): args.ppl_device,
    }
    out: dict = {}
    for keys, value in flat.items():
        if value is None:
            continue
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def check_paths(cfg: PrepareConfig) -> None:
    """User errors about paths that no pipeline step should discover: raise ConfigError with the fix."""
    from cpt.shared import dataset
    from cpt.shared.dataset import filesystem

    problems = []
    fs, path = filesystem(cfg.output)
    if fs.exists(path) and not fs.isdir(path):
        problems.append(f"--output {cfg.output} is a file; give a folder (it is created if missing)")
    for name, folder in (("--tokenizer", cfg.tokenizer), ("--ppl-model", cfg.perplexity.model)):
        if folder and not Path(folder).is_dir() and "://" not in folder:
            problems.append(f"{name} {folder}: no such folder (give a local Hugging Face model/tokenizer folder)")
    if cfg.perplexity.model and "perplexity" in cfg.active_steps() and Path(cfg.perplexity.model).is_dir():
        from cpt.pipelines.perplexity import check_model

        # Load it once here: a model that cannot load would otherwise fail every worker mid-job.
        problem = check_model(cfg.perplexity.model, "cpu")
        if problem:
            problems.append(f"--ppl-model: {problem}")
    for folder in cfg.decontaminate.datasets if "decontaminate" in cfg.active_steps() else ():
        try:
            dataset.read_manifest(folder)
        except dataset.DatasetError as err:
            problems.append(f"--decontaminate {err} (give folders written by `cpt prepare`)")
    if problems:
        raise ConfigError(problems, "cpt prepare")


def build_pipeline(p, cfg: PrepareConfig, files, shuffle=None):
    """Wire the steps of `cfg` into pipeline `p`; returns the last PCollection (the run summary).

    `shuffle` (a ShuffleSpec) sends every GroupByKey of records through files; None keeps Beam's.
    """
    from cpt.pipelines import transforms as t
    from cpt.pipelines.io import ReaderConfig, ReadInputs
    from cpt.pipelines.shuffle import each
    from cpt.pipelines.write import CountInputs, WriteDataset, WriteRunSummary

    reader = ReaderConfig(cfg.record_text_field(), cfg.id_field, cfg.max_bytes, cfg.dead_letter_max_bytes)
    records = p | "Read" >> ReadInputs(files, reader, shuffle)
    input_count = records | "CountInputs" >> CountInputs()
    f = cfg.filters
    docs = records
    if "html" not in cfg.active_steps():
        # Nothing cleans HTML in this run: count what looks like it, so the summary can say so.
        docs = each(docs, "SniffHTML", lambda: t.ApplyStep("html_sniff", t.HtmlSniffStep()))
    for step in cfg.active_steps():
        if step == "html":
            html = t.HtmlStep(cfg.records_are_html or cfg.html_field is not None, cfg.html.sniff, cfg.html.mode)
            docs = each(docs, "CleanHTML", lambda: t.ApplyStep("html", html))
        elif step == "pii":
            docs = each(docs, "MaskPII", lambda: t.ApplyStep("pii", t.PiiStep(cfg.pii.secrets)))
        elif step == "length":
            docs = each(
                docs, "Length", lambda: t.ApplyStep("length", t.LengthStep(f.min_chars, f.max_chars, f.min_words))
            )
        elif step == "language":
            lang = t.LanguageStep(f.langs, f.min_lang_prob, f.lang_max_chars, f.lang_backend)
            docs = each(docs, "Language", lambda: t.ApplyStep("language", lang))
        elif step == "quality":
            q = cfg.quality
            quality = t.QualityStep(q.gopher_repetition, q.gopher_quality, q.c4, q.fineweb, q.prose_only)
            docs = each(docs, "Quality", lambda: t.ApplyStep("quality", quality))
        elif step == "code":
            code = t.CodeStep(f.min_chars, f.max_chars, cfg.code.max_comment_ratio, cfg.code.max_line_length)
            docs = each(docs, "Code", lambda: t.ApplyStep("code", code))
        elif step == "perplexity":
            from cpt.pipelines.perplexity import CausalLMPerplexityHandler

            ppl = cfg.perplexity
            handler = CausalLMPerplexityHandler(ppl.model, ppl.max_tokens, ppl.batch_size, ppl.device)
            score = t.ScorePerplexity(handler, ppl.max_ppl, ppl.keep_percentile, as_channels=True)
            docs = docs | "Perplexity" >> score
        elif step == "dedup":
            docs = docs | "Dedup" >> t.ExactDedup(shuffle)
        elif step == "near_dedup":
            from cpt.pipelines.near_dedup import NearDedup

            docs = docs | "NearDedup" >> NearDedup(cfg.near_dedup, shuffle)
        elif step == "decontaminate":
            from cpt.pipelines.near_dedup import Decontaminate
            from cpt.shared.dataset import shard_urls

            d = cfg.decontaminate
            shards = [url for folder in d.datasets for url in shard_urls(folder)]
            decontaminate = Decontaminate(shards, d.ngram, d.min_overlap, d.max_train_docs, shuffle)
            docs = docs | "Decontaminate" >> decontaminate
    if cfg.tokenizer:
        docs = each(docs, "Tokenize", lambda: t.ApplyStep("tokenize", t.TokenizeStep(cfg.tokenizer)))
    tokenized = cfg.tokenizer is not None
    write = WriteDataset(cfg.output, cfg.num_shards, cfg.domain, tokenized, cfg.dead_letter_max_bytes, shuffle)
    infos = docs | "Write" >> write
    # Must stay the last transform applied: DaskRunner computes only the last one (and what it depends on).
    return infos | "Summary" >> WriteRunSummary(cfg.output, input_count)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_manifest(cfg: PrepareConfig, files, notes: list[str]) -> dict:
    from cpt.shared import __version__, dataset

    resolved = to_dict(cfg)
    # How the shuffles ran changes no byte of the output: the hash stays that of the data's config.
    hashed = {k: v for k, v in resolved.items() if k != "shuffle"}
    tokenizer = None
    if cfg.tokenizer:
        tokenizer = {"name": cfg.tokenizer, "sha256": dataset.tokenizer_fingerprint(cfg.tokenizer)}
        tokenizer["add_special_tokens"] = False  # bare tokens: the trainer adds BOS/EOS per the model's convention
    return {
        "format_version": dataset.FORMAT_VERSION,
        "cpt_version": __version__,
        "git_revision": git_revision(),
        "config": resolved,
        "config_hash": config_hash(hashed),
        "steps": cfg.active_steps() + (["tokenize"] if cfg.tokenizer else []),
        "inputs": {"patterns": list(cfg.inputs), "files": [f.path for f in files]},
        "tokenizer": tokenizer,
        "notes": notes,
    }


def pipeline_options(beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(beam_args)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
    return options


def local_worker_args(beam_args: list[str], workers: int | None, input_bytes: int) -> list[str]:
    """Beam flags for `--workers` on DirectRunner: N > 1 worker processes (multi_processing), else in-process.

    Measured on one machine (README, "Scaling on one machine"), DirectRunner's multi_processing mode scaled
    better than a local Dask cluster. Flags the user gave (--direct_num_workers, another --runner) win.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner not in (None, DEFAULT_RUNNER) or any(a.startswith("--direct_num_workers") for a in beam_args):
        return list(beam_args)
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, MAX_WORKERS, input_bytes // BYTES_PER_WORKER))
    if workers == 1:
        return [*beam_args, "--direct_num_workers", "1"]
    return [*beam_args, "--direct_num_workers", str(workers), "--direct_running_mode", "multi_processing"]


def shuffle_spec(cfg: PrepareConfig, options, input_bytes: int):
    """The ShuffleSpec of this run: files under the output on DirectRunner (or when asked), else Beam's shuffle."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from cpt.pipelines.shuffle import SHUFFLE_DIR, ShuffleSpec
    from cpt.shared.dataset import join

    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__
    mode = cfg.shuffle
    if mode == "auto":
        mode = "files" if name in (DEFAULT_RUNNER, "direct", "SwitchingDirectRunner", "FnApiRunner") else "beam"
    if mode == "beam":
        return None
    workers = options.view_as(DirectOptions).direct_num_workers or 1
    return ShuffleSpec.for_input(join(cfg.output, SHUFFLE_DIR), input_bytes, workers)


def shards_for(num_shards: int, input_bytes: int) -> int:
    """`num_shards`, or more where the input holds over MAX_SHARD_BYTES per shard."""
    return max(num_shards, -(-input_bytes // MAX_SHARD_BYTES))


def metric_lines(result) -> list[str]:
    """Beam counters per step and outcome, where the runner reports them (DaskRunner does not)."""
    try:
        counters = result.metrics().query()["counters"]
    except (NotImplementedError, AttributeError, KeyError):
        return []
    totals: dict[tuple[str, str], int] = {}
    for c in counters:
        key = (c.key.metric.namespace, c.key.metric.name)
        totals[key] = totals.get(key, 0) + int(c.committed or c.attempted or 0)
    return [f"    {ns}.{name}: {n}" for (ns, name), n in sorted(totals.items())]


def summary_text(cfg: PrepareConfig, counts: dict, seconds: float, input_bytes: int, manifest: dict, metrics) -> str:
    rate = counts["input"] / seconds if seconds > 0 else 0.0
    mbps = input_bytes / 1e6 / seconds if seconds > 0 else 0.0
    lines = [
        f"cpt prepare: {counts['input']} input records from {len(manifest['inputs']['files'])} files "
        f"({input_bytes / 1e6:.2f} MB) in {seconds:.1f} s: {rate:.1f} docs/s, {mbps:.2f} MB/s",
        f"  steps: {' -> '.join(manifest['steps']) or '(none)'}",
        f"  kept:        {counts['kept']}",
        f"  rejected:    {sum(counts['rejected'].values())}",
    ]
    lines += [f"    {reason}: {n}" for reason, n in counts["rejected"].items()]
    lines.append(f"  dead_letter: {counts['dead_letter']}")
    lines += [f"    {step}: {n}" for step, n in counts.get("dead_letter_steps", {}).items()]
    if "near_dedup" in manifest:
        from cpt.pipelines.inspect import near_dedup_lines

        lines += near_dedup_lines(manifest["near_dedup"])
    if manifest.get("html"):
        lines.append("  html:        " + ", ".join(f"{why} {n}" for why, n in manifest["html"].items()))
    tokens = [s["tokens"] for s in manifest["shards"] if s["tokens"] is not None]
    if tokens:
        lines.append(f"  tokens:      {sum(tokens)}")
    lines += [f"  note: {note}" for note in manifest["notes"]]
    if metrics:
        lines += ["  beam counters:", *metrics]
    lines.append(f"  output: {cfg.output} ({len(manifest['shards'])} shards; rejected/ and dead_letter/ beside them)")
    return "\n".join(lines)


def html_notes(html: dict) -> list[str]:
    """Say so when records looked like HTML but no step cleaned them (they are kept as text, markup and all)."""
    n = html.get("not_cleaned", 0)
    if not n:
        return []
    return [
        f"{n} records look like HTML but were not cleaned (this preset has no html step): "
        "use --preset web, --html-field NAME, or add html to steps"
    ]


def prepare(cfg: PrepareConfig, beam_args: list[str], quiet: bool = False, workers: int | None = None) -> dict:
    """Run the pipeline for a validated config and return the manifest (raises on any failure).

    `workers` is `--workers` (None: chosen from the cores and the input size); see local_worker_args.
    """
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    from cpt.pipelines.io import expand_inputs
    from cpt.pipelines.write import (
        clean_output,
        counts_from_summary,
        dead_letters_by_step,
        finalize,
        read_run_summary,
        remove_shuffle_files,
    )

    options = pipeline_options(beam_args)
    # Inputs are matched here, before beam.Pipeline exists: filesystems such as s3:// need the options first.
    FileSystems.set_options(options)
    files = expand_inputs(cfg.inputs, cfg.format)
    input_bytes = sum(f.size for f in files)
    options = pipeline_options(local_worker_args(beam_args, workers, input_bytes))
    notes = []
    shards = shards_for(cfg.num_shards, input_bytes)
    if shards != cfg.num_shards:
        notes.append(f"num_shards {cfg.num_shards} -> {shards}: at most {MAX_SHARD_BYTES >> 20} MB of input per shard")
        cfg = dataclasses.replace(cfg, num_shards=shards)
    if "perplexity" in cfg.steps and "perplexity" not in cfg.skip and not cfg.perplexity.model:
        notes.append("perplexity skipped: no --ppl-model")
    clean_output(cfg.output)
    shuffle = shuffle_spec(cfg, options, input_bytes)
    started = time.perf_counter()
    p = beam.Pipeline(options=options)
    build_pipeline(p, cfg, files, shuffle)
    try:
        result = p.run()
        result.wait_until_finish()
    finally:
        remove_shuffle_files(cfg.output)
    seconds = time.perf_counter() - started
    summary = read_run_summary(cfg.output)
    counts = counts_from_summary(summary, cfg.num_shards)
    # Records treated as HTML, by why: beside the counts, which stay input = kept + rejected + dead_letter.
    html = counts.pop("html", {})
    notes += html_notes(html)
    manifest = {**base_manifest(cfg, files, notes), "counts": counts, "html": html}
    if "near_dedup" in cfg.active_steps():
        from cpt.pipelines.near_dedup import merge_stats

        bands, rows = cfg.near_dedup.lsh_params()
        params = {**to_dict(cfg.near_dedup), "bands": bands, "rows": rows}
        manifest["near_dedup"] = {"params": params, **merge_stats(summary["shards"])}
    manifest = finalize(cfg.output, manifest, summary, tokenized=cfg.tokenizer is not None)
    if not quiet:
        shown = {**counts, "dead_letter_steps": dead_letters_by_step(summary)}
        print(summary_text(cfg, shown, seconds, sum(f.size for f in files), manifest, metric_lines(result)))
    return manifest


def quiet_beam_import() -> None:
    """Import Beam with its import-time "apitools not found" warning (GCP extra not installed) silenced."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam  # noqa: F401
    finally:
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args, beam_args = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = resolve_config(args.preset, args.config, flags_to_dict(args))
        check_paths(cfg)
        if args.workers is not None and args.workers < 1:
            raise ConfigError([f"--workers {args.workers}: give 1 or more worker processes"], "cpt prepare")
        quiet_beam_import()
        prepare(cfg, beam_args, workers=args.workers)
    except ConfigError as err:
        print(f"cpt prepare: error: {'; '.join(err.problems)}", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"cpt prepare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # DaskRunner pickles this module's work to worker processes: the guard keeps them from re-running it.
    sys.exit(main())
