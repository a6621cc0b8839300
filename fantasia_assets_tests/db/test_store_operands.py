"""The reference store names where the search engine keeps its prepared operands of a cached
matrix (`ReferenceStore.operands_prefix`, `core/knn_reference.py`): only for a matrix mapped
from its own cache file, never mistaken for a matrix, and pruned with it."""

from __future__ import annotations

import os

import numpy as np

from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.db.stores import ReferenceStore
from fantasia_assets_tests.db.test_store_digests import _Blocks

SCOPE = ReferenceScope(1, 0, None, frozenset())


def test_only_a_matrix_mapped_from_its_cache_file_names_a_kept_place(tmp_path):
    store = ReferenceStore(None, tmp_path / "cache", source=_Blocks(3))
    path = store.cache_file("a" * 16)
    streamed = store._from_database(path, SCOPE, "a" * 16)
    assert streamed.kept_operands is None  # the run that streams the rows pays no extra write
    mapped = store._from_disk(path, SCOPE, "a" * 16)
    assert mapped.kept_operands == tmp_path / "cache" / f"matrix-{'a' * 16}.operands"
    assert np.array_equal(np.asarray(mapped.vectors), np.asarray(streamed.vectors))


def test_kept_operands_are_never_taken_for_a_matrix_and_go_with_theirs(tmp_path):
    store = ReferenceStore(None, tmp_path / "cache", source=_Blocks(2), max_on_disk=1)
    path = store.cache_file("b" * 16)
    store._from_database(path, SCOPE, "b" * 16)
    prefix = store.operands_prefix(path)
    kept = [
        prefix.with_name(prefix.name + suffix)
        for suffix in (".cosine-bf16.npy", ".cosine-bf16.rows.npy", ".cosine-bf16.json")
    ]
    for file in kept:
        file.write_bytes(b"x")
        os.utime(file, (path.stat().st_mtime + 60,) * 2)  # newer than the matrix
    store._prune()  # one matrix: it, its ids and its kept operands all stay
    assert path.exists() and store.ids_file(path).exists() and all(file.exists() for file in kept)
    store.max_on_disk = 0
    store._prune()
    assert not any(store.cache_dir.glob("matrix-*"))


def test_pruning_removes_kept_temporaries_of_dead_writers_only(tmp_path):
    store = ReferenceStore(None, tmp_path / "cache", source=_Blocks(2), max_on_disk=0)
    path = store.cache_file("c" * 16)
    store._from_database(path, SCOPE, "c" * 16)
    target = store.operands_prefix(path).name + ".cosine-bf16.npy"
    dead = store.cache_dir / f".{target}.999999999-deadbeef.tmp"  # no such process
    alive = store.cache_dir / f".{target}.{os.getpid()}-cafecafe.tmp"  # this process, writing now
    for tmp in (dead, alive):
        tmp.write_bytes(b"partial")
    store._prune()
    assert not path.exists() and not dead.exists()
    assert alive.exists()  # a live writer's temporary is its own to rename or remove
