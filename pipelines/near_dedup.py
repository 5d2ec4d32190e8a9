"""Near-duplicate removal (MinHash LSH) and eval-set decontamination, as Beam composites.

Near dedup, in four Beam stages (the datatrove recipe, with no worker holding all signatures):

    live docs -> Signature (DoFn: word/char shingles -> seeded MinHash, b bands x r rows)
              -> band keys -> GroupByKey -> candidate edges (all pairs in small groups, a star to the
                 group's smallest id in huge ones; each verified by estimated Jaccard)
              -> union-find over the edges in a CombineFn -> (doc, component root) labels
              -> joined back to the docs: the smallest id of each component is kept, every other
                 member is rejected as `near_duplicate` with `duplicate_of` = the kept id.

Signatures come from datasketch; the banding and the components are written here because datasketch's
MinHashLSH keeps every signature in one in-memory index, which no worker may hold at corpus scale.

Decontamination joins the training documents' word 13-grams with those of prepared eval datasets
(a GroupByKey on the n-gram hash, never a side input): a training document sharing at least
`min_overlap` of them with an eval document is rejected as `contaminated`, `duplicate_of` = the eval id.

Both normalise the text the same way (NFKC, casefold, \\w+ words), so the two sides always match.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from cpt.pipelines.faults import Faults
from cpt.pipelines.shuffle import FileGroupByKey, channels, each
from cpt.pipelines.text import normalize_for_dedup
from cpt.pipelines.transforms import REJECTED, dead_letter, is_live

NEAR_DUPLICATE, CONTAMINATED = "near_duplicate", "contaminated"
_WORD = re.compile(r"\w+")
# A document's root carries its component size to the writer (not a column: only the run summary reads it).
CLUSTER_FIELD = "near_dup_cluster"


# ---- pure functions ----


def words(text: str) -> list[str]:
    """The normalised words of a text: NFKC, casefold, runs of word characters (punctuation dropped)."""
    return _WORD.findall(normalize_for_dedup(text))


def shingles(text: str, n: int, unit: str = "word") -> set[bytes]:
    """The set of word (or character) n-grams of the normalised text, UTF-8 encoded.

    A text shorter than n units is one shingle (so short near-identical texts still match); a text
    with no words has none, and is never a near duplicate of anything.
    """
    if unit == "char":
        chars = " ".join(words(text))
        grams = [chars[i : i + n] for i in range(max(1, len(chars) - n + 1))] if chars else []
    else:
        tokens = words(text)
        grams = [" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))] if tokens else []
    return {g.encode("utf-8", "surrogatepass") for g in grams}


def word_ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the distinct word n-grams of the normalised text (the decontamination keys)."""
    tokens = words(text)
    grams = {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    return {int.from_bytes(hashlib.blake2b(g.encode("utf-8", "surrogatepass"), digest_size=8).digest()) for g in grams}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class Signer:
    """Seeded MinHash signatures through datasketch (affine32: sha1 of each shingle, fixed permutations).

    The permutations come from numpy's RandomState(seed), so every process on every machine computes
    the same signature for the same shingles.
    """

    def __init__(self, num_perm: int, seed: int):
        from datasketch import MinHash

        self._minhash = MinHash
        self.num_perm, self.seed = num_perm, seed
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations

    def __call__(self, grams: Iterable[bytes]) -> np.ndarray:
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, permutations=self._permutations, scheme="affine32")
        m.update_batch(list(grams))  # MinHash is a min per permutation: the order does not matter
        return np.asarray(m.hashvalues, dtype="<u4")


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[str]:
    """One key per band: its index and a digest of its r hash values (little-endian bytes: machine-independent)."""
    sig = np.asarray(signature, dtype="<u4")
    digest = [hashlib.blake2b(sig[i * rows : (i + 1) * rows].tobytes(), digest_size=8) for i in range(bands)]
    return [f"{i}:{d.hexdigest()}" for i, d in enumerate(digest)]


def estimated_jaccard(a: bytes, b: bytes) -> float:
    """The share of equal MinHash values of two signatures (stored as little-endian uint32 bytes)."""
    return float(np.mean(np.frombuffer(a, dtype="<u4") == np.frombuffer(b, dtype="<u4")))


def band_edges(members: Iterable[tuple], max_pairs_group: int, verify_threshold: float | None) -> list[tuple]:
    """Candidate edges of one band group of (node, signature bytes): verified by estimated Jaccard.

    Up to `max_pairs_group` members: every pair. A larger group (boilerplate shared by thousands of
    documents) gives a star from its smallest node to each other member, so the work stays linear.
    """
    head = list(itertools.islice(iter(members), max_pairs_group + 1))
    if len(head) <= max_pairs_group:
        ordered = sorted(dict(head).items())
        pairs = itertools.combinations(ordered, 2)
    else:
        # A second pass over the (re-iterable) group instead of materialising it all.
        root = min(members, key=lambda m: m[0])
        pairs = ((root, m) for m in members if m[0] != root[0])
    edges = set()
    for (a, sig_a), (b, sig_b) in pairs:
        if verify_threshold is None or estimated_jaccard(sig_a, sig_b) >= verify_threshold:
            edges.add((a, b) if a < b else (b, a))
    return sorted(edges)


def _find(parent: dict, node):
    root = node
    while parent[root] != root:
        root = parent[root]
    while parent[node] != root:  # path compression
        parent[node], node = root, parent[node]
    return root


def _union(parent: dict, a, b) -> None:
    parent.setdefault(a, a)
    parent.setdefault(b, b)
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        # The smaller node becomes the root: a component's root is its smallest member, whatever the edge order.
        parent[max(ra, rb)] = min(ra, rb)


def components(parent: dict) -> list[tuple]:
    """(node, root, component size) for every node of a union-find forest, sorted by node."""
    roots = {node: _find(parent, node) for node in parent}
    sizes: dict = {}
    for root in roots.values():
        sizes[root] = sizes.get(root, 0) + 1
    return [(node, root, sizes[root]) for node, root in sorted(roots.items())]


class ComponentsFn(beam.CombineFn):
    """Union-find over candidate edges; the output labels each node with its component's smallest node.

    Only nodes that have an edge are held (not the signatures), and the result does not depend on how
    the runner splits and merges the accumulators.
    """

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, parent: dict, edge: tuple) -> dict:
        _union(parent, *edge)
        return parent

    def merge_accumulators(self, accumulators) -> dict:
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for other in accumulators:
            for node in other:
                _union(merged, node, _find(other, node))
        return merged

    def extract_output(self, parent: dict) -> list[tuple]:
        return components(parent)


def node_key(doc: dict) -> tuple:
    """A document's identity for the joins, ordered like the writer's rows: (id, source, offset)."""
    return doc["id"], doc.get("source") or "", doc.get("offset") or 0


def lsh_params(num_perm: int, threshold: float, false_negative_weight: float) -> tuple[int, int]:
    """(bands, rows) for a Jaccard threshold, from datasketch's own optimiser (the one MinHashLSH uses)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1.0 - false_negative_weight, false_negative_weight)


# ---- Beam side ----


class SignatureBands:
    """doc -> [(band key, (node, signature bytes))] for a live document with words; nothing otherwise."""

    def __init__(self, ngram: int, unit: str, num_perm: int, seed: int, bands: int, rows: int):
        self.ngram, self.unit, self.num_perm, self.seed = ngram, unit, num_perm, seed
        self.bands, self.rows = bands, rows
        self._signer = None

    def __call__(self, doc: dict) -> list[tuple]:
        if not is_live(doc):
            return []
        grams = shingles(doc["text"], self.ngram, self.unit)
        if not grams:
            return []
        if self._signer is None:
            self._signer = Signer(self.num_perm, self.seed)
        signature = self._signer(grams)
        value = (node_key(doc), signature.tobytes())
        return [(key, value) for key in band_keys(signature, self.bands, self.rows)]


BANDS_FIELD = "_near_dedup_bands"  # the band keys travel with the document until the join strips them


class SignDoc:
    """Attach a live document's band keys, or dead-letter it when signing fails (one record, not the job)."""

    def __init__(self, signer: SignatureBands, faults: Faults | None = None):
        self.signer = signer
        self.faults = Faults.from_env() if faults is None else faults

    def __call__(self, doc: dict) -> dict:
        if not is_live(doc):
            return doc
        try:
            self.faults.check("near_dedup", doc["id"])
            return {**doc, BANDS_FIELD: self.signer(doc)}
        except Exception as err:  # noqa: BLE001 - as in FilterDoFn: a crash on one document dead-letters it
            return dead_letter(doc, "near_dedup", repr(err))


def strip_bands(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != BANDS_FIELD} if BANDS_FIELD in doc else doc


_NEAR_DUPS = Metrics.counter("near_dedup", NEAR_DUPLICATE)
_CONTAMINATED = Metrics.counter("decontaminate", CONTAMINATED)


def _join_labels(item, decide) -> list[dict]:
    """(node, [("doc", doc) | ("label", label)]) -> the document, decided by `decide(doc, node, label)` if live."""
    node, values = item
    docs, labels = [], []
    for tag, value in values:
        (docs if tag == "doc" else labels).append(value)
    return [decide(doc, node, labels[0]) if labels and is_live(doc) else doc for doc in docs]


def _decide_near_dup(doc: dict, node: tuple, label: tuple) -> dict:
    root, size = label
    if root == node:
        return {**doc, CLUSTER_FIELD: size}
    _NEAR_DUPS.inc()
    return {**doc, "status": REJECTED, "reason": NEAR_DUPLICATE, "duplicate_of": root[0]}


def _decide_contaminated(doc: dict, node: tuple, label: tuple) -> dict:
    _CONTAMINATED.inc()
    return {**doc, "status": REJECTED, "reason": CONTAMINATED, "duplicate_of": label}


class JoinLabels(beam.PTransform):
    """Join per-node labels onto the live documents (one GroupByKey); decided records pass through unchanged.

    Every record goes through the join, decided ones under their own node (labels name live documents only):
    no Flatten of records after it, which FnApiRunner would hold in the runner (see cpt.pipelines.shuffle).
    """

    def __init__(self, labels, decide, shuffle=None, name: str = "join"):
        super().__init__()
        self.labels, self.decide = labels, decide
        self.shuffle, self.name = shuffle, name

    def expand(self, docs):
        keyed = each(docs, "KeyDocs", lambda: beam.Map(lambda d: (node_key(d), ("doc", d))))
        labels = self.labels | "TagLabels" >> beam.MapTuple(lambda node, label: (node, ("label", label)))
        return (
            (*channels(keyed), labels)
            | "ByNode" >> FileGroupByKey(self.shuffle, self.name)
            | "Decide" >> beam.FlatMap(_join_labels, self.decide)
        )


class NearDedup(beam.PTransform):
    """MinHash LSH near dedup: signatures, band groups, verified edges, components, smallest id kept."""

    def __init__(self, cfg, shuffle=None):
        super().__init__()
        self.cfg, self.shuffle = cfg, shuffle

    def expand(self, docs):
        c = self.cfg
        bands, rows = c.lsh_params()
        verify = c.verify_threshold if c.verify else None
        signer = SignDoc(SignatureBands(c.ngram, c.unit, c.num_perm, c.seed, bands, rows))
        signed = each(docs, "Sign", lambda: beam.Map(signer))
        edges = (
            each(signed, "Signatures", lambda: beam.FlatMap(lambda d: d.get(BANDS_FIELD, ())))
            | "ByBand" >> FileGroupByKey(self.shuffle, "near_dedup_bands")
            | "Edges" >> beam.FlatMap(lambda item: band_edges(item[1], c.max_pairs_group, verify))
        )
        labels = (
            edges
            | "Components" >> beam.CombineGlobally(ComponentsFn())
            | "Labels" >> beam.FlatMap(lambda rows_: [(node, (root, size)) for node, root, size in rows_])
        )
        join = JoinLabels(labels, _decide_near_dup, self.shuffle, "near_dedup_join")
        return each(signed, "Strip", lambda: beam.Map(strip_bands)) | "Join" >> join


def eval_ngrams(url: str, ngram: int) -> list[tuple[int, str]]:
    """(n-gram hash, eval id) for every distinct word n-gram of every row of one eval shard."""
    from cpt.shared import dataset

    out = []
    for row in dataset.read_shard(url).select(["id", "text"]).to_pylist():
        out += [(h, row["id"]) for h in word_ngram_hashes(row["text"] or "", ngram)]
    return out


def train_ngrams(doc: dict, ngram: int) -> list[tuple[int, tuple]]:
    if not is_live(doc):
        return []
    node = node_key(doc)
    return [(h, ("train", node)) for h in word_ngram_hashes(doc["text"], ngram)]


def _matches(item, max_train_docs: int = 0) -> list[tuple]:
    """One n-gram's group: (train node, eval id) for every training document that shares it with an eval doc.

    An n-gram found in more than `max_train_docs` training documents (0 = no limit) is template text, not a
    leaked eval passage, and matches nothing (GPT-3's rule: ignore 13-grams of more than 10 training documents).
    """
    _, values = item
    eval_ids = [v[1] for v in values if v[0] == "eval"]
    if not eval_ids:
        return []
    train = [v[1] for v in values if v[0] == "train"]
    if max_train_docs and len(train) > max_train_docs:
        return []
    first = min(eval_ids)
    return [(node, (1, first)) for node in train]


def _sum_matches(values) -> tuple[int, str]:
    """(shared n-grams, smallest eval id) of one training document."""
    values = list(values)
    return sum(n for n, _ in values), min(e for _, e in values)


class Decontaminate(beam.PTransform):
    """Reject training documents sharing >= min_overlap word n-grams with the eval shards (a join on the n-gram)."""

    def __init__(self, eval_shards: list[str], ngram: int, min_overlap: int, max_train_docs: int = 10, shuffle=None):
        super().__init__()
        self.shuffle = shuffle
        self.eval_shards, self.ngram, self.min_overlap = list(eval_shards), ngram, min_overlap
        self.max_train_docs = max_train_docs

    def expand(self, docs):
        n, min_overlap = self.ngram, self.min_overlap
        evals = (
            docs.pipeline
            | "EvalShards" >> beam.Create(self.eval_shards)
            | "EvalNgrams" >> beam.FlatMap(eval_ngrams, n)
            | "SmallestEvalId" >> beam.CombinePerKey(min)
            | "TagEval" >> beam.MapTuple(lambda h, eval_id: (h, ("eval", eval_id)))
        )
        train = each(docs, "TrainNgrams", lambda: beam.FlatMap(train_ngrams, n))
        labels = (
            (evals, *channels(train))
            | "ByNgram" >> FileGroupByKey(self.shuffle, "decontaminate_ngrams")
            | "Matches" >> beam.FlatMap(_matches, self.max_train_docs)
            | "PerDoc" >> beam.CombinePerKey(_sum_matches)
            | "Enough" >> beam.Filter(lambda kv: kv[1][0] >= min_overlap)
            | "EvalId" >> beam.MapTuple(lambda node, match: (node, match[1]))
        )
        return docs | "Join" >> JoinLabels(labels, _decide_contaminated, self.shuffle, "decontaminate_join")


# ---- reporting: per shard in the writer, merged by the launcher ----

SAMPLE_PAIRS = 5


def shard_stats(records: list[dict]) -> dict:
    """Near-dup clusters whose kept document lands in this shard, and the first (kept id, rejected id) pairs."""
    sizes = [r[CLUSTER_FIELD] for r in records if r.get(CLUSTER_FIELD)]
    pairs = sorted((r["duplicate_of"], r["id"]) for r in records if r.get("reason") == NEAR_DUPLICATE)
    return {"clusters": len(sizes), "largest": max(sizes, default=0), "pairs": [list(p) for p in pairs[:SAMPLE_PAIRS]]}


def merge_stats(shard_infos: list[dict]) -> dict:
    """The run's near-dup report from the shards' stats: clusters, largest cluster, sample pairs."""
    stats = [info["near_dedup"] for info in shard_infos if "near_dedup" in info]
    pairs = sorted(tuple(p) for s in stats for p in s["pairs"])[:SAMPLE_PAIRS]
    return {
        "clusters": sum(s["clusters"] for s in stats),
        "largest_cluster": max((s["largest"] for s in stats), default=0),
        "sample_pairs": [list(p) for p in pairs],
    }
