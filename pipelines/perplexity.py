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

# Scores are rounded to this many significant digits, a margin against float differences between
# machines and library versions (within one setup each document is scored alone, so no batch-mate
# or padding affects its score).
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
    """Documents (dicts with a `text`) -> perplexity; RunInference batches elements, each is scored alone."""

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
    """exp(mean NLL) per text, each in its own forward pass (no padding).

    A padded batch would make a document's score depend on which other documents share its batch (the
    padded matmul changes the last float bits, and BatchElements sizes batches adaptively), so shards
    would differ between runs and runners. One unpadded pass per document gives the same score wherever
    the document lands.
    """
    import torch

    scores: list[float] = []
    with torch.inference_mode():
        for text in texts:
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
            if len(ids) < 2:  # one token has nothing to predict
                scores.append(math.nan)
                continue
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            logits = lm.model(input_ids=input_ids).logits.float()
            mean_nll = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:], reduction="mean")
            scores.append(round_significant(math.exp(float(mean_nll))))
    return scores
