"""When the lookup reads the annotation table: at once beside the query scan, or, for a query file
big enough that its search hides the read, once the reference matrix read ahead is in."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.lookup_start import DEFER_ANNOTATIONS_BYTES, read_annotations

SCOPE = ReferenceScope(0, None)


def _started(tmp_path, size: int | None, ahead: Future | None) -> tuple[Future, threading.Event]:
    """The table's read started for a query file of `size` bytes (None: no file); the event is set
    when `get` runs, and it returns the scope it was given."""
    path = tmp_path / "queries.h5"
    if size is not None:
        with open(path, "wb") as handle:
            handle.truncate(size)
    called = threading.Event()

    def get(scope):
        called.set()
        return scope

    executor = ThreadPoolExecutor(1)
    pending = read_annotations(executor, get, SCOPE, ahead, SimpleNamespace(embeddings_path=path))
    executor.shutdown(wait=False)
    return pending, called


@pytest.mark.parametrize(
    "size, with_ahead",
    [(DEFER_ANNOTATIONS_BYTES - 1, True), (DEFER_ANNOTATIONS_BYTES, False), (None, True)],
)
def test_read_at_once_for_a_small_file_a_per_aspect_search_or_no_file(tmp_path, size, with_ahead):
    ahead = Future() if with_ahead else None  # never done
    pending, _ = _started(tmp_path, size, ahead)
    assert pending.result(timeout=10) == SCOPE


@pytest.mark.parametrize("outcome", ["matrix", "error"])
def test_a_big_file_reads_the_table_once_the_matrix_is_in_whatever_its_outcome(tmp_path, outcome):
    ahead: Future = Future()
    pending, called = _started(tmp_path, DEFER_ANNOTATIONS_BYTES, ahead)
    assert not called.wait(0.2) and not pending.done()
    if outcome == "matrix":
        ahead.set_result("matrix")
    else:
        ahead.set_exception(RuntimeError("the prefetch's own read failed"))
    assert pending.result(timeout=10) == SCOPE
