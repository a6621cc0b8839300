"""Benchmark and damage check of the query-file scan, run by hand (not by CI).

Times `core.queries.scan` on each file given, side by side in one run, two rounds: through the
HDF5 library alone (h5py in worker processes, as before the direct reader, and in this process)
and with the direct reader (`core.h5fast`), and checks that both catalogues are identical.
With ``--damage N`` it also flips N random bits, one file at a time, in the metadata (anything
but the vectors' bytes) of a file of odd groups written in both HDF5 formats (the one the tests
use), and counts the damaged files whose catalogue or error differs between the two scans
(expected: 0). A scan that does not end (the HDF5 library can loop on a damaged file) is given
up on after 30 s. Where h5py's scan hangs and the direct reader's skips the groups whose sequence
the library would loop on (`h5fast.Endless`), the file is counted apart, as answered; any other
scan that does not end is counted as a hang. With ``--heaps N`` it damages N files per format
inside their global heap collections (object indices and sizes zeroed or set, random bytes,
zeroed runs), where the library's loop is common, and counts the files on which the direct
reader's prediction of that loop and the library's own read disagree (expected: 0)::

    .venv/bin/python bench/scan.py /work/scale-data/queries.h5 ../shared/data/queries_mouse.h5
    .venv/bin/python bench/scan.py --damage 500
    .venv/bin/python bench/scan.py --heaps 300
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fantasia_assets.core import queries


class _Plain:
    """Within it, the scan uses the HDF5 library alone."""

    def __enter__(self):
        self._open = queries.FastLayout.open
        queries.FastLayout.open = classmethod(lambda cls, path: None)

    def __exit__(self, *exc):
        queries.FastLayout.open = self._open


def _timed(path: Path, plain: bool, workers: int | None):
    started = time.perf_counter()
    if plain:
        with _Plain():
            catalogue = queries.scan(path, workers=workers)
    else:
        catalogue = queries.scan(path, workers=workers)
    return catalogue, time.perf_counter() - started


def _same(a, b) -> bool:
    if (a.accessions, a.sequences, a.skipped, a.attrs, list(a.layers)) != (
        b.accessions, b.sequences, b.skipped, b.attrs, list(b.layers)
    ):  # fmt: skip
        return False
    fields = ("rows", "offsets", "dims", "dtype_codes")
    return all(
        np.array_equal(getattr(a.layers[k], f), getattr(b.layers[k], f)) for k in a.layers for f in fields
    )


def timings(paths: list[Path]) -> None:
    for path in paths:
        for _ in range(2):
            results = [
                ("h5py, worker processes", *_timed(path, True, None)),
                ("h5py, this process", *_timed(path, True, 1)),
                ("direct reader", *_timed(path, False, 1)),
            ]
            groups = max(1, len(results[0][1].accessions))
            for label, _, seconds in results:
                print(
                    f"{path.name:24s} {label:24s} {seconds:7.2f} s  {1000 * seconds / groups:6.3f} ms/group"
                )
            print(f"{path.name:24s} identical catalogues: {_same(results[0][1], results[2][1])}")


def _outcome(path: Path, plain: bool):
    try:
        return _timed(path, plain, 1)[0]
    except queries.EmbeddingFileError as error:
        return str(error)


def damage(trials: int) -> None:
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "fantasia_assets_tests" / "core")]  # the tests' files
    from test_h5fast import FORMATS, _odd_file

    from fantasia_assets.core import h5bulk

    h5bulk._FEW = 2  # templates even for a file this small: the groups decoded together are damaged too

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for name, libver in FORMATS.items():
            path = Path(folder) / f"{name}.h5"
            _odd_file(path, libver)
            data = path.read_bytes()
            outside = np.ones(len(data), dtype=bool)
            for entries in _outcome(path, True).layers.values():
                for offset, dim, code in zip(entries.offsets, entries.dims, entries.dtype_codes, strict=True):
                    if offset >= 0:
                        outside[offset : offset + dim * (4 if code == 0 else 8)] = False
            metadata = np.flatnonzero(outside)
            differ, hung, answered = [], [], []
            with _Scanner() as scanner:
                for _ in range(trials):
                    damaged = bytearray(data)
                    where = int(rng.choice(metadata))
                    damaged[where] ^= 1 << int(rng.integers(0, 8))
                    broken = Path(folder) / "damaged.h5"
                    broken.write_bytes(bytes(damaged))
                    fast, plain = scanner.outcome(broken, False), scanner.outcome(broken, True)
                    if plain is _HUNG and _endless(fast):
                        answered.append(where)  # the library loops; the direct reader says where
                        continue
                    if fast is _HUNG or plain is _HUNG:
                        same = fast is plain
                        hung.append(where)
                    elif isinstance(fast, str) or isinstance(plain, str):
                        same = fast == plain
                    else:
                        same = _same(fast, plain)
                    if not same:
                        differ.append(where)
            print(
                f"format {name}: {trials} damaged files, {len(differ)} differ {differ[:10]}; "
                f"{len(answered)} where h5py's scan did not end within {_LIMIT} s and the direct "
                f"reader skipped the groups it would loop on {answered[:10]}; "
                f"{len(hung)} other scans that did not end {hung[:10]}"
            )


def _endless(outcome) -> bool:
    """Whether a scan's outcome skips a group, or refuses the file, for a heap that the library
    would walk without end."""
    if isinstance(outcome, str):  # the file refused: its attributes' heap
        return "reads again without end" in outcome
    skipped = getattr(outcome, "skipped", ())
    return any("reads again without end" in reason for _, reason in skipped)


_HUNG = object()  # the outcome of a scan given up on
_LIMIT = 30  # seconds a damaged file's scan may take


class _Scanner:
    """`_outcome` in a child process, given up on after `_LIMIT` seconds: a damaged file can make
    the HDF5 library itself loop without end (the plain h5py scan too), which no signal in this
    process can interrupt. A child that does not answer is killed and another one started."""

    def __enter__(self):
        self._pool = multiprocessing.get_context("fork").Pool(1)
        return self

    def __exit__(self, *exc) -> None:
        self._pool.terminate()

    def outcome(self, path: Path, plain: bool, call=None, limit: float = _LIMIT):
        """`_outcome(path, plain)` (or `call(path)`), or `_HUNG` after `limit` seconds."""
        try:
            task = (
                self._pool.apply_async(_outcome, (path, plain))
                if call is None
                else self._pool.apply_async(call, (path,))
            )
            return task.get(limit)
        except multiprocessing.TimeoutError:
            self._pool.terminate()
            self._pool = multiprocessing.get_context("fork").Pool(1)
            return _HUNG


def _library_reads(path: Path) -> int:
    """h5py reads the file's attributes and every dataset (an error is counted, the walk goes on):
    the number that failed. Run in a child: on a heap it walks without end, it never returns."""
    import h5py

    failed = 0

    def read(_name, item) -> None:
        nonlocal failed
        try:
            if isinstance(item, h5py.Dataset):
                item[()]
            elif isinstance(item, h5py.AttributeManager):
                dict(item)
        except Exception:
            failed += 1

    with h5py.File(path, "r") as handle:
        read("/", handle.attrs)  # the file's attributes first, as the scan reads them
        handle.visititems(read)
    return failed


def heaps(trials: int) -> None:
    """`--heaps`: damage the object headers of the odd file's global heap collections and count
    where the direct reader's prediction (a group skipped as read "without end", `h5heaps`) and
    the library (h5py reading every dataset, given up on after `_HEAP_LIMIT` s) disagree."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "fantasia_assets_tests" / "core")]  # the tests' files
    from test_h5fast import FORMATS, _odd_file

    from fantasia_assets.core import h5bulk

    h5bulk._FEW = 2  # templates even for a file this small
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder, _Scanner() as scanner:
        for name, libver in FORMATS.items():
            path = Path(folder) / f"{name}.h5"
            _odd_file(path, libver)
            data = path.read_bytes()
            headers = list(_object_headers(data))
            disagree, hung = [], 0
            for trial in range(trials):
                damaged = bytearray(data)
                for _ in range(int(rng.integers(1, 4))):
                    _damage_header(damaged, int(rng.choice(headers)), rng)
                broken = Path(folder) / "damaged.h5"
                broken.write_bytes(bytes(damaged))
                fast = scanner.outcome(broken, False)
                library = scanner.outcome(broken, True, call=_library_reads, limit=_HEAP_LIMIT)
                hung += library is _HUNG
                if fast is _HUNG or (library is _HUNG) != _endless(fast):
                    disagree.append(trial)
            print(
                f"format {name}: {trials} files damaged inside global heaps; the library did not "
                f"end on {hung}; the direct reader's prediction disagreed on {len(disagree)} {disagree[:10]}"
            )


_HEAP_LIMIT = 5  # seconds h5py may take to read the small damaged file


def _object_headers(data: bytes):
    """The byte of every object header of every global heap collection of an undamaged file."""
    collection = data.find(b"GCOL\x01")
    while collection >= 0:
        end = collection + int.from_bytes(data[collection + 8 : collection + 16], "little")
        at = collection + 16
        while at + 16 <= end:
            yield at
            if int.from_bytes(data[at : at + 2], "little") == 0:  # the free space: the last one
                break
            at += 16 + (int.from_bytes(data[at + 8 : at + 16], "little") + 7) // 8 * 8
        collection = data.find(b"GCOL\x01", collection + 1)


def _damage_header(data: bytearray, at: int, rng) -> None:
    """One of: the index zeroed, the size set small, both, one random byte, 16 bytes zeroed nearby."""
    kind = int(rng.integers(0, 5))
    if kind in (0, 2):
        data[at : at + 2] = bytes(2)
    if kind in (1, 2):
        data[at + 8 : at + 16] = int(rng.integers(0, 200)).to_bytes(8, "little")
    if kind == 3:
        data[at + int(rng.integers(0, 16))] = int(rng.integers(0, 256))
    if kind == 4:
        start = at + int(rng.integers(0, 64))
        data[start : start + 16] = bytes(16)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="query HDF5 files to time")
    parser.add_argument("--damage", type=int, default=0, help="damaged files per format to compare")
    parser.add_argument(
        "--heaps", type=int, default=0, help="files per format damaged inside global heaps, to predict"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # damaged and odd groups are reported as warnings
    timings(args.files)
    if args.damage:
        damage(args.damage)
    if args.heaps:
        heaps(args.heaps)


if __name__ == "__main__":
    main()
