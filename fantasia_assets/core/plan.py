"""What a lookup computes: the query set (unique sequences) and its partitions, one per
(model, layer) present both in the reference database and in the query file."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

from . import exports
from .digest import file_digest
from .queries import ACCESSION_PREFIX, EmbeddingCatalogue, EmbeddingFileError, scan, scan_cached
from .sequences import warn_unusable_queries

log = logging.getLogger(__name__)


class LookupPlanError(FantasiaError, RuntimeError):
    """The lookup cannot run as configured (no usable model or layer)."""


@dataclass
class QuerySet:
    """The query file: its catalogue, and unique sequences (query_idx) shared by accessions."""

    catalogue: EmbeddingCatalogue
    query_idx: np.ndarray  # int64 per catalogue row: index of its unique sequence
    sequences: list[str]  # unique sequences, by query_idx
    content_hash: str

    @property
    def path(self) -> Path:
        return self.catalogue.path

    @cached_property
    def shard_names(self) -> dict[str, str]:
        """Accession → raw shard file name: sanitised, and unique even on case-blind file systems."""
        return exports.unique_file_names(self.catalogue.accessions, ".csv")

    def mapping(self) -> pl.DataFrame:
        """query_index_mapping.csv: query_idx, query_fasta_id, accessions, sequence_length."""
        frame = pl.DataFrame(
            {"query_idx": self.query_idx, "accession": self.catalogue.accessions},
            schema={"query_idx": pl.Int64, "accession": pl.String},
        )
        return (
            frame.group_by("query_idx")
            .agg(pl.col("accession").sort().str.join("|").alias("accessions"))
            .sort("query_idx")
            .with_columns(
                (pl.lit("Q") + pl.col("query_idx").cast(pl.String)).alias("query_fasta_id"),
                pl.Series("sequence_length", [len(s) for s in self.sequences], dtype=pl.Int64),
            )
            .select("query_idx", "query_fasta_id", "accessions", "sequence_length")
        )


def open_queries(path: Path, cache_dir: Path | None = None) -> QuerySet:
    """Scan the query HDF5 and number its unique sequences in order of first appearance."""
    if cache_dir is not None:
        catalogue, digest = scan_cached(path, cache_dir)
    else:
        catalogue, digest = scan(path), file_digest(path)
    if not catalogue.accessions:
        detail = ""
        if catalogue.skipped:
            group, reason = catalogue.skipped[0]
            detail = f"; {len(catalogue.skipped)} groups unusable, first {group}: {reason}"
        raise EmbeddingFileError(
            f"{path}: no query proteins (no usable '{ACCESSION_PREFIX}<ID>' group){detail}"
        )
    _warn_mapped_duplicates(catalogue)
    warn_unusable_queries(
        catalogue.path, zip(map(catalogue.group, range(len(catalogue.sequences))), catalogue.sequences)
    )
    index: dict[str, int] = {}
    query_idx = np.empty(len(catalogue.accessions), dtype=np.int64)
    for row, sequence in enumerate(catalogue.sequences):  # clean already: same residues, same index
        query_idx[row] = index.setdefault(sequence, len(index))
    return QuerySet(catalogue, query_idx, list(index), digest)


def _warn_mapped_duplicates(catalogue: EmbeddingCatalogue) -> None:
    """Warn about groups that name the same protein once '|' is written as '_' (SPEC §2.1).

    Both are kept as separate queries under their own names (their output files differ too);
    the warning tells the user the file probably holds one protein twice.
    """
    seen: dict[str, str] = {}
    for accession in catalogue.accessions:
        mapped = accession.replace("|", "_")
        if mapped in seen:
            log.warning(
                "%s: groups %s%s and %s%s are the same accession once '|' is written as '_'; "
                "both are kept as separate queries",
                catalogue.path, ACCESSION_PREFIX, seen[mapped], ACCESSION_PREFIX, accession,
            )  # fmt: skip
        else:
            seen[mapped] = accession


@dataclass(frozen=True)
class ModelSpec:
    """What the lookup needs of one enabled model: its name, threshold, batch size and layers."""

    name: str
    distance_threshold: float | None = None
    batch_size: int | None = None
    layer_index: tuple[int, ...] | None = (0,)  # None: every layer in the query file


@dataclass(frozen=True)
class Partition:
    """One (model, layer) of the lookup."""

    model: ModelSpec
    type_id: int
    layer: int | None

    @property
    def key(self) -> str:
        """`{model}|layer_{k}` with the model's folder name: the one key of a partition, in
        reports, skipped_queries.csv and Dagster alike (names Dagster would refuse are hashed)."""
        return f"{exports.model_dir_name(self.model.name)}|{exports.layer_dir_name(self.layer)}"

    def relative_dir(self) -> Path:
        return Path(exports.model_dir_name(self.model.name)) / exports.layer_dir_name(self.layer)


def plan_partitions(models: Iterable[ModelSpec], queries: QuerySet, types: dict[str, int]) -> list[Partition]:
    """The enabled `models` known to the database × requested layers present in the query file."""
    partitions = []
    known = set(types.values())
    for type_id in queries.catalogue.type_ids():
        if type_id not in known:
            log.warning(
                "%s: type_%d embeddings match no model of the reference database (known: %s); ignored",
                queries.path, type_id, ", ".join(f"{n}=type_{i}" for n, i in sorted(types.items())) or "none",
            )  # fmt: skip
    for model in models:
        if model.name not in types:
            log.warning(
                "model %r is enabled but not in the reference database (known: %s); skipped",
                model.name, ", ".join(sorted(types)) or "none",
            )  # fmt: skip
            continue
        type_id = types[model.name]
        available = queries.catalogue.layer_indices(type_id)
        requested = list(model.layer_index) if model.layer_index is not None else available
        effective = [layer for layer in requested if layer in available]
        log.info(
            "model %s (type_%d): layers requested %s, in the query file %s, used %s",
            model.name, type_id, requested, available, effective,
        )  # fmt: skip
        missing = [layer for layer in requested if layer not in available]
        if not available:
            log.warning(
                "model %s: %s has no type_%d embeddings at all; model skipped",
                model.name,
                queries.path,
                type_id,
            )
        elif missing:
            log.warning("model %s: layers %s are not in %s; skipped", model.name, missing, queries.path)
        partitions.extend(Partition(model, type_id, layer) for layer in effective)
    return partitions
