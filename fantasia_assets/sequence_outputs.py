"""sequences.fasta and query_index_mapping.csv of a whole-run lookup, from the previous ones where
the state proves them (`core.incremental_fasta`).

The run stages, beside the two files:
- ``state/sequences.parquet``: each reference record's sequence id and byte length, in file order;
- ``state/sequences.json``: the format and code versions, the query file's content digest and the
  query records' length, the precision, and the (size, mtime, inode) of both files.

A rerun whose previous files are the ones that state recorded keeps the previous FASTA's records
byte for byte and fetches the sequences of the newly named references only; with the same query
file, the query records and the mapping (a function of the query file alone) are kept too, and
a file that would not change is hard-linked rather than written. Anything unproven (no state,
another format or code version, a damaged state, a file rewritten since, a file not laid out as
its state says, or a full run asked for) writes both files whole, and the reason is logged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import polars as pl

from .config import LookupConfig
from .core import exports, incremental, writers
from .core import incremental_fasta as fasta_
from .core.incremental_outputs import signature
from .core.layout import FASTA, MAPPING
from .core.lineage import CODE_VERSION
from .core.plan import QuerySet

log = logging.getLogger(__name__)

STATE = incremental.STATE_ROOT / "sequences.json"
LAYOUT = incremental.STATE_ROOT / "sequences.parquet"
FORMAT = f"incremental-sequences-1|{writers.OUTPUT_FORMAT_VERSION}|{CODE_VERSION}"


def write_sequence_outputs(
    config: LookupConfig, root: Path, queries: QuerySet, raw: pl.DataFrame, sequences, full: bool = False
) -> list[Path]:
    """Write sequences.fasta and query_index_mapping.csv under `root` (the run's staging), and
    their state; returns the state's entries to publish with them.

    The previous files and state are read from experiment_path. `raw`: the run's raw rows (their
    ``ref_idx`` at least). `sequences`: ids → {id: sequence} (the run's `SequenceCache`)."""
    published, precision = config.experiment_path, config.precision
    wanted = np.unique(raw["ref_idx"].to_numpy().astype(np.int64))
    state, why = (None, "a full run was asked for (--full)") if full else _stored(published)
    spliced = None
    if state is not None:
        meta, ids, lengths = state
        same_queries = meta["query_hash"] == queries.content_hash
        new_queries = None if same_queries else fasta_.query_records(queries.sequences)
        fetched = sequences(np.setdiff1d(wanted, ids, assume_unique=True))
        previous = (published / FASTA).read_bytes()
        spliced = fasta_.splice(previous, meta["query_bytes"], ids, lengths, new_queries, wanted, fetched)
        why = "the previous file is not laid out as its state says"
    if spliced is None:
        log.info("sequences.fasta written in full: %s", why)
        records, ids = fasta_.reference_records(sequences(wanted))
        head = fasta_.query_records(queries.sequences)
        exports.write_bytes_atomic(root / FASTA, b"".join([head, *records]))
        lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
        writers.write_mapping(root, queries, precision)
    else:
        chunks, ids, lengths = spliced
        head = chunks[0]
        unchanged = same_queries and np.array_equal(ids, state[1])
        if not (unchanged and _link(published / FASTA, root / FASTA)):
            exports.write_bytes_atomic(root / FASTA, b"".join(chunks))
        mapping_kept = same_queries and meta["precision"] == precision and meta["mapping"] is not None
        if not (mapping_kept and _link(published / MAPPING, root / MAPPING)):
            writers.write_mapping(root, queries, precision)
    exports.write_parquet_atomic(root / LAYOUT, fasta_.layout_frame(ids, lengths))
    record = {
        "format": FORMAT,
        "query_hash": queries.content_hash,
        "query_bytes": len(head),
        "precision": precision,
        "fasta": signature(root / FASTA),
        "mapping": signature(root / MAPPING),
    }
    exports.write_bytes_atomic(root / STATE, json.dumps(record, sort_keys=True).encode())
    return [LAYOUT, STATE]


def _stored(published: Path) -> tuple[tuple[dict, np.ndarray, np.ndarray] | None, str | None]:
    """(the state's record, reference ids and record lengths) when it describes the published
    FASTA, else (None, why not)."""
    try:
        meta = json.loads((published / STATE).read_text())
    except FileNotFoundError:
        return None, f"no stored state ({STATE})"
    except (OSError, ValueError) as error:
        return None, f"stored state unreadable ({STATE}: {error})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        return (
            None,
            f"stored state of another format or code version ({found!r}, this code writes {FORMAT!r})",
        )
    fields = {"query_hash": str, "query_bytes": int, "precision": int, "fasta": list}
    if any(not isinstance(meta.get(name), kind) for name, kind in fields.items()):
        return None, f"stored state damaged ({STATE})"
    try:
        ids, lengths = fasta_.read_layout(pl.read_parquet(published / LAYOUT))
    except Exception as error:  # polars/pyarrow raise many kinds for a missing or damaged file
        return None, f"stored state damaged ({LAYOUT}: {error})"
    if signature(published / FASTA) != meta["fasta"]:
        return None, f"{FASTA} is not the file the state recorded"
    if signature(published / MAPPING) != meta.get("mapping"):
        meta["mapping"] = None  # rewritten since: written again, the FASTA still spliced
    return (meta, ids, lengths), None


def _link(source: Path, target: Path) -> bool:
    """Hard-link the published file `source` as the staged `target` (a file that does not change
    is not written again); False where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True
