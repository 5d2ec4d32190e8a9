"""MixtureLoader: this rank's micro-batches of the global stream, through torch DataLoader workers.

Global micro-batch j holds world_size * B sequences; rank r takes sequences [j*W*B + r*B, +B). With K
DataLoader workers, worker (j - j0) % K builds micro-batch j, and the DataLoader's round-robin returns
them in order. Each worker walks the whole stream (cheap for token shards: lengths and cursors only,
arrays are built just for its own sequences; text shards are tokenized by every worker) so no
coordination is needed, every rank gets the same number of micro-batches, and each batch carries the
global state after micro-batch j, which `state_dict()` returns whatever K is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cpt.shared.dataset import DatasetError, tokenizer_fingerprint
from cpt.trainer.conventions import bos_labels, document_bos
from cpt.trainer.data.config import DataConfig
from cpt.trainer.data.mixture import MixtureStream, Sequence, extend_state, initial_state, validate_state
from cpt.trainer.data.schedule import needs_total_tokens
from cpt.trainer.data.sources import SourceIndex, local_tokenizer_dir, tokenizer_problem


def collate(sequences: list[Sequence], names: list[str], bos: int | None = None) -> dict:
    """Stack packed sequences into the micro-batch dict the trainer consumes."""
    input_ids = torch.from_numpy(np.stack([s.input_ids for s in sequences]))
    position_ids = torch.from_numpy(np.stack([s.position_ids for s in sequences]))
    return {
        "input_ids": input_ids,
        # HF causal LMs shift internally; every position is a real target except an inserted BOS.
        "labels": bos_labels(input_ids, position_ids, bos),
        "position_ids": position_ids,
        "source_ids": torch.from_numpy(np.stack([s.source_ids for s in sequences])),
        "index": [s.index for s in sequences],
        "segments": [s.segments for s in sequences],
    }


class _RankStream(IterableDataset):
    """Yields (micro-batch, global state after it) for one rank, split over DataLoader workers."""

    def __init__(self, cfg, tokenizer, indexes, *, seed, micro_batch_size, rank, world_size, total_tokens, state):
        self.cfg, self.tokenizer, self.indexes = cfg, tokenizer, indexes
        self.seed, self.batch, self.rank, self.world = seed, micro_batch_size, rank, world_size
        self.total_tokens, self.state = total_tokens, state

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = MixtureStream(
            self.cfg, self.tokenizer, seed=self.seed, total_tokens=self.total_tokens, state=self.state,
            indexes=self.indexes,
        )  # fmt: skip
        names = stream.names
        first, last = self.rank * self.batch, (self.rank + 1) * self.batch
        step = 0
        while True:
            mine = step % workers == worker
            own = []
            for i in range(self.world * self.batch):
                wanted = mine and first <= i < last
                sequence = stream.next_sequence(materialize=wanted)
                if sequence is None:
                    return  # a finite source ran out: every rank and worker stops at the same micro-batch
                if wanted:
                    own.append(sequence)
            if mine:
                yield collate(own, names, stream.bos), stream.state_dict()
            step += 1


class MixtureLoader:
    """Iterable of this rank's micro-batches; stateful (`state_dict` / `load_state_dict`) for exact resume."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        seed: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        total_tokens: int | None = None,
    ):
        if (needs_total_tokens(cfg.schedule) or cfg.anneal is not None) and not total_tokens:
            what = f"a {cfg.schedule.type} schedule" if needs_total_tokens(cfg.schedule) else "an anneal phase"
            raise ValueError(
                f"{what} is defined over the run's length: pass total_tokens "
                "(e.g. max_steps x world_size x micro_batch_size x grad_accum x seq_len)"
            )
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size}, rank={rank}, world_size={world_size}")
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.total_tokens = total_tokens
        self.source_names = [s.name for s in cfg.stream_sources()]
        self._indexes = [SourceIndex(s.name, s.path) for s in cfg.stream_sources()]
        self._refuse_foreign_token_shards()
        self.bos = document_bos(cfg.add_bos, tokenizer)
        self._state = initial_state(self.source_names, cfg.seq_len, seed, self.bos)

    def _refuse_foreign_token_shards(self) -> None:
        folder = local_tokenizer_dir(self.tokenizer)
        if folder is None:
            return  # not loaded from a local folder: `check_sources(cfg, tokenizer_dir)` is the check
        fingerprint = tokenizer_fingerprint(folder)
        problems = [p for p in (tokenizer_problem(i, fingerprint, folder) for i in self._indexes) if p]
        if problems:
            raise DatasetError("\n".join(problems))

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches from the current state on: a new iter() continues, it never restarts at batch 0."""
        dataset = _RankStream(
            self.cfg,
            self.tokenizer,
            self._indexes,
            seed=self.seed,
            micro_batch_size=self.micro_batch_size,
            rank=self.rank,
            world_size=self.world_size,
            total_tokens=self.total_tokens,
            state=self.state_dict(),
        )
        if self.cfg.num_workers > 0:
            # An own generator: otherwise creating the workers draws from the global torch RNG, and a resumed
            # run (which restores that RNG first) would see different dropout masks than an uninterrupted one.
            generator = torch.Generator().manual_seed(self.seed)
            source = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, generator=generator)
        else:
            source = dataset
        for batch, state in source:
            self._state = state
            yield batch

    def state_dict(self) -> dict:
        """JSON-serialisable state right after the last micro-batch yielded (all ranks' sequences included)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        state = extend_state(state, self.source_names)  # a cooldown branch may add anneal-only sources
        validate_state(state, self.source_names, self.cfg.seq_len, self.seed, self.bos)
        self._state = copy.deepcopy(state)
