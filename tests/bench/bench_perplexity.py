"""Perplexity scoring throughput: cpt's batched handler vs a bare batched forward of the same model (CPU).

Both score the same real texts (pydoc help topics and stdlib sources) truncated to `max_tokens` tokens, in
batches of `batch_size`, and count the same tokens (the truncated token ids of every scorable text):
- bare: the HF tokenizer on a batch (truncation + padding to the batch's longest), one forward with the
  attention mask, a masked mean NLL per row; nothing else (no dead-letter handling, no length buckets);
  once on the whole texts and once on the heads cpt's tokenize() reads (the same tokens, less tokenizing);
- handler: `CausalLMPerplexityHandler.run_inference` on RunInference-sized calls, as the pipeline runs it;
- pipeline: `ScorePerplexity` (RunInference, the cut) in a Beam DirectRunner pipeline on the texts read from
  a JSONL file, start-up included, and less start-up (the same pipeline on one document).
Then `cpt prepare --preset text --ppl-model ...` runs twice with 1 worker and once with 2 worker processes,
and the `ppl` columns (by id) are compared: they must be identical.
The tiny model is built here (BPE on stdlib sources, a 2-layer LLaMA); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

MAX_TOKENS = 256
BATCH_SIZE = 8


def real_texts() -> list[str]:
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items()) if len(text) > 200]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:120]]
    return [t for t in texts if t.strip()]


def build_model(base: Path) -> Path:
    from cpt.trainer.bootstrap import init_llama, train_bpe_tokenizer
    from tests.conftest import stdlib_texts

    train_bpe_tokenizer(stdlib_texts(80), base / "tok", vocab_size=2048)
    init_llama(base / "tok", base / "model", hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=512)
    return base / "model"


def bare_batched(lm, texts: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of the plainest batched scoring: tokenizer padding, one masked forward per batch."""
    import torch

    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH_SIZE):
            enc = tok(
                texts[i : i + BATCH_SIZE],
                add_special_tokens=False,
                truncation=True,
                max_length=MAX_TOKENS,
                padding=True,
                return_tensors="pt",
            )
            logits = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), enc["input_ids"][:, 1:], reduction="none"
            )
            mask = enc["attention_mask"][:, 1:].float()
            mean = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
            [math.exp(float(v)) for v in mean]
            tokens += int(enc["attention_mask"].sum())
    return tokens, time.perf_counter() - start


def handler_scoring(model_dir: Path, lm, texts: list[str]) -> tuple[int, float]:
    from cpt.pipelines.faults import NO_FAULTS
    from cpt.pipelines.perplexity import CausalLMPerplexityHandler

    handler = CausalLMPerplexityHandler(str(model_dir), MAX_TOKENS, BATCH_SIZE, faults=NO_FAULTS)
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    call = handler.batch_elements_kwargs()["max_batch_size"]
    start = time.perf_counter()
    for i in range(0, len(docs), call):
        handler.run_inference(docs[i : i + call], lm)
    seconds = time.perf_counter() - start  # the count below is the benchmark's, not the scoring's work
    return token_count(lm, texts), seconds


def token_count(lm, texts: list[str]) -> int:
    from cpt.pipelines.perplexity import tokenize

    return sum(len(tokenize(lm, t, MAX_TOKENS)) for t in texts)


def pipeline_scoring(model_dir: Path, lm, texts: list[str]) -> tuple[int, float]:
    """ScorePerplexity in a DirectRunner pipeline fed as `cpt prepare` feeds it: documents read from a JSONL file.

    (Not beam.Create: it pickles and bz2-compresses every text into the pipeline, ~3 s of the timing here.)
    """
    import apache_beam as beam

    from cpt.pipelines import transforms as t
    from cpt.pipelines.faults import NO_FAULTS
    from cpt.pipelines.io import ReaderConfig, ReadInputs, expand_inputs
    from cpt.pipelines.perplexity import CausalLMPerplexityHandler

    handler = CausalLMPerplexityHandler(str(model_dir), MAX_TOKENS, BATCH_SIZE, faults=NO_FAULTS)
    folder = Path(tempfile.mkdtemp(prefix="bench-ppl-docs-"))
    lines = [json.dumps({"id": str(i), "text": x}) + "\n" for i, x in enumerate(texts)]
    (folder / "docs.jsonl").write_text("".join(lines), encoding="utf-8")
    files = expand_inputs([str(folder / "docs.jsonl")])
    start = time.perf_counter()
    with beam.Pipeline() as p:
        docs = p | ReadInputs(files, ReaderConfig("text", "id", 10_000_000, 4096))
        _ = docs | t.ScorePerplexity(handler, max_ppl=None, keep_percentile=None)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return token_count(lm, texts), seconds


def ppl_by_id(out: Path) -> dict[str, float]:
    import datasets

    kept = datasets.load_from_disk(str(out))
    return dict(zip(kept["id"], kept["ppl"]))


def prepare_runs(base: Path, model_dir: Path) -> None:
    from pydoc_data.topics import topics

    from cpt.pipelines.config import resolve_config
    from cpt.pipelines.run import prepare

    data = base / "text"
    data.mkdir()
    lines = [json.dumps({"id": f"topic/{k}", "text": v}) for k, v in sorted(topics.items())]
    (data / "topics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = {"inputs": [str(data / "*.jsonl")], "perplexity": {"model": str(model_dir), "max_ppl": 1e9}}
    results = {}
    for name, args in (
        ("1 worker, run 1", ["--direct_num_workers", "1"]),
        ("1 worker, run 2", ["--direct_num_workers", "1"]),
        ("2 workers", ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]),
    ):
        out = base / name.replace(" ", "_").replace(",", "")
        start = time.perf_counter()
        prepare(resolve_config("text", None, {**flags, "output": str(out)}), args, quiet=True)
        results[name] = ppl_by_id(out)
        print(f"cpt prepare --preset text, perplexity on, {name}: {time.perf_counter() - start:.1f} s", flush=True)
    first = results["1 worker, run 1"]
    for name, scores in results.items():
        same = scores == first
        print(f"  ppl of {len(scores)} kept documents, {name} vs 1 worker run 1: {'identical' if same else 'DIFFER'}")


def main() -> None:
    from cpt.pipelines.perplexity import PREFIX_CHARS_PER_TOKEN, load_lm

    texts = real_texts()
    with tempfile.TemporaryDirectory(prefix="bench-ppl-") as tmp:
        base = Path(tmp)
        model_dir = build_model(base)
        lm = load_lm(str(model_dir))
        bare_batched(lm, texts[:16])  # warm-up: first forwards pay one-time allocations
        print(f"{len(texts)} texts, max_tokens {MAX_TOKENS}, batch_size {BATCH_SIZE}, tiny LLaMA (2 x 128), CPU")
        # The texts cut as cpt's tokenize() cuts them before tokenizing: the bare forward without the cost of
        # tokenizing whole files it then truncates, the stricter baseline.
        heads = [text[: MAX_TOKENS * PREFIX_CHARS_PER_TOKEN] for text in texts]
        rows = []
        _, startup = pipeline_scoring(model_dir, lm, texts[:1])
        for _ in range(2):  # interleaved repeats, the best of each kept: the machine may be shared
            rows.append(("bare batched forward", *bare_batched(lm, texts)))
            rows.append(("bare, on the text heads", *bare_batched(lm, heads)))
            rows.append(("cpt handler", *handler_scoring(model_dir, lm, texts)))
            tokens, seconds = pipeline_scoring(model_dir, lm, texts)
            rows.append(("cpt pipeline (DirectRunner)", tokens, seconds))
            rows.append(("  the same less start-up", tokens, seconds - startup))
        best: dict[str, float] = {}
        for name, tokens, seconds in rows:
            best[name] = max(best.get(name, 0.0), tokens / seconds)
        bare, strict = best["bare batched forward"], best["bare, on the text heads"]
        for name, rate in best.items():
            print(f"  {name:<28} {rate:>9.0f} tokens/s   {rate / bare:.2f}x bare   {rate / strict:.2f}x bare on heads")
        print(f"  (pipeline start-up: the same pipeline on 1 document, {startup:.1f} s)")
        prepare_runs(base, model_dir)


if __name__ == "__main__":
    main()
