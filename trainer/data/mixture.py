"""The global sequence stream: token-exact mixing of sources, packing into seq_len, and its exact state.

The stream is a deterministic function of (config, seed): every rank and loader worker can compute it,
and a state taken between two sequences resumes it exactly. Packing follows Megatron with
reset_position_ids: documents + EOS are concatenated, position_ids restart at 0 at every segment (a
document start, or the continuation of a long document at the start of the next sequence).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from cpt.trainer.conventions import document_bos
from cpt.trainer.data.config import DataConfig
from cpt.trainer.data.schedule import pick_source, target_shares
from cpt.trainer.data.sources import SourceDocs, SourceIndex

# 2: rows are shuffled inside each (shard, row-block) unit, so a version-1 state would resume another order.
STATE_VERSION = 2


@dataclass
class Sequence:
    """One packed sequence: token ids, per-segment positions, per-token source index, and its segments."""

    index: int
    input_ids: np.ndarray | None
    position_ids: np.ndarray | None
    source_ids: np.ndarray | None
    segments: list[list]  # [[source name, doc id, n_tokens], ...]


def initial_state(names: list[str], seq_len: int, seed: int, bos: int | None = None) -> dict:
    """The state of a stream before its first sequence."""
    return {
        "version": STATE_VERSION,
        "seed": seed,
        "seq_len": seq_len,
        "bos": bos,  # the token put in front of every document (None: none), see cpt.trainer.conventions
        "sources": list(names),
        "sequence": 0,  # global index of the next sequence
        # Per source: [epoch, position in the epoch's order, tokens of that document already emitted].
        "cursors": [[0, 0, 0] for _ in names],
        "consumed": [0 for _ in names],  # tokens (EOS included) drawn from each source
        "owed": [0.0 for _ in names],  # the target share of each source integrated over the tokens drawn
        "open": None,  # the source whose current document is partly emitted
        "done": False,  # a finite source ran out: the stream has ended
    }


def extend_state(state: dict, names: list[str]) -> dict:
    """A state of a stream whose sources are a prefix of `names`, with the new sources not yet drawn from.

    This is how a cooldown branch adds its anneal-only sources to a checkpoint of the stable phase.
    """
    old = list(state.get("sources") or [])
    if old == list(names) or old != list(names)[: len(old)]:
        return state
    new = len(names) - len(old)
    state = copy.deepcopy(state)
    state["sources"] = list(names)
    state["cursors"] = state["cursors"] + [[0, 0, 0] for _ in range(new)]
    state["consumed"] = state["consumed"] + [0] * new
    state["owed"] = state["owed"] + [0.0] * new
    return state


def anneal_start_tokens(cfg: DataConfig, total_tokens: int | None) -> int | None:
    """The stream token from which documents come from the anneal mixture; None without an anneal."""
    if cfg.anneal is None:
        return None
    if not isinstance(cfg.anneal.start, float) or not total_tokens:
        raise ValueError(
            "data.anneal.start: decay is resolved from the LR schedule by `cpt train`; pass a fraction of the run "
            "and total_tokens to use an anneal here"
        )
    return int(round(cfg.anneal.start * total_tokens))


def validate_state(state: dict, names: list[str], seq_len: int, seed: int, bos: int | None = None) -> None:
    """Refuse a state taken from another mixture: resuming it would silently change the data order."""
    expected = {"version": STATE_VERSION, "sources": list(names), "seq_len": seq_len, "seed": seed, "bos": bos}
    wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if wrong:
        details = "; ".join(f"{k}: state has {got!r}, config has {want!r}" for k, (got, want) in wrong.items())
        raise ValueError(f"mixture state does not match this data config ({details}); resume with the same config")


class MixtureStream:
    """Packed sequences drawn from several sources at token-exact target shares."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        seed: int,
        total_tokens: int | None = None,
        state: dict | None = None,
        indexes: list[SourceIndex] | None = None,
    ):
        self.cfg, self.seed, self.total_tokens = cfg, seed, total_tokens
        sources = cfg.stream_sources()
        self.names = [s.name for s in sources]
        self.weights = [s.weight if i < len(cfg.sources) else 0.0 for i, s in enumerate(sources)]
        self.finite = [s.finite for s in sources]
        self.anneal_start = anneal_start_tokens(cfg, total_tokens)
        if cfg.anneal is not None:
            anneal = {s.name: s.weight for s in cfg.anneal.sources}
            self.anneal_weights = [anneal.get(name, 0.0) for name in self.names]
        paths = {s.name: s.path for s in sources}
        indexes = indexes or [SourceIndex(name, paths[name]) for name in self.names]
        self.bos = document_bos(cfg.add_bos, tokenizer)
        self.docs = [SourceDocs(index, tokenizer, seed, cfg.shuffle_buffer, self.bos) for index in indexes]
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
        if state is None:
            state = initial_state(self.names, cfg.seq_len, seed, self.bos)
        state = extend_state(state, self.names)
        validate_state(state, self.names, cfg.seq_len, seed, self.bos)
        self.state = copy.deepcopy(state)

    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def targets(self) -> list[float]:
        consumed = sum(self.state["consumed"])  # = the stream token at which the next document starts
        if self.anneal_start is None or consumed < self.anneal_start:
            return target_shares(self.names, self.weights, self.cfg.schedule, consumed, self.total_tokens)
        # The anneal phase: its own weights and schedule, with progress measured from its start.
        start, total = self.anneal_start, self.total_tokens
        schedule = self.cfg.anneal.schedule
        return target_shares(self.names, self.anneal_weights, schedule, consumed - start, total - start)

    def _open_next_document(self) -> bool:
        """Choose the lagging source and start its next document; False when a finite source ran out."""
        state = self.state
        targets = self.targets()
        source = pick_source(targets, state["owed"], state["consumed"])
        cursor = state["cursors"][source]
        if cursor[1] >= self.docs[source].num_docs:
            if self.finite[source]:
                state["done"] = True
                return False
            cursor[0], cursor[1] = cursor[0] + 1, 0  # a new epoch, in a newly shuffled order
        _, tokens = self.docs[source].doc(cursor[0], cursor[1])
        length = len(tokens) + 1
        state["consumed"][source] += length
        state["owed"] = [due + share * length for due, share in zip(state["owed"], targets)]
        cursor[2] = 0
        state["open"] = source
        return True

    def next_sequence(self, materialize: bool = True) -> Sequence | None:
        """The next packed sequence (arrays only when `materialize`), or None once a finite source ran out.

        The final partial sequence of a finite run is dropped: it has fewer than seq_len real tokens.
        """
        state, seq_len = self.state, self.cfg.seq_len
        if state["done"]:
            return None
        saved = copy.deepcopy(state) if any(self.finite) else None
        segments, pieces, filled = [], [], 0
        while filled < seq_len:
            if state["open"] is None and not self._open_next_document():
                # Keep the cursors as they were: the dropped tail is not counted as consumed.
                self.state = saved
                self.state["done"] = True
                return None
            source = state["open"]
            cursor = state["cursors"][source]
            doc_id, tokens = self.docs[source].doc(cursor[0], cursor[1])
            length = len(tokens) + 1
            take = min(length - cursor[2], seq_len - filled)
            if materialize:
                pieces.append((source, cursor[2], take, tokens))
            segments.append([self.names[source], doc_id, take])
            cursor[2] += take
            filled += take
            if cursor[2] == length:
                cursor[1], cursor[2] = cursor[1] + 1, 0
                state["open"] = None
        index = state["sequence"]
        state["sequence"] += 1
        if not materialize:
            return Sequence(index, None, None, None, segments)
        return Sequence(index, *self._assemble(pieces), segments)

    def _assemble(self, pieces: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, positions, sources = [], [], []
        for source, start, take, tokens in pieces:
            stop = start + take
            body = tokens[start : min(stop, len(tokens))]
            ids.append(body)
            if stop > len(tokens):  # this segment ends the document: append its EOS
                ids.append(np.asarray([self.eos], dtype=np.int64))
            positions.append(np.arange(take, dtype=np.int64))
            sources.append(np.full(take, source, dtype=np.int64))
        return np.concatenate(ids), np.concatenate(positions), np.concatenate(sources)
