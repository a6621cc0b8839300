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
