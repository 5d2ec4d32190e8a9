"""A Beam RunInference ModelHandler that scores documents with any Hugging Face causal LM.

perplexity = exp(mean token NLL) of the text truncated to `max_tokens` tokens. Beam's own
HuggingFace handlers return logits or pipeline outputs, not a per-document NLL, hence this one.

Documents are scored in padded batches (right padding, attention mask). A document's padded length is a
function of its own token count only (the next bucket of BUCKETS), and only documents of one bucket share a
forward pass, so the shape each document is computed in never depends on its batch mates or on how
BatchElements happened to cut the stream; the scores are then rounded (PPL_DIGITS). A document that cannot be
scored (tokenizer error, model error, non-finite score) comes back as a `ScoringFailure`, which the pipeline
turns into a dead letter; when a batched forward fails, its documents are retried one at a time so the
others are still scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from cpt.pipelines.faults import NO_FAULTS, Faults

# Scores are rounded to this many significant digits, a margin against float differences between
# machines, devices and library versions.
PPL_DIGITS = 6
STEP = "perplexity"
# RunInference hands the handler up to this many forward batches' worth of documents at once, so that each
# length bucket has a chance to fill a forward pass of `batch_size` documents.
BATCHES_PER_CALL = 4
# tokenize() reads this many characters per kept token (~4 in English prose, ~3 in code): a head that holds
# several times max_tokens tokens, whose cut lies far beyond the tokens kept.
PREFIX_CHARS_PER_TOKEN = 16


@dataclass
class LoadedLM:
    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class ScoringFailure:
    """Why one document could not be scored (the pipeline makes it a dead letter with this error)."""

    error: str


class ModelLoadError(RuntimeError):
    """The perplexity model or its tokenizer cannot be loaded: the job cannot score anything."""


def round_significant(value: float, digits: int = PPL_DIGITS) -> float:
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def bucket_length(n_tokens: int, max_tokens: int) -> int:
    """The padded length of a document of `n_tokens` tokens: the next power of two >= 16, capped at max_tokens."""
    width = 16
    while width < n_tokens:
        width *= 2
    return min(width, max_tokens)


def load_lm(model_dir: str, device: str = "cpu") -> LoadedLM:
    """Tokenizer + causal LM from a local folder (no remote code), in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, dtype=torch.float32)
        model.to(device).eval()
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, RuntimeError...
        raise ModelLoadError(f"perplexity model {model_dir} cannot be loaded on {device}: {_one_line(err)}") from err
    return LoadedLM(model=model, tokenizer=tokenizer)


def check_model(model_dir: str, device: str = "cpu") -> str | None:
    """None if the model loads, else one line saying why (the launcher checks this before any work starts)."""
    try:
        load_lm(model_dir, device)
    except ModelLoadError as err:
        return str(err)
    return None


class CausalLMPerplexityHandler(ModelHandler[dict, "float | ScoringFailure", LoadedLM]):
    """Documents (dicts with a `text`) -> perplexity, or a ScoringFailure for a document that cannot be scored."""

    def __init__(
        self,
        model_dir: str,
        max_tokens: int = 256,
        batch_size: int = 8,
        device: str = "cpu",
        faults: Faults | None = None,
    ):
        # Calls of a fixed BATCHES_PER_CALL forwards' worth (BatchElements flushes the rest at a bundle end):
        # its adaptive sizing otherwise starts small and grows, and a small call splits into length buckets
        # that each fill only part of a forward.
        call = batch_size * BATCHES_PER_CALL
        super().__init__(min_batch_size=call, max_batch_size=call)
        self.model_dir = model_dir
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = device
        self.faults = Faults.from_env() if faults is None else faults

    def load_model(self) -> LoadedLM:
        return load_lm(self.model_dir, self.device)

    def run_inference(
        self, batch: Sequence[dict], model: LoadedLM, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        scores = score_documents(model, list(batch), self.max_tokens, self.batch_size, self.device, self.faults)
        return [PredictionResult(doc, score) for doc, score in zip(batch, scores)]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(doc["text"].encode("utf-8")) for doc in batch)

    def get_metrics_namespace(self) -> str:
        return "cpt_perplexity"


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def tokenize(lm: LoadedLM, text: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` token ids of `text`.

    Tokenizing a 100 KB source file to keep its first 256 tokens costs more than scoring them, so only a
    head of PREFIX_CHARS_PER_TOKEN characters per kept token is tokenized; where that head holds fewer than
    twice `max_tokens` tokens (so the cut could reach the kept ones), the whole text is.
    """
    head = text[: max_tokens * PREFIX_CHARS_PER_TOKEN]
    ids = lm.tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(head) < len(text) and len(ids) < 2 * max_tokens:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[:max_tokens])


def score_documents(
    lm: LoadedLM,
    docs: list[dict],
    max_tokens: int,
    batch_size: int,
    device: str = "cpu",
    faults: Faults = NO_FAULTS,
) -> list[float | ScoringFailure]:
    """A score per document, in input order: rounded exp(mean NLL), NaN for < 2 tokens, or a ScoringFailure."""
    results: list[float | ScoringFailure | None] = [None] * len(docs)
    encoded: dict[int, list[int]] = {}
    for i, doc in enumerate(docs):
        try:
            ids = tokenize(lm, doc["text"], max_tokens)
        except Exception as err:  # noqa: BLE001 - a tokenizer may raise anything on hostile text
            results[i] = ScoringFailure(f"tokenizer: {_one_line(err)}")
            continue
        if len(ids) < 2:  # one token has nothing to predict: no score (the cut rejects it)
            results[i] = math.nan
        else:
            encoded[i] = ids
    buckets: dict[int, list[int]] = {}
    for i in sorted(encoded, key=lambda i: (len(encoded[i]), i)):  # length-sorted, stable
        buckets.setdefault(bucket_length(len(encoded[i]), max_tokens), []).append(i)
    for width, members in sorted(buckets.items()):
        for start in range(0, len(members), batch_size):
            group = members[start : start + batch_size]
            try:
                for i in group:
                    faults.check(STEP, docs[i]["id"])
                scores = forward_scores(lm, [encoded[i] for i in group], width, device)
            except Exception:  # noqa: BLE001 - one bad document must not cost its batch mates their scores
                scores = [_score_alone(lm, docs[i]["id"], encoded[i], width, device, faults) for i in group]
            for i, score in zip(group, scores):
                results[i] = score
    return results


def _score_alone(lm, doc_id: str, ids: list[int], width: int, device: str, faults: Faults) -> float | ScoringFailure:
    try:
        faults.check(STEP, doc_id)
        return forward_scores(lm, [ids], width, device)[0]
    except Exception as err:  # noqa: BLE001 - the model or its kernels may raise on one input
        return ScoringFailure(f"model: {_one_line(err)}")


def forward_scores(lm: LoadedLM, encoded: list[list[int]], width: int, device: str) -> list[float | ScoringFailure]:
    """One padded forward of same-bucket documents; rounded perplexity per row, ScoringFailure if non-finite."""
    import torch

    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        out: list[float | ScoringFailure] = []
        for row, seq in enumerate(encoded):
            n = len(seq)
            nll = torch.nn.functional.cross_entropy(logits[row, : n - 1].float(), ids[row, 1:n], reduction="mean")
            value = float(nll)
            if not math.isfinite(value) or value > 700:  # exp() would overflow to inf
                out.append(ScoringFailure(f"non-finite score (mean NLL {value})"))
            else:
                out.append(round_significant(math.exp(value)))
    return out


def score_texts(lm: LoadedLM, texts: list[str], max_tokens: int, batch_size: int = 8, device: str = "cpu") -> list:
    """Scores of plain texts (ids are their positions); the same path as the pipeline's."""
    docs = [{"id": str(i), "text": text} for i, text in enumerate(texts)]
    return score_documents(lm, docs, max_tokens, batch_size, device)
