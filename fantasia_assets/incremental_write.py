"""Incremental outputs of a whole-run lookup: rebuild only the accessions whose inputs changed.

`runner.run_lookup` writes each partition and the run-wide files through `OutputUpdates`. For a
partition whose neighbours came from a usable stored state (`incremental_run`), with the same
output settings, it finds the accessions whose outputs can change (`core.incremental_outputs`),
builds their raw rows, shards and TopGO lines with the full run's own functions, and keeps
every other accession's lines and shard files as they were: the raw rows Parquet is the
previous one with those accessions' rows replaced; the published shard folder is patched at
publication (rebuilt files moved in, dropped ones removed, the rest never touched); TopGO files
and summary.csv are spliced at line level. Anything that cannot be proven
the same — no state, other settings, a file that is not the one the state recorded, a splice
that does not fit — takes the full path for that output, and the reason is logged.

Besides each partition's state (`core.incremental`), the run stages:
- ``state/{model}/{layer}/annotations.parquet``: per reference sequence that is a neighbour, a
  digest of its annotation rows (what the next run compares after an annotation change);
- ``state/{model}/{layer}/shards.parquet``: each shard's file name and (size, mtime, inode);
- ``state/run.json``: the partitions, output settings and (size, mtime, inode) and SHA-256 of
  summary.csv and every TopGO file, which a splice reads back, and the (size, mtime, inode) of
  each partition's raw rows Parquet, so that it is never trusted beside another run's states;
- ``state/lines.parquet``: where each accession's lines lie in those files (`incremental_lines`),
  so that a splice parses only the rebuilt lines.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from . import incremental_lines as lines_
from .config import LookupConfig
from .core import ahead, exports, incremental, writers
from .core import incremental_outputs as io_
from .core.aggregate import SummaryFile
from .core.layout import ENSEMBLE, SUMMARY, partition_files, partition_paths
from .core.lineage import CODE_VERSION
from .core.plan import Partition, QuerySet
from .core.stages import RAW_ROWS_CODE_VERSION, SearchOutcome
from .core.timing import timed

log = logging.getLogger(__name__)

RUN_STATE = incremental.STATE_ROOT / "run.json"
RUN_FORMAT = f"incremental-outputs-3|{writers.OUTPUT_FORMAT_VERSION}|{CODE_VERSION}"
SCRATCH = ".incremental"  # under the staging root: subsets built there, never published


def outputs_hash(config: LookupConfig, partition: bool = False) -> str:
    """The settings the outputs read beyond the neighbours: the query file is not one of them
    (queries are compared by digest, shard names one by one), nor are the settings of speed
    alone; with the version of the code that builds raw rows. With `partition`, those of one
    partition's outputs (raw rows, shards, TopGO files: not summary or scoring settings)."""
    import dataclasses

    neutral = Path("path")
    settings = dataclasses.replace(config, experiment_path=neutral, embeddings_path=neutral)
    return f"{settings.results_fingerprint(partition=partition)}|{RAW_ROWS_CODE_VERSION}"


class OutputUpdates:
    """Writes each partition's outputs and the run-wide summary and ensemble, incrementally where
    it can; `subset` holds the accessions rebuilt per partition (None: all of them)."""

    def __init__(self, config: LookupConfig, updates, annotations: pl.DataFrame, shard_names: dict[str, str]):
        self.config = config
        self.updates = updates  # `incremental_run.PartitionUpdates`
        self.annotations = annotations
        self.shard_names = shard_names
        self.published = config.experiment_path
        self.subset: dict[str, set[str] | None] = {}
        # shard folders published file by file (`RunStaging.publish`): folder → names removed
        self.patches: dict[Path, list[str]] = {}
        self.outputs = outputs_hash(config)
        self.partition_outputs = outputs_hash(config, partition=True)
        self._with_state: set[str] = set()  # partitions whose state is staged (not per-aspect)
        self._rebuilt_rows: dict[str, int] = {}  # of the partitions written incrementally
        self._staged: list[Path] = []  # the run-wide state files `stage` wrote, for `publish`
        self._partitions: list[Partition] | None = None  # set by `stage`
        self._widened = threading.Lock()  # `_splice_plan` widens the subsets once
        # the line index and digest of every file written, by relative path; one dict per stage
        # (the summary and the ensemble are written side by side)
        self._recorded: dict[str, dict[str, lines_.Recorded | None]] = {
            "partitions": {},
            "summary": {},
            "ensemble": {},
        }
        self._indexes: dict[str, lines_.Recorded] = {}  # the previous files', when the state holds
        self._run_state = self._read_run_state()

    # -- state --------------------------------------------------------------------------------

    def _read_run_state(self) -> dict | None:
        """state/run.json when every file it records is still the one it recorded (and their
        line indexes are intact); else None, the reason logged."""
        checked = lines_.check_run_state(self.published, RUN_STATE, RUN_FORMAT, self.outputs)
        if isinstance(checked, str):
            log.info("incremental outputs: %s", checked)
            return None
        state, self._indexes = checked
        return state

    def annotation_digests(self, hits: pl.DataFrame) -> pl.DataFrame:
        """The annotation digests of the references `hits` names. Only a neighbour's annotations
        reach the outputs, and a reference that is not one now but becomes one later changes
        that query's hits, which rebuilds its outputs anyway: its digest would never be read
        (absent from the stored digests, it reads as changed, a superset). Half the table or
        less, at FANTASIA's scale."""
        named = self.annotations.filter(pl.col("sequence_id").is_in(hits["ref_idx"].unique().implode()))
        return io_.annotation_digests(named)

    def carried_digests(self, stored: pl.DataFrame, hits: pl.DataFrame) -> pl.DataFrame:
        """`annotation_digests(hits)` when the annotations are those `stored` was taken of: its
        rows for the references `hits` names, the others' digested now (the same table as a
        fresh run's state)."""
        named = hits["ref_idx"].unique().implode()
        new = pl.col("sequence_id").is_in(named) & ~pl.col("sequence_id").is_in(
            stored["sequence_id"].implode()
        )
        digested = io_.annotation_digests(self.annotations.filter(new))
        return pl.concat([stored.filter(pl.col("sequence_id").is_in(named)), digested]).sort("sequence_id")

    def _stored_extras(self, partition: Partition) -> tuple[pl.DataFrame, pl.DataFrame] | None:
        folder = self.published / incremental.state_dir(partition)
        try:
            digests = pl.read_parquet(folder / "annotations.parquet")
            shards = pl.read_parquet(folder / "shards.parquet")
        except Exception:  # polars/pyarrow raise many kinds for a missing or damaged file
            return None
        if dict(digests.schema) != io_.ANNOTATION_DIGESTS or dict(shards.schema) != io_.SHARDS:
            return None
        return digests, shards

    # -- one partition ------------------------------------------------------------------------

    def write_partition(
        self,
        root: Path,
        queries: QuerySet,
        partition: Partition,
        outcome: SearchOutcome,
        build_raw,
        defer: bool = False,
    ) -> tuple[pl.DataFrame, dict[str, Callable[[], None]]]:
        """Write the partition's hits, raw rows, shards and TopGO under `root`, and stage its
        annotation digests; `build_raw(hits)` builds raw rows (the full run's function). Returns
        the raw rows, and with `defer` the "topgo" and "shards" still to write when they are
        written whole (the run writes the last partition's beside the run-wide outputs,
        `run_outputs`); else nothing is left."""
        stored = self.updates.stored.get(partition.key)
        # the previous raw rows are decoded (polars, off the GIL) while the plan's checks and the
        # rebuilt accessions' raw rows, mostly Python, run on this thread
        with ThreadPoolExecutor(1, thread_name_prefix="previous-raw") as reads:
            with timed(outcome.timings, "outputs to rebuild"):
                plan = self._plan(partition, outcome, stored, reads) if stored is not None else None
            return self._write_planned(root, queries, partition, outcome, build_raw, defer, plan, reads)

    def _write_planned(self, root, queries, partition, outcome, build_raw, defer, plan, background):
        """`write_partition` once the plan is made (None or a reason: every accession rebuilt);
        `background`: a thread of one's own, idle when every accession is rebuilt."""
        config = self.config
        if isinstance(plan, str):
            log.info("%s: outputs rebuilt in full: %s", partition.key, plan)
            plan = None
        keeps_state = self.updates.keeps_state(partition)  # not a per-aspect search
        staged = None
        if keeps_state:
            self._with_state.add(partition.key)
            # a whole partition's digests (polars, off the GIL) are taken beside its raw rows
            digests = background.submit(self.annotation_digests, outcome.hits) if plan is None else None
            staged = background.submit(self._stage_digests, root, partition, outcome, digests or plan[1])
        if plan is None:
            raw = build_raw(outcome.hits)
            if staged is not None:
                staged.result()
            with timed(outcome.timings, "write partition"):
                writers.write_hits(root, partition, outcome)
                writers.write_raw_rows(root, partition, raw)
            self.subset[partition.key] = None

            def topgo() -> None:
                writers.write_partition_topgo(root, partition, raw, config.precision, config.fantasia_compat)
                if keeps_state:
                    self._record_topgo(root, partition)

            def shards() -> None:
                writers.write_raw_csv(
                    root, partition, raw, self.shard_names, config.precision, config.fantasia_compat,
                    self.published,  # its unchanged shards are linked
                )  # fmt: skip
                if keeps_state:
                    self._stage_shards(root, partition, raw, {})

            left = {"topgo": topgo, "shards": shards} if config.topgo else {"shards": shards}
            if defer:
                return raw, left
            with timed(outcome.timings, "write partition"):
                for write in left.values():
                    write()
            return raw, {}
        affected, _, old_raw, kept_shards, old_files = plan
        raw_sub = build_raw(outcome.hits.filter(pl.col("accession").is_in(list(affected))))
        if staged is not None:
            staged.result()
        with timed(outcome.timings, "outputs to rebuild"):
            raw = io_.splice_raw(old_raw.result(), raw_sub, affected)
        if raw is None:
            log.info("%s: outputs rebuilt in full: raw rows of another layout", partition.key)
            self.updates.stored.pop(partition.key)
            return self.write_partition(root, queries, partition, outcome, build_raw, defer)
        with timed(outcome.timings, "write partition"):
            self._write_subset(root, partition, outcome, raw_sub, kept_shards, old_files)
            # the whole raw rows' Parquet (one long call that leaves the GIL) is written beside the
            # rebuilt shards (many small system calls); the shards are not written beside the
            # run-wide outputs, as whole ones are: there each small write waits for the GIL while
            # the other stages compute (measured several times slower)
            with ThreadPoolExecutor(1, thread_name_prefix="raw-rows") as pool:
                whole = pool.submit(writers.write_raw_rows, root, partition, raw)
                self._write_rebuilt(root, partition, raw, raw_sub, affected)
                whole.result()
            self._stage_shards(root, partition, raw, kept_shards)  # kept: size, mtime, inode as checked
        self.subset[partition.key] = affected
        current = set(outcome.hits["accession"].unique().to_list()) | set(outcome.queries_without_hits)
        details = self.updates.updates[partition.key].details
        details["outputs_rebuilt"] = len(affected & current)  # removed queries' outputs are not rebuilt
        details["outputs_removed"] = len(affected - current)
        self._rebuilt_rows[partition.key] = raw_sub.height
        return raw, {}

    def _stage_digests(self, root: Path, partition: Partition, outcome: SearchOutcome, digests) -> None:
        """state/…/annotations.parquet of these digests (a frame, or a future of one)."""
        digests = digests if isinstance(digests, pl.DataFrame) else digests.result()
        with timed(outcome.timings, "incremental state"):
            exports.write_parquet_atomic(
                root / incremental.state_dir(partition) / "annotations.parquet", digests
            )

    def _plan(self, partition: Partition, outcome: SearchOutcome, stored, reads: ThreadPoolExecutor):
        """(affected accessions, annotation digests, previous raw rows (a future, read by `reads`),
        kept shards, previous shard files), or why not."""
        state, paths = stored
        if self.config.fantasia_compat:
            return "FANTASIA-compatible outputs are rebuilt in full"
        if "raw" not in state.meta.get("outputs", {}):
            return "the stored state does not vouch for the raw rows"
        if state.meta.get("outputs_config") != self.partition_outputs:
            return "output settings changed"
        extras = self._stored_extras(partition)
        if extras is None:
            return "no stored annotation digests or shard list"
        if self.config.topgo and self._run_state is None:
            return "the TopGO files are not the ones the state recorded"
        old_digests, shards = extras
        old_raw = reads.submit(pl.read_parquet, paths["raw"])
        affected = io_.changed_hits(state.neighbours, outcome.hits)
        affected |= self.updates.searched.get(partition.key, set())  # a changed sequence, same hits
        if state.meta.get("annotation_version") == (self.updates.annotation_version or ""):
            digests = self.carried_digests(old_digests, outcome.hits)
        else:
            digests = self.annotation_digests(outcome.hits)
            changed = io_.changed_sequences(old_digests, digests)
            if len(changed):
                hit = outcome.hits.filter(pl.col("ref_idx").is_in(changed.tolist()))
                affected |= set(hit["accession"].unique().to_list())
        folder = str(paths["shards"])
        try:
            present = set(os.listdir(folder))
        except OSError:
            return "the published shard folder is missing"
        if present != set(shards["file"].to_list()):
            return "the published shard folder holds other files than the state recorded"
        kept = {}  # accession → its shard's row in shards.parquet, left in place unchanged
        names, prefix = self.shard_names, folder + os.sep  # tens of thousands of files: a tight loop
        for row in shards.iter_rows():
            accession, file = row[0], row[1]
            if accession in affected:
                continue
            if names.get(accession) != file or io_.signature(prefix + file) != list(row[2:]):
                affected.add(accession)  # renamed, or not the file the state recorded: rewritten
            else:
                kept[accession] = row
        old_files = {accession: (file,) for accession, file in shards.select("accession", "file").iter_rows()}
        return affected, digests, old_raw, kept, old_files

    def _write_subset(self, root, partition, outcome, raw_sub, kept_shards, old_files) -> None:
        """Write the hits and the rebuilt rows (in the scratch folder: the run-wide subsets read
        them), and name the shards the publication removes."""
        writers.write_hits(root, partition, outcome)
        writers.write_raw_rows(root / SCRATCH, partition, raw_sub)
        # published file by file (`RunStaging.publish`): the kept shards are never touched, the
        # rebuilt ones replace theirs, and the dropped accessions' files without a new one go
        written = {self.shard_names[accession] for accession in raw_sub["accession"].unique().to_list()}
        dropped = {file for accession, (file, *_) in old_files.items() if accession not in kept_shards}
        self.patches[partition_files(partition)["shards"]] = sorted(dropped - written)

    def _write_rebuilt(self, root: Path, partition: Partition, raw, raw_sub, affected: set[str]) -> None:
        """The rebuilt accessions' shards (by the full run's writer, into a staged folder that
        holds only them) and TopGO lines (spliced into the previous files)."""
        config, scratch = self.config, root / SCRATCH
        # the rebuilt shards' folder in a lightly used ext4 block group, as a first run's (`core.ahead`)
        shards = partition_paths(root, partition)["shards"]
        shards.parent.mkdir(parents=True, exist_ok=True)
        ahead.spread(shards.parent)
        writers.write_raw_csv(
            root, partition, raw_sub, self.shard_names, config.precision, config.fantasia_compat
        )
        if not config.topgo:
            return
        writers.write_partition_topgo(scratch, partition, raw_sub, config.precision, config.fantasia_compat)
        folder = partition_paths(Path(), partition)["topgo"]
        spliced = lines_.splice_folder(
            self.published / folder,
            scratch / folder,
            root / folder,
            affected,
            {Path(file).name: kept for file, kept in self._indexes.items() if Path(file).parent == folder},
        )
        if isinstance(spliced, str):
            log.info("%s: TopGO files rebuilt in full: %s", partition.key, spliced)
            writers.write_partition_topgo(root, partition, raw, config.precision, config.fantasia_compat)
            self._record_topgo(root, partition)
            return
        self._recorded["partitions"].update((str(folder / name), kept) for name, kept in spliced.items())

    def _record_topgo(self, root: Path, partition: Partition) -> None:
        if not self.config.fantasia_compat:  # compatible outputs are never spliced
            lines_.record_folder(
                root, partition_paths(Path(), partition)["topgo"], self._recorded["partitions"]
            )

    def _stage_shards(self, root: Path, partition: Partition, raw: pl.DataFrame, known: dict) -> None:
        """shards.parquet: each shard's file name and signature (`known`: those checked already)."""
        shards = str(partition_paths(root, partition)["shards"])
        rows = []
        for accession in raw["accession"].unique(maintain_order=True).to_list():
            row = known.get(accession)
            if row is None:
                file = self.shard_names[accession]
                row = (accession, file, *(io_.signature(os.path.join(shards, file)) or (-1, -1, -1)))
            rows.append(row)
        exports.write_parquet_atomic(
            root / incremental.state_dir(partition) / "shards.parquet",
            pl.DataFrame(rows, schema=io_.SHARDS, orient="row"),
        )

    def _splice_plan(self, root: Path, partitions: list[Partition]) -> tuple[str | None, set[str]]:
        """(why the run-wide files cannot be spliced, or None; the accessions rebuilt). Every
        partition's scratch rows then hold all of them: a rebuilt summary or ensemble line of an
        accession aggregates its rows in every partition, not only where it was rebuilt."""
        subsets = [self.subset.get(p.key) for p in partitions]
        state = self._run_state
        if any(s is None for s in subsets):
            return "a partition was rebuilt in full", set()
        if state is None:
            return "no usable run state (state/run.json)", set()
        if state.get("partitions") != [p.key for p in partitions] or state.get("topgo") != self.config.topgo:
            return "other partitions", set()
        affected = set().union(*subsets)
        with self._widened:  # the summary and the ensemble are written side by side
            for partition in partitions:
                if self.subset[partition.key] != affected:
                    whole = pl.scan_parquet(partition_paths(root, partition)["raw"])
                    rows = whole.filter(pl.col("accession").is_in(list(affected))).collect()
                    writers.write_raw_rows(root / SCRATCH, partition, rows)
                    self._rebuilt_rows[partition.key] = rows.height
                    self.subset[partition.key] = affected
        return None, affected

    def write_summary(self, root: Path, partitions: list[Partition]) -> SummaryFile:
        """summary.csv under `root`: the previous one spliced with the rebuilt accessions' rows
        when every partition was written incrementally, else written whole."""
        config = self.config
        why, affected = self._splice_plan(root, partitions)
        if why is None and affected and not any(self._rebuilt_rows.values()):
            # the rebuilt accessions lost every row: whether a partition's columns stay in the
            # summary then depends on the other accessions' rows, which a splice does not read
            why = "the rebuilt accessions have no rows left"
        if why is None:
            built = None  # nothing rebuilt: the previous file as it is
            if affected:
                built = writers.write_summary(
                    root / SCRATCH, partitions, config.summary, config.limit_per_entry, config.precision,
                    _spill(root, "summary"), config.fantasia_compat,
                ).path.read_bytes()  # fmt: skip
            recorded = self._indexes[str(SUMMARY)]
            spliced = lines_.splice_file(self.published / SUMMARY, recorded, built, affected, ",", True)
            if not isinstance(spliced, str):
                pieces, index = spliced
                self._recorded["summary"][str(SUMMARY)] = (index, lines_.write_pieces(root / SUMMARY, pieces))
                head = bytes(pieces[0][: index.bounds[0]])  # the header (the first piece starts the file)
                columns = tuple(pl.read_csv(io.BytesIO(head), n_rows=0, infer_schema=False).columns)
                return SummaryFile(root / SUMMARY, index.rows, columns)
            why = spliced
        log.info("summary.csv rebuilt in full: %s", why)
        written = writers.write_summary(
            root, partitions, config.summary, config.limit_per_entry, config.precision,
            _spill(root, "summary-full"), config.fantasia_compat,
        )  # fmt: skip
        if not config.fantasia_compat:
            self._recorded["summary"][str(SUMMARY)] = lines_.record(root / SUMMARY, ",", True)
        return written

    def write_ensemble(self, root: Path, partitions: list[Partition]) -> None:
        """The TopGO ensemble under `root`, spliced like summary.csv."""
        why, affected = self._splice_plan(root, partitions)
        if why is None:
            scratch = root / SCRATCH
            if affected:
                writers.write_ensemble(scratch, partitions, self.config.precision, _spill(root, "ensemble"))
            previous = {Path(f).name: kept for f, kept in self._indexes.items() if Path(f).parent == ENSEMBLE}
            spliced = lines_.splice_folder(
                self.published / ENSEMBLE, scratch / ENSEMBLE, root / ENSEMBLE, affected, previous
            )
            if not isinstance(spliced, str):
                self._recorded["ensemble"].update(
                    (str(ENSEMBLE / name), kept) for name, kept in spliced.items()
                )
                return
            why = spliced
        log.info("TopGO ensemble rebuilt in full: %s", why)
        # one partition written whole here: its TopGO files are the ensemble (`writers.write_ensemble`)
        whole = len(partitions) == 1 and self.subset.get(partitions[0].key, ()) is None
        writers.write_ensemble(
            root, partitions, self.config.precision, _spill(root, "ensemble-full"),
            topgo_written=whole and not self.config.fantasia_compat,
        )  # fmt: skip
        if not self.config.fantasia_compat:
            # the ensemble of one partition is its TopGO files' copy: their indexes, by digest
            lines_.record_folder(
                root, ENSEMBLE, self._recorded["ensemble"], self._recorded["partitions"].values()
            )

    def stage(self, root: Path, partitions: list[Partition]) -> list[Path]:
        """Write state/run.json under `root` (the signatures and digests of the files a splice
        reads back) and state/lines.parquet (their line indexes)."""
        self._staged, self._partitions = [], partitions
        if not any(p.key in self._with_state for p in partitions):
            return []  # per-aspect searches keep no state: the next run is a full one
        folders = (
            [ENSEMBLE, *(partition_paths(Path(), p)["topgo"] for p in partitions)]
            if self.config.topgo
            else []
        )
        files = {str(SUMMARY): io_.signature(root / SUMMARY)}
        for folder in folders:
            for name in lines_.listing(root / folder):
                files[str(folder / name)] = io_.signature(root / folder / name)
        state = {
            "format": RUN_FORMAT,
            "outputs": self.outputs,
            "partitions": [p.key for p in partitions],
            "topgo": self.config.topgo,
            "folders": [str(f) for f in folders],
            "files": files,
            "raw": {
                str(f): io_.signature(root / f)
                for f in (partition_paths(Path(), p)["raw"] for p in partitions)
            },
        }
        recorded = {file: kept for stage in self._recorded.values() for file, kept in stage.items()}
        indexed = {file: recorded.get(file) for file in files}
        entries = [RUN_STATE]
        if all(kept is not None for kept in indexed.values()):  # else the next run rebuilds them whole
            state["digests"] = {file: kept[1] for file, kept in indexed.items()}
            state["lines"] = lines_.write_lines(root, indexed)
            entries.append(lines_.LINES_STATE)
        exports.write_bytes_atomic(root / RUN_STATE, json.dumps(state, sort_keys=True).encode())
        self._staged = entries
        return entries

    def publish(self, staging, entries: list[Path]) -> None:
        """Publish the run, then remove the state of earlier runs it did not write (per-aspect
        partitions keep none, FANTASIA-compatible outputs no line index): never trusted again, it
        would only be read, and named as the reason of the next full run."""
        staging.publish(entries, self.patches)
        if self._partitions is None:
            return
        unkept = [incremental.state_dir(p) for p in self._partitions if p.key not in self._with_state]
        unkept += [f for f in (RUN_STATE, lines_.LINES_STATE) if f not in self._staged]
        for path in (self.published / relative for relative in unkept):
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                log.info("removed %s: state of an earlier run that this one does not keep", path)


def _spill(root: Path, name: str) -> Path:
    """DuckDB's scratch folder for one connection (created and removed by it), in the staging."""
    return root / SCRATCH / f"duckdb-{name}"
