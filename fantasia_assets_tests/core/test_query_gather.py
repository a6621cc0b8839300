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
