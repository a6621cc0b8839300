"""The whole-run lookup's writes after its last partition's raw rows, side by side.

Once the last partition's hits and raw rows Parquet are written (`incremental_write`), every
output left reads files already written and writes its own: the partition's CSV shards (when
written whole), its TopGO files and the ensemble (which may copy them: one stage), summary.csv,
sequences.fasta with the run records, and the partition's incremental state (whose row digests
were taken in a thread during the partition's outputs, `incremental_run`). They run in threads
(`core.timing.timed_concurrently`): the shards are thousands of system calls, the others mostly
polars, numpy and hashing, which leave the GIL; written one after another they left a core idle.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import polars as pl

from .config import LookupConfig
from .core import writers
from .core.plan import Partition, QuerySet
from .core.stages import SearchOutcome
from .core.timing import timed_concurrently
from .sequence_outputs import write_sequence_outputs


def sequences_read_ahead(background: Executor, sequences, outcome: SearchOutcome, whole: bool):
    """The `sequences` source of a partition's raw rows: when they are built `whole` (no stored
    state, `incremental_write`), the sequences of every neighbour are read from the database in
    `background` while the GO rows are joined, and the raw rows wait for them where they need
    them; the same {id: sequence} as asking then (`SequenceCache` fetches only what it lacks)."""
    if not whole:
        return sequences
    ahead = background.submit(sequences.get, outcome.hits["ref_idx"].to_numpy())

    def read(ids):
        ahead.result()
        return sequences(ids)

    return read


def write_side_by_side(
    config: LookupConfig,
    root: Path,
    queries: QuerySet,
    partitions: list[Partition],
    outputs,  # `incremental_write.OutputUpdates`
    updates,  # `incremental_run.PartitionUpdates`
    deferred: dict[str, Callable[[], None]],
    outcome: SearchOutcome,
    references: tuple[pl.DataFrame, object],
    timings: dict[str, float],
) -> dict:
    """Run the last writes side by side; their results by stage name. `deferred`: the last
    partition's "shards" and "topgo" left to write (none when written incrementally);
    `references`: the raw rows' ref_idx of every partition, and the `SequenceCache`."""
    raw_all, sequences = references
    last = partitions[-1]

    def fasta_and_mapping() -> list[Path]:  # spliced from the previous FASTA where the state proves it
        writers.write_run_records(root, queries, partitions, outputs.shard_names)
        return write_sequence_outputs(config, root, queries, raw_all, sequences, updates.full)

    def topgo() -> None:  # the ensemble of one partition written whole copies its TopGO files
        deferred.get("topgo", lambda: None)()
        outputs.write_ensemble(root, partitions)

    stages: dict[str, Callable] = {"write partition": deferred["shards"]} if "shards" in deferred else {}
    stages["summary"] = lambda: outputs.write_summary(root, partitions)
    if config.topgo:
        stages["topgo ensemble"] = topgo
    stages["fasta+mapping"] = fasta_and_mapping
    stages["incremental state"] = lambda: updates.stage(root, last)  # the state that proves its outputs
    # the last partition's own stages are timed with its others
    into = {"write partition": outcome.timings, "incremental state": outcome.timings}
    return timed_concurrently(timings, stages, into)
