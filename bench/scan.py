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
scan that does not end is counted as a hang::

    .venv/bin/python bench/scan.py /work/scale-data/queries.h5 ../shared/data/queries_mouse.h5
    .venv/bin/python bench/scan.py --damage 500
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
    """Whether a scan's outcome skips a group for a heap that the library would walk without end."""
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

    def outcome(self, path: Path, plain: bool):
        try:
            return self._pool.apply_async(_outcome, (path, plain)).get(_LIMIT)
        except multiprocessing.TimeoutError:
            self._pool.terminate()
            self._pool = multiprocessing.get_context("fork").Pool(1)
            return _HUNG


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="query HDF5 files to time")
    parser.add_argument("--damage", type=int, default=0, help="damaged files per format to compare")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # damaged and odd groups are reported as warnings
    timings(args.files)
    if args.damage:
        damage(args.damage)


if __name__ == "__main__":
    main()
