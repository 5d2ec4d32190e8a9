"""A Beam RunInference ModelHandler that scores documents with any Hugging Face causal LM.

perplexity = exp(mean token NLL) of the text truncated to `max_tokens` tokens. Beam's own
HuggingFace handlers return logits or pipeline outputs, not a per-document NLL, hence this one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

# Scores are rounded to this many significant digits: batches differ between runners and worker
# counts, and padding changes the last float bits of a matmul; the stored value must not.
PPL_DIGITS = 6


@dataclass
class LoadedLM:
    model: Any
    tokenizer: Any


def round_significant(value: float, digits: int = PPL_DIGITS) -> float:
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


class CausalLMPerplexityHandler(ModelHandler[dict, float, LoadedLM]):
    """Documents (dicts with a `text`) -> perplexity, batched, sorted by length within a batch."""

    def __init__(self, model_dir: str, max_tokens: int = 256, batch_size: int = 8, device: str = "cpu"):
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.model_dir = model_dir
        self.max_tokens = max_tokens
        self.device = device

    def load_model(self) -> LoadedLM:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, trust_remote_code=False, dtype=torch.float32)
        model.to(self.device).eval()
        return LoadedLM(model=model, tokenizer=tokenizer)

    def run_inference(
        self, batch: Sequence[dict], model: LoadedLM, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        texts = [doc["text"] for doc in batch]
        scores = score_texts(model, texts, self.max_tokens, self.device)
        return [PredictionResult(doc, score) for doc, score in zip(batch, scores)]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(doc["text"].encode("utf-8")) for doc in batch)

    def get_metrics_namespace(self) -> str:
        return "cpt_perplexity"


def score_texts(lm: LoadedLM, texts: list[str], max_tokens: int, device: str = "cpu") -> list[float]:
    """exp(mean NLL) per text; texts are sorted by token length so a padded batch wastes little."""
    import torch

    encoded = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    scores: list[float] = [math.nan] * len(texts)
    scorable = [i for i in order if len(encoded[i]) >= 2]  # one token has nothing to predict
    if not scorable:
        return scores
    width = max(len(encoded[i]) for i in scorable)
    ids = torch.full((len(scorable), width), pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(scorable), width), dtype=torch.long)
    for row, i in enumerate(scorable):
        ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
        mask[row, : len(encoded[i])] = 1
    with torch.inference_mode():
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none"
        )  # [batch, width-1]
        target_mask = mask[:, 1:].to(device).float()
        mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1)
    for row, i in enumerate(scorable):
        scores[i] = round_significant(math.exp(float(mean_nll[row])))
    return scores
