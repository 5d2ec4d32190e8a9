"""Make a tokenizer and a small model from scratch, saved in Hugging Face format.

Nothing can be downloaded here, so tests and the demo build their own "base model": a byte-level
BPE trained with `tokenizers` and a LLaMA-config model. Both are saved and loaded back through
`from_pretrained`, exactly the path a real model takes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2):
    """Train a byte-level BPE on `texts` and save it as a `PreTrainedTokenizerFast` folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.save_pretrained(str(out_dir))
    return fast


def init_llama(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
):
    """Initialise a LLaMA-config causal LM sized to the tokenizer, and save model + tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def read_texts(inputs: list[str]) -> Iterator[str]:
    """Texts from files (one document each; `.jsonl` = one `text` field per line) or prepared datasets."""
    from cpt.shared import dataset

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            # A prepared dataset: train on the cleaned text the pipeline kept, not on raw markup.
            for url in dataset.shard_urls(str(path)):
                yield from dataset.read_shard(url).column("text").to_pylist()
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        text = json.loads(line).get("text")
                        if not isinstance(text, str):
                            raise ValueError(f"{path}:{number}: no string `text` field; give JSONL with a text field")
                        yield text
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cpt.trainer.bootstrap",
        description="Make a base model from scratch: a byte-level BPE tokenizer, then a LLaMA-config model.",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer and save it in HF format")
    tok.add_argument("--input", nargs="+", required=True, help="text files, .jsonl files or prepared dataset dirs")
    tok.add_argument("--out", required=True, help="output folder (save_pretrained)")
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--min-frequency", type=int, default=2)
    model = sub.add_parser("model", help="initialise a LLaMA-config causal LM for a tokenizer (random weights)")
    model.add_argument("--tokenizer", required=True, help="tokenizer folder (from the `tokenizer` step)")
    model.add_argument("--out", required=True, help="output folder (save_pretrained, safetensors)")
    model.add_argument("--hidden", type=int, default=256, help="hidden size")
    model.add_argument("--layers", type=int, default=4, help="number of transformer layers")
    model.add_argument("--heads", type=int, default=4, help="attention heads (must divide --hidden)")
    model.add_argument("--intermediate", type=int, default=None, help="MLP size (default 4 x hidden)")
    model.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings")
    model.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.what == "tokenizer":
        missing = [p for p in args.input if not Path(p).exists()]
        if missing:
            print(f"bootstrap tokenizer: input not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        texts = list(read_texts(args.input))
        if not texts:
            print(f"bootstrap tokenizer: no text in {', '.join(args.input)}", file=sys.stderr)
            return 2
        fast = train_bpe_tokenizer(texts, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
        chars = sum(len(t) for t in texts)
        print(f"tokenizer: {len(fast)} tokens from {len(texts)} documents ({chars / 1e6:.1f} M chars) -> {args.out}")
        return 0
    if args.hidden % args.heads:
        print(f"bootstrap model: --hidden {args.hidden} is not divisible by --heads {args.heads}", file=sys.stderr)
        return 2
    model = init_llama(
        args.tokenizer,
        args.out,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.max_positions,
        seed=args.seed,
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA {args.layers} layers x {args.hidden} wide, {params / 1e6:.2f} M parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
