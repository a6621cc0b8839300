"""User-facing files (SPEC §4): raw shards, FASTA, query mapping, summary, TopGO; all atomic.

Every file is written to a temporary name in its destination folder and renamed into place,
so a reader (or a crash) never sees half a file. Folders whose whole content is replaced by a
run (a partition's raw shards, its TopGO files) are built aside and swapped in, so a re-run
replaces them (shards of accessions gone from the query file disappear too) and never appends.
Names built from data (accessions, model names) go through `safe_name`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

from .ahead import claim
from .floattext import MAX_PRECISION, fixed_text

RAW_COLUMNS = [
    "accession", "model_name", "embedding_type_id", "layer_index", "distance", "go_id", "category",
    "evidence_code", "go_description", "protein_id", "organism", "gene_name", "query_idx", "ref_idx",
    "query_len", "ref_len",
]  # fmt: skip
SEQUENCE_COLUMNS = ["sequence_query", "sequence_reference"]
ALIGNMENT_COLUMNS = [
    "identity", "similarity", "alignment_score", "gaps_percentage", "alignment_length",
    "identity_sw", "similarity_sw", "alignment_score_sw", "gaps_percentage_sw", "alignment_length_sw",
]  # fmt: skip
TAIL_COLUMNS = ["distance_metric", "distance_threshold"]
# every raw-row column's type: a partition without rows carries them too, or the run's frames
# concatenated (`writers.read_raw_rows`) would make strings of its untyped columns
_INTEGER_COLUMNS = (
    "embedding_type_id", "layer_index", "query_idx", "ref_idx", "query_len", "ref_len",
    "alignment_score", "alignment_length", "alignment_score_sw", "alignment_length_sw",
)  # fmt: skip
_FLOAT_COLUMNS = (
    "distance", "reliability_index", "identity", "similarity", "gaps_percentage", "identity_sw",
    "similarity_sw", "gaps_percentage_sw", "distance_threshold",
)  # fmt: skip
_RAW_DTYPES: dict[str, type[pl.DataType]] = {
    name: pl.Int64 if name in _INTEGER_COLUMNS else pl.Float64 if name in _FLOAT_COLUMNS else pl.String
    for name in [*RAW_COLUMNS, *SEQUENCE_COLUMNS, "reliability_index", *ALIGNMENT_COLUMNS, *TAIL_COLUMNS]
}

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]")
_DOTS = re.compile(r"\.{3,}")  # '...' is harmless in a file name but refused in Dagster partition keys
_MAX_NAME = 120
# folder names of topgo/ that belong to the run, not to a model
RESERVED_MODEL_DIRS = frozenset({"ensemble"})


class OutputWriteError(FantasiaError, OSError):
    """An output could not be written (disk full, read-only, no permission); none is half-written."""

    def __str__(self) -> str:
        return str(self.strerror)  # the whole message, without "[Errno N]"


def raw_columns(keep_sequences: bool, alignment: bool) -> list[str]:
    """The raw shard columns in SPEC §4.1 order for these settings."""
    return (
        RAW_COLUMNS
        + (SEQUENCE_COLUMNS if keep_sequences else [])
        + ["reliability_index"]
        + (ALIGNMENT_COLUMNS if alignment else [])
        + TAIL_COLUMNS
    )


def raw_schema(keep_sequences: bool, alignment: bool) -> dict[str, type[pl.DataType]]:
    """The raw rows' columns (`raw_columns`) with their types."""
    return {name: _RAW_DTYPES[name] for name in raw_columns(keep_sequences, alignment)}


def safe_name(name: str) -> str:
    """A file or folder name for `name`: no separators, no leading dots, bounded length.

    Characters outside [A-Za-z0-9._+=@-] become '_'. When that changed anything, or the name
    is long, a hash of the original is appended so that distinct names stay distinct.
    """
    cleaned = _cleaned(name)
    if cleaned == name and 0 < len(name) <= _MAX_NAME:
        return name
    return _hashed(name, cleaned)


def _cleaned(name: str) -> str:
    return _DOTS.sub("_", _UNSAFE.sub("_", name)).lstrip(".")


def _hashed(name: str, cleaned: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[:_MAX_NAME] or 'unnamed'}~{digest}"


def model_dir_name(model: str) -> str:
    """The folder (and partition key) name of a model: `safe_name`, never a reserved name."""
    name = safe_name(model)
    return _hashed(model, name) if name.lower() in RESERVED_MODEL_DIRS else name


def unique_file_names(names: Iterable[str], suffix: str) -> dict[str, str]:
    """name → `safe_name(name) + suffix`, unique even where the file system ignores case.

    Names whose file names would coincide case-insensitively (`P1` and `p1` on macOS or
    Windows) all take the hashed form, which differs for distinct names.
    """
    chosen = {name: safe_name(name) for name in names}
    folded: dict[str, list[str]] = {}
    for name, file in chosen.items():
        folded.setdefault(file.casefold(), []).append(name)
    for group in folded.values():
        if len(group) > 1:
            for name in group:
                chosen[name] = _hashed(name, _cleaned(name))
    return {name: file + suffix for name, file in chosen.items()}


def layer_dir_name(layer: int | None) -> str:
    return f"layer_{layer}" if layer is not None else "layer_legacy"


def tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling named after the writing process: `.{name}.{pid}-{random}.{kind}`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Remove temporaries of `path` left by writers that died (SIGKILL, power loss).

    A temporary of a live process (another partition or run writing now) is left alone.
    """
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{glob_escape(path.name)}.*.{kind}"):
            pid = stale.name[len(path.name) + 2 :].split("-", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):  # this process too: another thread's
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped (pathlib globs have no escape function)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def writing(path: Path, action: Callable[[], None]) -> None:
    """Run `action`; a failure of the file system becomes an `OutputWriteError` naming `path`."""
    try:
        action()
    except OutputWriteError:
        raise
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        hint = ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(_existing(path)).free
            hint = f" ({free / 2**20:.1f} MiB free)"
        raise OutputWriteError(
            error.errno,
            f"cannot write {path}: {reason}{hint}; no file was left half-written (each output is the "
            "previous run's or this run's, whole): fix the cause and run again to complete the outputs",
        ) from error


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Make `path` with `writer(tmp)` on a temporary sibling, then rename it into place.

    The one atomic-write helper: a reader (or a crash) sees the old file or the new one, whole.
    Temporaries of writers that died are removed first; a file-system failure becomes an
    `OutputWriteError` naming `path`.
    """

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        tmp = tmp_sibling(path)
        try:
            writer(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    writing(path, write)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling (synced) and a rename."""
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write the concatenated `chunks` to `path` via a temporary sibling (synced) and a rename.

    The chunks are written as they come, so a large file is never held whole in memory; an
    error raised by the iterator leaves `path` as it was.
    """

    def write(tmp: Path) -> None:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for data in chunks:
                _write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    atomic_write(path, write)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view[: 1 << 24])
        view = view[written:]


def write_parquet_atomic(path: Path, frame: pl.DataFrame) -> None:
    """Parquet of `frame` at `path`, atomically.

    Rendered in memory first: the file system errors of one write path (ours) are then the
    only ones to translate, whatever the Parquet writer would raise on a full disk.
    """
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    write_bytes_atomic(path, buffer.getvalue())


def swap_in(staged: Path, target: Path) -> None:
    """Move a finished file or folder `staged` to `target`, replacing what is there.

    A file is one atomic rename. A folder cannot replace a folder atomically: the old one is
    renamed aside first (`.{name}.{pid}-{random}.old`, removed after, or by the next write of
    `target` if this process dies in between), so `target` is never a mix of both.

    Two writers of one folder at once (a backfill and a sensor's run of one partition) may
    interleave: the other one's folder can land at `target` between our two renames, or move
    the old one aside before we do. Each of those is met by trying again, and every round
    moves some writer's folder in, so it ends; whichever lands last stays, whole.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not staged.is_dir():
        os.replace(staged, target)
        return
    aside: list[Path] = []
    while True:
        try:
            os.rename(staged, target)  # a missing or empty `target` is replaced at once
            break
        except OSError as error:
            if error.errno not in _OCCUPIED:
                _put_back(aside, target)
                raise
        old = tmp_sibling(target, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another writer moved it aside first
            continue
        aside.append(old)
    for old in aside:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _put_back(aside: list[Path], target: Path) -> None:
    """After a failed swap, the folder last moved aside goes back if nothing took its place."""
    if aside:
        with contextlib.suppress(OSError):  # else left as `.old`: the next write of `target` removes it
            os.rename(aside[-1], target)


# what renaming a folder onto `target` raises while something is there: a folder with files
# (ENOTEMPTY, or EEXIST on some systems) or a file (ENOTDIR)
_OCCUPIED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)


def replace_dir(target: Path, build, made: Path | None = None) -> None:
    """Build a folder's new content aside with `build(tmp_dir)`, then swap it in for `target`.

    `made`: the temporary folder, already made (`core.ahead`), a `tmp_sibling` of `target`."""

    def swap() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(target)  # never `made`: this process is alive
        tmp = made or tmp_sibling(target)
        if made is None:
            tmp.mkdir()
        try:
            build(tmp)
            swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    writing(target, swap)


def _one_line_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """Line breaks inside text fields would split CSV records; they become spaces."""
    text = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    if not text or not frame.height:
        return frame
    # finding is cheaper than replacing: only the columns that hold a line break are rewritten
    broken = frame.select(pl.col(text).str.contains(r"[\r\n]").any()).row(0)
    text = [name for name, flag in zip(text, broken, strict=True) if flag]
    return frame.with_columns(pl.col(text).str.replace_all(r"[\r\n]+", " ")) if text else frame


def csv_bytes(frame: pl.DataFrame, precision: int | None, header: bool = True, separator: str = ",") -> bytes:
    """CSV with floats written with `precision` digits after the point (None: shortest round trip)."""
    return utf8_csv(
        fixed_floats(_one_line_strings(frame), precision),
        include_header=header,
        separator=separator,
        float_precision=precision,
    )


def utf8_csv(frame: pl.DataFrame, **options) -> bytes:
    """`frame.write_csv(**options)` as UTF-8 bytes, written by polars straight into a buffer: the
    very bytes of ``write_csv(...).encode("utf-8")`` without the text between, which is decoded
    and encoded again (the raw rows' 75 MB: 0.20 s and 60,000 page faults against 0.13 s and
    20,000)."""
    buffer = io.BytesIO()
    frame.write_csv(buffer, **options)
    return buffer.getvalue()


def fixed_floats(frame: pl.DataFrame, precision: int | None) -> pl.DataFrame:
    """`frame` with its float columns as the text polars' CSV writer gives them at `precision`.

    The same bytes as `write_csv(float_precision=precision)`, for less CPU (`core.floattext`;
    measured, medians of 7 in one process, two sessions: summary.csv of 498,706 rows 0.83-1.09 s
    against polars' 1.12-1.42 s, the raw rows' CSV 0.60-0.83 s against 0.62-1.05 s). A column of
    nulls is left to polars, which writes it as fast as anything; so are None or a precision
    beyond `MAX_PRECISION`.
    """
    if precision is None or not 0 <= precision <= MAX_PRECISION:
        return frame
    floats = [
        name
        for name, dtype in frame.schema.items()
        if dtype in (pl.Float64, pl.Float32) and frame[name].null_count() < frame.height
    ]
    return frame.with_columns(fixed_text(frame[name], precision) for name in floats) if floats else frame


def write_raw_shards(
    directory: Path,
    raw: pl.DataFrame,
    columns: list[str],
    precision: int,
    file_names: dict[str, str] | None = None,
    previous: Path | None = None,
) -> dict[str, str]:
    """One `{accession}.csv` per query accession under `directory` (replaced as a whole).

    `raw` must be sorted by accession. The whole partition is rendered to CSV once and cut
    at line boundaries, instead of one CSV writer call per accession. `file_names` gives each
    accession's file name (default: from `unique_file_names`). Returns {accession: file name}.

    `previous`: the folder this one replaces (a run's staging writes beside the published
    one). A file whose bytes equal the new ones is hard-linked from there instead of written:
    on some disks freeing thousands of written files costs milliseconds each, and a rerun
    that changed few shards would pay that for all of them when the old folder is removed.
    """
    frame = fixed_floats(_one_line_strings(raw.select(columns)), precision)
    body = utf8_csv(frame, include_header=True, float_precision=precision)
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(data == 10) + 1  # end offset of every line (header first)
    header = body[: ends[0]]
    # runs of the original accessions (the CSV text has line breaks in names flattened)
    runs = raw.select(pl.col("accession").rle()).unnest("accession")
    names: dict[str, str] = {}
    if file_names is None:
        file_names = unique_file_names(raw["accession"].unique().to_list(), ".csv")

    view = memoryview(body)
    if previous is not None and not previous.is_dir():
        previous = None  # a first run: nothing to link, and no failed look-up per file
    before = os.path.join(previous, "") if previous is not None else None
    ahead = claim(directory)  # the files a first run made while it searched (`core.ahead`)
    # EXCL: a file that exists was made ahead (two accessions never share a file: `written`)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if ahead is None else 0)

    def build(tmp: Path) -> None:
        row = 0
        written: set[str] = set()
        prefix = os.path.join(tmp, "")  # plain strings: thousands of paths, where Path costs more
        for length, accession in runs.iter_rows():
            name = file_names[accession]
            names[accession] = name
            chunk = view[ends[row] : ends[row + length]]
            row += length
            if name in written:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), prefix + name)
            written.add(name)
            if before is not None and _same_bytes(before + name, header, chunk):
                try:
                    if ahead is not None:
                        Path(prefix + name).unlink(missing_ok=True)
                    os.link(before + name, prefix + name)
                    continue
                except OSError:  # a file system without hard links: written below
                    pass
            # os-level calls: thousands of small files, where io.open's layers cost more than the write
            descriptor = os.open(prefix + name, flags, 0o644)
            try:
                done = os.writev(descriptor, [header, chunk])
                if done < len(header) + len(chunk):  # short write (nearly full disk): finish it
                    _write_all(descriptor, (header + bytes(chunk))[done:])
            finally:
                os.close(descriptor)
        if ahead is not None:  # made ahead for queries without raw rows
            for name in set(os.listdir(tmp)) - written:
                os.unlink(prefix + name)

    replace_dir(directory, build, ahead.folder if ahead is not None else None)
    return names


def _same_bytes(path: str, header: bytes, chunk: memoryview) -> bool:
    """Whether the regular file `path` holds exactly `header` + `chunk`."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.path.getsize(path) != len(header) + len(chunk):
            return False
        with open(path, "rb") as handle:
            return handle.read() == header + bytes(chunk)
    except OSError:
        return False


def write_topgo_dir(directory: Path, tables: dict[str, pl.DataFrame], precision: int) -> list[Path]:
    """`{category}.topgo` files (accession, go_id, reliability_index; TSV, no header)."""
    written = []

    def build(tmp: Path) -> None:
        for category, table in sorted(tables.items()):
            name = safe_name(str(category)) + ".topgo"
            (tmp / name).write_bytes(
                csv_bytes(
                    table.select("accession", "go_id", "reliability_index"),
                    precision,
                    header=False,
                    separator="\t",
                )
            )
            written.append(directory / name)

    replace_dir(directory, build)
    return written


def fasta_bytes(records: Iterable[tuple[str, str]], width: int = 60) -> bytes:
    """FASTA text of (identifier, sequence) records, sequence lines `width` long."""
    # plain slicing: measured faster than polars' regex split for 25k records
    lines = []
    for identifier, sequence in records:
        lines.append(f">{identifier}")
        lines.extend(sequence[i : i + width] for i in range(0, len(sequence), width))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
