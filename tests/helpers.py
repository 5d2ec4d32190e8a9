"""Test helpers that write the prepared-dataset contract directly (no Beam), for trainer-side tests."""

from __future__ import annotations

from pathlib import Path

from cpt.shared import __version__, dataset


def make_prepared_dataset(
    out: str | Path,
    texts: list[str],
    *,
    domain: str = "general",
    tokenizer_dir: str | Path | None = None,
    num_shards: int = 2,
    id_prefix: str = "doc",
) -> str:
    """Write `texts` as a complete prepared dataset (shards, HF metadata, manifest) and return its path."""
    out = str(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = []
    for i, text in enumerate(texts):
        row = {
            "id": f"{id_prefix}-{i:06d}",
            "text": text,
            "domain": domain,
            "source": f"test/{i}",
            "lang": "en",
            "lang_prob": 1.0,
            "n_chars": len(text),
            "ppl": None,
            **{dataset.pii_column(k): 0 for k in dataset.PII_TYPES},
        }
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            row["input_ids"], row["n_tokens"] = ids, len(ids)
        rows.append(row)
    schema = dataset.document_schema(tokenized=tokenizer is not None)
    buckets = [[] for _ in range(num_shards)]
    for i, row in enumerate(rows):
        buckets[i % num_shards].append(row)
    shards = []
    for index, bucket in enumerate(buckets):
        table = dataset.rows_to_table(dataset.sort_rows(bucket), schema)
        shards.append(dataset.write_shard(dataset.join(out, dataset.shard_name(index, num_shards)), table))
    dataset.write_hf_metadata(out, schema, [s["file"] for s in shards])
    manifest = {
        "format_version": dataset.FORMAT_VERSION,
        "cpt_version": __version__,
        "counts": {"input": len(rows), "kept": len(rows), "rejected": {}, "dead_letter": 0},
        "tokenizer": {"sha256": dataset.tokenizer_fingerprint(str(tokenizer_dir))} if tokenizer_dir else None,
        "shards": shards,
    }
    dataset.write_json_atomic(dataset.join(out, dataset.MANIFEST), manifest)
    return out


def save_bos_tokenizer(tokenizer_dir: str | Path, out: str | Path) -> Path:
    """A copy of a tokenizer whose post-processor puts BOS before every text, as LLaMA/Mistral/Gemma tokenizers do."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    plain = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    backend = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    bos = plain.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, plain.bos_token_id)]
    )
    special = {k: getattr(plain, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(out))
    return Path(out)
