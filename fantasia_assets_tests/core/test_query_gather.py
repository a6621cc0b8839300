"""Query vectors read in place from the file's bytes equal what the HDF5 library reads, whatever
their dtype and byte alignment; vector data cut off by a truncated file is an error naming it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fantasia_assets.core import queries


def _file(path, n=40, dim=37):
    """Groups whose vectors alternate float32 and float64, with sequences of varied lengths, so
    that vector offsets fall on every alignment; one chunked vector the library reads."""
    rng = np.random.default_rng(3)
    expected = {}
    with h5py.File(path, "w") as out:
        for i in range(n):
            group = out.create_group(f"accession_Q{i:03d}")
            group.create_dataset("sequence", data="MKV" * (i + 1), dtype=h5py.string_dtype())
            vector = rng.standard_normal(dim).astype("<f8" if i % 2 else "<f4")
            options = {"chunks": (8,)} if i == 7 else {}
            group.create_dataset("type_1/layer_0/embedding", data=vector, **options)
            expected[f"Q{i:03d}"] = vector.astype(np.float32)
    return expected


def test_vectors_read_in_place_equal_the_library(tmp_path):
    path = tmp_path / "q.h5"
    expected = _file(path)
    catalogue = queries.scan(path, workers=1)
    entries = catalogue.layers[(1, 0)]
    assert len(set((entries.offsets[entries.offsets >= 0] % 8).tolist())) > 1  # several alignments
    assert (entries.offsets < 0).sum() == 1  # the chunked one, through h5py
    vectors, rows, skipped = catalogue.read_valid((1, 0))
    assert not skipped
    for vector, row in zip(vectors, rows.tolist(), strict=True):
        assert vector.tobytes() == expected[catalogue.accessions[row]].tobytes()
    subset = np.array([5, 2, 9])
    read, read_rows = catalogue.read((1, 0), subset)
    assert read_rows.tolist() == subset.tolist()
    assert read.tobytes() == np.stack([expected[catalogue.accessions[r]] for r in subset]).tobytes()


def test_vector_data_past_the_end_of_the_file(tmp_path):
    path = tmp_path / "q.h5"
    _file(path)
    catalogue = queries.scan(path, workers=1)
    last = int(catalogue.layers[(1, 0)].offsets.max())
    with open(path, "r+b") as handle:
        handle.truncate(last + 4)
    with pytest.raises(queries.EmbeddingFileError, match="file is truncated"):
        catalogue.read_valid((1, 0))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_trusted_vectors_left_unread_give_the_same_rows_and_reasons(tmp_path, metric):
    """`trusted` accessions (a stored state's usable queries, same file) are kept unread; every
    other row is screened as before: the rows, the reasons and the vectors read are the plain ones."""
    path = tmp_path / "q.h5"
    rng = np.random.default_rng(5)
    with h5py.File(path, "w") as out:
        for i in range(12):
            vector = rng.standard_normal(8).astype(np.float32)
            if i == 3:
                vector[2] = np.nan
            if i == 6:
                vector[:] = 0.0
            if i == 9:
                vector = vector[:5]  # the wrong length
            group = out.create_group(f"accession_Q{i:02d}")
            group.create_dataset("sequence", data="MKV", dtype=h5py.string_dtype())
            group.create_dataset("type_1/layer_0/embedding", data=vector)
    catalogue = queries.scan(path, workers=1)
    plain, rows, skipped = catalogue.read_valid((1, 0), metric=metric)
    assert len(skipped) == (3 if metric == "cosine" else 2)
    trusted = {"Q00", "Q04", "Q07", "Q09", "Q11"}  # Q09: trusted, yet of the wrong length, so left out
    vectors, trusted_rows, trusted_skipped = catalogue.read_valid((1, 0), metric=metric, trusted=trusted)
    assert trusted_rows.tolist() == rows.tolist() and trusted_skipped == skipped
    unread = np.array([catalogue.accessions[r] in trusted for r in rows.tolist()])
    assert unread.sum() == 4 and not vectors[unread].any()
    assert vectors[~unread].tobytes() == plain[~unread].tobytes()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_queries_read_ahead_of_the_matrix_are_the_plain_read(tmp_path, metric):
    """`QueriesAhead` (the search's query vectors, read while the reference matrix streams in)
    hands over exactly what the search's own read gives for the matrix's length; for another
    length nothing (the search reads them again); and a file it cannot read, nothing, leaving the
    error to the search's own read."""
    from fantasia_assets.core.plan import ModelSpec, Partition, open_queries
    from fantasia_assets.core.stages import QueriesAhead, usable_queries

    path = tmp_path / "q.h5"
    _file(path)
    with h5py.File(path, "a") as out:  # a shorter vector, a NaN one and a zero one among them
        out.create_dataset("accession_S0/sequence", data="MKV", dtype=h5py.string_dtype())
        out.create_dataset("accession_S0/type_1/layer_0/embedding", data=np.ones(20, "<f4"))
        out.create_dataset("accession_S1/sequence", data="MKW", dtype=h5py.string_dtype())
        out.create_dataset("accession_S1/type_1/layer_0/embedding", data=np.full(37, np.nan, "<f4"))
        out.create_dataset("accession_S2/sequence", data="MKY", dtype=h5py.string_dtype())
        out.create_dataset("accession_S2/type_1/layer_0/embedding", data=np.zeros(37, "<f4"))
    query_set = open_queries(path)
    partition = Partition(ModelSpec("m"), 1, 0)
    ahead = QueriesAhead.start(query_set, partition, metric)
    assert ahead.dim == 37
    vectors, rows, skipped = usable_queries(query_set, partition, 37, metric, read=ahead.take(37))
    plain_vectors, plain_rows, plain_skipped = usable_queries(query_set, partition, 37, metric)
    assert vectors.tobytes() == plain_vectors.tobytes() and vectors.shape == plain_vectors.shape
    assert rows.tolist() == plain_rows.tolist() and skipped == plain_skipped
    assert len(skipped) == (3 if metric == "cosine" else 2)
    assert ahead.take(37) is None  # handed over once
    assert QueriesAhead.start(query_set, partition, metric).take(20) is None
    with open(path, "r+b") as handle:
        handle.truncate(int(query_set.catalogue.layers[(1, 0)].offsets.max()) + 4)
    assert QueriesAhead.start(query_set, partition, metric) is None
    with pytest.raises(queries.EmbeddingFileError, match="file is truncated"):
        usable_queries(query_set, partition, 37, metric)
