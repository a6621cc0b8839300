"""The reference store keeps each matrix's row digests beside its cache file (`ReferenceStore.
row_digests`): the very digests `core.row_digests` takes of the rows, read back by a later run,
taken again when the file is not theirs, and pruned with the matrix."""

from __future__ import annotations

import numpy as np

from fantasia_assets.core import row_digests as digests_module
from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.db.snapshot import LiveReads
from fantasia_assets.db.stores import ReferenceStore


def _matrix(engine, store: ReferenceStore):
    type_id = min(LiveReads(engine).model_types().values())
    return store.get(ReferenceScope(type_id, 0, None, frozenset()))


def test_digests_are_the_rows_digests_and_a_later_run_reads_them(sample_loaded, tmp_path, monkeypatch):
    store = ReferenceStore(sample_loaded, tmp_path / "cache")
    matrix = _matrix(sample_loaded, store)  # from the database: digested as the rows streamed in
    path = store.digests_file(store.cache_file(matrix.fingerprint))
    assert path.exists()
    expected = digests_module.row_digests(np.asarray(matrix.vectors))
    assert len(expected) == len(matrix) > 1

    def refuse(vectors, block=8192):
        raise AssertionError("hashed again")

    with monkeypatch.context() as patch:
        patch.setattr(digests_module, "row_digests", refuse)
        assert store.row_digests(matrix) == expected  # the streamed digests, read back
        later = ReferenceStore(sample_loaded, tmp_path / "cache")  # another run, the same cache
        assert later.row_digests(_matrix(sample_loaded, later)) == expected
    path.unlink()
    assert store.row_digests(matrix) == expected  # taken from the mapped rows when missing
    assert path.exists()

    np.save(path, np.zeros((len(matrix) - 1, 16), dtype=np.uint8))  # not this matrix's
    assert store.row_digests(matrix) == expected
    assert np.load(path).shape == (len(matrix), 16)  # replaced
    path.write_bytes(b"damaged")
    assert store.row_digests(matrix) == expected


def test_digests_are_pruned_with_their_matrix_and_never_taken_for_one(sample_loaded, tmp_path):
    store = ReferenceStore(sample_loaded, tmp_path / "cache", max_on_disk=1)
    matrix = _matrix(sample_loaded, store)
    store.row_digests(matrix)
    vectors = store.cache_file(matrix.fingerprint)
    store._prune()  # one matrix, its ids and digests: all kept
    assert vectors.exists() and store.digests_file(vectors).exists()
    store.max_on_disk = 0
    store._prune()
    assert not any(store.cache_dir.glob("matrix-*"))


class _Blocks:
    """A source that streams `count` blocks of float16 rows, as the database's COPY does."""

    def __init__(self, count: int, rows: int = 7, dim: int = 1024):
        rng = np.random.default_rng(3)
        self.blocks = [rng.standard_normal((rows, dim)).astype(np.float16) for _ in range(count)]

    def copy_reference_rows(self, scope, sink):
        for number, block in enumerate(self.blocks):
            sink(np.arange(number * len(block), (number + 1) * len(block), dtype=np.int64) + 1, block)
        return self.blocks[0].shape[1]


def test_streamed_digests_keep_row_order_and_few_blocks_wait(tmp_path, monkeypatch):
    import threading
    import time

    from fantasia_assets.db import stores

    source = _Blocks(40)
    store = ReferenceStore(None, tmp_path / "cache", source=source)
    real, pending, most = digests_module.row_digests, [0], [0]
    lock = threading.Lock()

    def slow(vectors, block=8192):  # a hasher far slower than the stream: blocks would queue up
        time.sleep(0.005)
        return real(vectors, block)

    original_submit = stores.ThreadPoolExecutor.submit

    def counting_submit(self, function, *arguments):
        with lock:
            pending[0] += 1
            most[0] = max(most[0], pending[0])
        future = original_submit(self, function, *arguments)
        future.add_done_callback(lambda _: _finished())
        return future

    def _finished():
        with lock:
            pending[0] -= 1

    monkeypatch.setattr(digests_module, "row_digests", slow)
    monkeypatch.setattr(stores.ThreadPoolExecutor, "submit", counting_submit)
    scope = ReferenceScope(1, 0, None, frozenset())
    matrix = store._from_database(store.cache_file("f" * 16), scope, "f" * 16)
    monkeypatch.setattr(digests_module, "row_digests", real)
    expected = real(np.asarray(matrix.vectors))
    assert np.array_equal(np.asarray(matrix.vectors), np.concatenate(source.blocks))
    stored = np.load(store.digests_file(store.cache_file("f" * 16)))
    assert [bytes(row) for row in stored] == expected
    assert 1 <= most[0] <= stores._HASHED_AHEAD
