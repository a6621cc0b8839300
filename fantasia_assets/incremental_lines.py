"""Splicing summary.csv and the TopGO files by their stored line indexes, never re-parsing them.

A rerun that rebuilds a few accessions keeps every other accession's lines of the previous
file byte for byte (`core.incremental_outputs`). Finding those lines by parsing a file of a
million lines costs more than the rest of the splice; so each run stores, beside the files,
where each accession's lines lie in them and a SHA-256 of each file:

- ``state/lines.parquet``: the line index of summary.csv and of every TopGO file (`LINES`);
- ``state/run.json`` (`incremental_write`): each file's SHA-256 and the SHA-256 of
  lines.parquet, beside the files' (size, mtime, inode).

A splice reads the previous file whole (its ranges are copied from it), so checking its digest
costs one hash: a file edited since, even to the same size within one mtime tick, is never
spliced from. The index itself is tied to the run that wrote the files by its own digest, and
must fit the file (its length, a line end at every accession's end). Only the rebuilt
accessions' lines are parsed. Anything else is a reason, returned for the caller to log before
it writes the file whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from .core import exports, incremental
from .core import incremental_outputs as io_
from .core.incremental_outputs import LineIndex

LINES_STATE = incremental.STATE_ROOT / "lines.parquet"

Recorded = tuple[LineIndex, str]  # a file's line index and the SHA-256 (hex) of its bytes


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def record(
    path: Path, separator: str, header: bool, known: dict[str, LineIndex] | None = None
) -> Recorded | None:
    """The line index and digest of a file written whole; None when it has no index (lines
    that are not one record each, or not sorted by accession): it is then never spliced.
    `known`: the indexes of files already recorded, by digest: a file with the same bytes (the
    ensemble copied from a partition's TopGO files) takes that index instead of parsing again."""
    body = path.read_bytes()
    digest = sha256(body)
    index = (known or {}).get(digest)
    if index is None:
        index = io_.line_index(body, separator, header)
    return None if index is None else (index, digest)


def record_folder(
    root: Path, folder: Path, into: dict[str, Recorded | None], known: Iterable[Recorded | None] = ()
) -> None:
    """`record` of every TopGO file (TSV, no header) of `root / folder`, keyed by relative path;
    `known`: files recorded already, whose indexes a file of the same bytes takes."""
    by_digest = {kept[1]: kept[0] for kept in known if kept is not None}
    for name in listing(root / folder):
        into[str(folder / name)] = record(root / folder / name, "\t", False, by_digest)


def write_lines(root: Path, recorded: dict[str, Recorded]) -> str:
    """state/lines.parquet under `root` from every file's index; returns its digest."""
    frames = [recorded[file][0].frame(file) for file in sorted(recorded)]
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=io_.LINES)
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    data = buffer.getvalue()
    exports.write_bytes_atomic(root / LINES_STATE, data)
    return sha256(data)


def read_lines(published: Path, digest: object, digests: object) -> dict[str, Recorded] | str:
    """Each file's stored (index, digest), or why there is none to trust: `digest` is the
    lines.parquet's and `digests` the files', as run.json recorded them."""
    if not isinstance(digest, str) or not isinstance(digests, dict):
        return "no line index recorded"
    try:
        data = (published / LINES_STATE).read_bytes()
    except OSError:
        return "state/lines.parquet is missing"
    if sha256(data) != digest:
        return "state/lines.parquet is not the one run.json recorded"
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception:  # polars/pyarrow raise many kinds for a damaged file
        return "state/lines.parquet is damaged"
    if dict(frame.schema) != io_.LINES:
        return "state/lines.parquet has other columns"
    indexes: dict[str, Recorded] = {}
    for (file,), rows in frame.partition_by("file", as_dict=True, maintain_order=True).items():
        index = LineIndex.from_frame(rows)
        if index is None or not isinstance(digests.get(file), str):
            return f"the line index of {file} is damaged"
        indexes[file] = (index, digests[file])
    if set(indexes) != set(digests):
        return "the line indexes are not those of the recorded files"
    return indexes


def splice_file(
    old: Path, recorded: Recorded, new: bytes | None, drop: Iterable[str], separator: str, header: bool
) -> tuple[list[memoryview], LineIndex] | str:
    """The pieces of the previous file `old` spliced with `new` (the rebuilt accessions' lines
    of `drop`; None: nothing rebuilt), and the result's index; or why it cannot be spliced."""
    index, digest = recorded
    try:
        body = old.read_bytes()
    except OSError:
        return f"{old.name} cannot be read"
    if sha256(body) != digest:
        return f"{old.name} is not the file the state recorded (its digest differs)"
    if not index.fits(body):
        return f"the line index of {old.name} does not fit it"
    if new is None:
        return [memoryview(body)], index
    spliced = io_.splice_indexed(body, index, new, drop, separator, header)
    if spliced is None:
        return f"{old.name} does not splice (its columns or its rebuilt lines differ)"
    return spliced


def write_pieces(path: Path, pieces: list[memoryview]) -> str:
    """Write the concatenated `pieces` to `path` atomically; returns their SHA-256.

    Joined first: the summary and the ensemble are written beside other stages, and each of
    thousands of small writes would give up the GIL and wait to take it back."""
    data = b"".join(pieces)
    exports.write_bytes_atomic(path, data)
    return sha256(data)


def splice_folder(
    old: Path, new: Path, target: Path, affected: set[str], recorded: dict[str, Recorded]
) -> dict[str, Recorded] | str:
    """The TopGO files (TSV, no header) of `old` spliced with `new`'s lines into the folder
    `target`, by name → the previous file's (index, digest); the written files' (index,
    digest), or why not (then nothing is written)."""
    results = {}
    for name in sorted(set(listing(old)) | set(listing(new))):
        after = (new / name).read_bytes() if (new / name).exists() else b""
        if (old / name).exists():
            previous = recorded.get(name)
            if previous is None:
                return f"{old.name}/{name} has no line index"
            spliced = splice_file(old / name, previous, after, affected, "\t", False)
        else:  # a category the previous run did not have: the rebuilt lines are the whole file
            index = io_.line_index(after, "\t", False)
            spliced = ([memoryview(after)], index) if index is not None else f"{name} has no line index"
        if isinstance(spliced, str):
            return spliced
        if spliced[1].size:
            results[name] = spliced
    target.mkdir(parents=True, exist_ok=True)
    return {name: (index, write_pieces(target / name, pieces)) for name, (pieces, index) in results.items()}


def listing(folder: Path) -> list[str]:
    """The files of a TopGO folder (not the hidden temporaries of an atomic write)."""
    try:
        return sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith("."))
    except OSError:
        return []


def check_run_state(published: Path, path: Path, run_format: str, outputs: str):
    """(state/run.json, the line indexes of the files it records) when every file it records
    is still the one it recorded, with its line index intact; else why not."""
    try:
        state = json.loads((published / path).read_text())
    except (OSError, ValueError):
        return "no readable state/run.json"
    if not isinstance(state, dict) or state.get("format") != run_format:
        return "state/run.json is from another code version"
    if state.get("outputs") != outputs or not isinstance(state.get("files"), dict):
        return "state/run.json records other output settings"
    files = state["files"]
    # each partition's raw rows as run.json saw them: never trusted beside another run's states
    for relative, recorded in [*files.items(), *state.get("raw", {}).items()]:
        if io_.signature(published / relative) != recorded:
            return f"{relative} is not the file the state recorded"
    for folder in state.get("folders", []):  # no file added to a recorded folder since
        listed = {str(Path(folder) / name) for name in listing(published / folder)}
        if listed != {name for name in files if Path(name).parent == Path(folder)}:
            return f"{folder} holds other files than the state recorded"
    indexes = read_lines(published, state.get("lines"), state.get("digests"))
    if isinstance(indexes, str):
        return indexes
    if set(indexes) != set(files):
        return "the line indexes are not those of the recorded files"
    return state, indexes
