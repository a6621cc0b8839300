"""Partitions per (model, layer), and the per-run context the assets share.

Keys are dynamic (`NEAR|layer_0`): the valid pairs are known only from the configuration,
the reference database (which models exist) and the query file (which layers it has), and
models have different layer sets — a model × layer grid would hold pairs that do not exist.
The sensor `reference_change_sensor` adds and removes keys as they change; `fantasia-assets
demo` (`demo.materialize_everything`) registers them before it materialises.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dagster as dg
from sqlalchemy.engine import Engine

from ..config import ConfigError, LookupConfig
from ..core import scratch
from ..core.lineage import CODE_VERSION, LineageRow
from ..core.plan import Partition, QuerySet, open_queries
from ..db.reads import annotation_version, model_types, reference_fingerprint
from ..db.stores import ReferenceStore
from ..paths import cache_dir, temp_dir
from ..runner import plan_partitions, reference_scope
from .resources import DEFAULT_CONFIG, LineageStore, LookupSettings, ReferenceDatabase

MODEL_LAYER = dg.DynamicPartitionsDefinition(name="model_layer")
_STORES: dict[tuple[int, str, int], ReferenceStore] = {}


def partition_key(partition: Partition) -> str:
    """`{model}|layer_{k}`, with the model's folder name: names Dagster would refuse are hashed."""
    return partition.key


@dataclass
class LookupState:
    """What one asset or sensor evaluation needs: config, database, queries, partitions."""

    config: LookupConfig
    engine: Engine

    @classmethod
    def open(cls, settings: LookupSettings, database: ReferenceDatabase) -> LookupState:
        """The step's configuration and database; a configuration error fails the step with its
        one-line message (and where the file's name came from), not a stack trace."""
        try:
            config = settings.load()
        except ConfigError as error:
            origin = ""
            if settings.config_path == DEFAULT_CONFIG and not os.environ.get("FANTASIA_CONFIG"):
                origin = (
                    f" (FANTASIA_CONFIG is not set: the default {DEFAULT_CONFIG} was read in {Path.cwd()})"
                )
            raise dg.Failure(f"{error}{origin}") from None
        scratch.use(temp_dir)  # the science code's scratch folders: under $FANTASIA_HOME/tmp
        return cls(config, database.engine())

    @cached_property
    def queries(self) -> QuerySet:
        return open_queries(self.config.embeddings_path, cache_dir("queries"))

    @cached_property
    def partitions(self) -> dict[str, Partition]:
        plan = plan_partitions(self.config, self.queries, model_types(self.engine))
        return {partition_key(p): p for p in plan}

    def partition(self, key: str) -> Partition:
        try:
            return self.partitions[key]
        except KeyError:
            raise dg.Failure(
                f"partition {key!r} is not a (model, layer) of the current configuration, reference "
                f"database and query file; current: {', '.join(self.partitions) or 'none'}"
            ) from None

    def reference_store(self) -> ReferenceStore:
        """This process's reference matrices, `lookup.lookup_cache_max` of them kept in memory.

        One store per process (and engine and limit): the steps of a run share the process
        (in-process executor), so `neighbour_hits` takes the matrix `reference_embeddings` just
        loaded from memory instead of reading the disk cache again.
        """
        where = cache_dir("references")
        key = (id(self.engine), str(where), self.config.lookup_cache_max)
        store = _STORES.get(key)
        if store is None or store.engine is not self.engine:  # an id reused by a later engine
            store = _STORES[key] = ReferenceStore(self.engine, where, self.config.lookup_cache_max)
        return store

    @cached_property
    def annotation_version(self) -> str:
        return annotation_version(self.engine)

    def reference_version(self, partition: Partition) -> str:
        """The data version of a partition's references: its embedding rows and annotations."""
        scope = reference_scope(self.config, partition)
        return f"{reference_fingerprint(self.engine, scope)}-{self.annotation_version}"

    def versions(self) -> dict[str, str]:
        """Reference version of every current partition."""
        return {key: self.reference_version(p) for key, p in self.partitions.items()}


def record_lineage(
    context, lineage: LineageStore, state: LookupState, rows: dict, timings: dict, partition=None
) -> str:
    """One row of the lineage table for this materialisation; returns the reference version.

    The code version is the asset's `code_version` when it has one, else the package's.
    """
    reference_version = (
        state.reference_version(partition) if partition is not None else state.annotation_version
    )
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or CODE_VERSION
    lineage.record(
        state.config,
        LineageRow(
            run_id=context.run.run_id,
            asset=context.asset_key.to_user_string(),
            partition=context.partition_key if context.has_partition_key else None,
            reference_version=reference_version,
            query_version=state.queries.content_hash,
            config_hash=state.config.fingerprint(),
            row_counts=rows,
            timings=timings,
            code_version=code_version,
        ),
    )
    return reference_version


def outputs_fingerprint(config: LookupConfig) -> str:
    """The run-wide outputs' settings, and the files they read by path: a scorer trained again or
    an ontology replaced at the same path changes predictions.tsv as a new path does, and a file
    missing at one tick (a failed run) and present at the next is a change too."""
    stamps = [config.results_fingerprint()]
    for path in (config.scoring.ontology, config.scoring.model):
        try:
            status = os.stat(path)
            stamps.append(f"{status.st_size}.{status.st_mtime_ns}.{status.st_ino}")
        except (TypeError, OSError):  # not set, or not there
            stamps.append("-")
    return hashlib.sha256("|".join(stamps).encode()).hexdigest()[:16]
