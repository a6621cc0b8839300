"""sequences.fasta of a rerun spliced from the previous one: the same bytes as writing it whole,
only the new references' sequences fetched, and a whole write (with the reason logged) wherever
the stored state does not prove the previous file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets import run_outputs
from fantasia_assets.core import exports
from fantasia_assets.core import incremental_fasta as fasta_
from fantasia_assets_tests.incremental.test_reruns import (
    REFS,
    _assert_equals_fresh_full_run,
    _config,
    _load,
    _names,
    _run,
    _subset_h5,
)

SEQUENCES = {1: "M" * 60, 3: "ACDE" * 31, 5: "", 7: "MKÜLV", 9: "W" * 121, 11: "PQ"}


def _whole(queries: list[str], references: dict[int, str]) -> bytes:
    """The file as one `fasta_bytes` call over every record writes it (the plain writer)."""
    records = [(f"Q{i}", s) for i, s in enumerate(queries)]
    return exports.fasta_bytes(records + [(f"R{i}", s) for i, s in sorted(references.items())])


def test_records_one_by_one_are_the_whole_file():
    parts, ids = fasta_.reference_records(SEQUENCES)
    assert ids.tolist() == sorted(SEQUENCES)
    assert fasta_.query_records(["MK", "LV"]) + b"".join(parts) == _whole(["MK", "LV"], SEQUENCES)


def _previous(queries: list[str], references: dict[int, str]):
    parts, ids = fasta_.reference_records(references)
    head = fasta_.query_records(queries)
    return head + b"".join(parts), len(head), ids, np.array([len(p) for p in parts])


def test_splice_equals_the_whole_file():
    old = {i: SEQUENCES[i] for i in (1, 3, 5, 7)}
    previous, query_bytes, ids, lengths = _previous(["MK", "LV"], old)
    # 3 no longer named, 9 and 11 new, 13 named but not found: left out, as the whole writer does
    wanted = np.array([1, 5, 7, 9, 11, 13])
    fetched = {9: SEQUENCES[9], 11: SEQUENCES[11]}
    expected = {i: SEQUENCES[i] for i in (1, 5, 7, 9, 11)}
    for queries in (None, ["MKV", "A" * 70, "LV"]):
        new_head = fasta_.query_records(queries) if queries else None
        chunks, new_ids, new_lengths = fasta_.splice(
            previous, query_bytes, ids, lengths, new_head, wanted, fetched
        )
        body = b"".join(chunks)
        assert body == _whole(queries or ["MK", "LV"], expected)
        assert new_ids.tolist() == [1, 5, 7, 9, 11]
        # the lengths describe the new file: a splice of it again keeps it whole
        again = fasta_.splice(body, len(chunks[0]), new_ids, new_lengths, None, new_ids, {})
        assert b"".join(again[0]) == body
    # nothing named any more: the query records alone
    chunks, new_ids, _ = fasta_.splice(previous, query_bytes, ids, lengths, None, np.array([], int), {})
    assert b"".join(chunks) == _whole(["MK", "LV"], {}) and len(new_ids) == 0


def test_splice_declines_a_file_laid_out_otherwise():
    previous, query_bytes, ids, lengths = _previous(["MK"], {i: SEQUENCES[i] for i in (1, 3, 7)})
    wanted = np.array([1, 3, 7])
    assert fasta_.splice(previous + b"\n", query_bytes, ids, lengths, None, wanted, {}) is None  # size
    moved = lengths + np.array([1, -1, 0])  # the same size, a record boundary elsewhere
    assert fasta_.splice(previous, query_bytes, ids, moved, None, wanted, {}) is None
    renamed = np.array([1, 4, 7])  # a header that names another id
    assert fasta_.splice(previous, query_bytes, renamed, lengths, None, wanted, {}) is None
    assert fasta_.splice(previous, query_bytes + 1, ids, lengths, None, wanted, {}) is None


def _fetched_ids(monkeypatch) -> list[int]:
    """The reference ids the FASTA writer asks the run's sequence cache for, recorded."""
    asked: list[int] = []
    plain = run_outputs.write_sequence_outputs

    def recorded(config, root, queries, raw, sequences, full=False):
        def get(ids):
            asked.extend(np.asarray(ids).tolist())
            return sequences(ids)

        return plain(config, root, queries, raw, get, full)

    monkeypatch.setattr(run_outputs, "write_sequence_outputs", recorded)
    return asked


def test_new_references_alone_are_fetched(engine, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fantasia_assets.sequence_outputs")
    names = _names(REFS)
    _load(engine, _subset_h5(REFS, tmp_path / "first.h5", names[:200]))
    raw = _config(tmp_path)
    _run(raw, engine)
    root = Path(raw["experiment_path"])
    mapping = (root / "query_index_mapping.csv").stat().st_ino
    layout = pl.read_parquet(root / "state" / "sequences.parquet")
    _load(engine, _subset_h5(REFS, tmp_path / "later.h5", names[200:]), gaf=[])
    asked = _fetched_ids(monkeypatch)
    caplog.clear()
    _, update = _run(raw, engine)
    assert update.kind == "references added" and update.details["outputs_rebuilt"] > 0
    assert not [r for r in caplog.records if "written in full" in r.getMessage()]
    fasta_ids = set(pl.read_parquet(root / "state" / "sequences.parquet")["sequence_id"].to_list())
    assert asked and sorted(asked) == sorted(fasta_ids - set(layout["sequence_id"].to_list()))
    assert (root / "query_index_mapping.csv").stat().st_ino == mapping  # the same query file: kept
    monkeypatch.undo()
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_unproven_state_writes_the_file_whole(engine, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fantasia_assets.sequence_outputs")
    _load(engine, REFS)
    raw = _config(tmp_path)
    _run(raw, engine)
    root = Path(raw["experiment_path"])
    state, layout, fasta = (
        root / "state/sequences.json",
        root / "state/sequences.parquet",
        root / "sequences.fasta",
    )
    before = fasta.stat().st_ino
    caplog.clear()
    _run(raw, engine)
    assert fasta.stat().st_ino == before  # nothing changed: the previous file, linked
    assert not [r for r in caplog.records if "written in full" in r.getMessage()]

    def other_code():
        state.write_text(json.dumps({**json.loads(state.read_text()), "format": "an older version"}))

    def damaged_layout():
        layout.write_bytes(b"PAR1 not a parquet file")

    def moved_record():  # a layout that adds up but puts a record boundary elsewhere
        frame = pl.read_parquet(layout)
        shifted = frame["bytes"].to_numpy() + np.r_[1, -1, np.zeros(frame.height - 2, dtype=np.int64)]
        exports.write_parquet_atomic(layout, frame.with_columns(pl.Series("bytes", shifted)))

    def edited():
        fasta.write_bytes(fasta.read_bytes().replace(b">R", b">r", 1))

    def missing():
        state.unlink()

    cases = [
        (other_code, "stored state of another format or code version"),
        (damaged_layout, "stored state damaged"),
        (moved_record, "the previous file is not laid out as its state says"),
        (edited, "sequences.fasta is not the file the state recorded"),
        (missing, "no stored state"),
    ]
    for harm, reason in cases:
        harm()
        caplog.clear()
        _run(raw, engine)
        logged = [r.getMessage() for r in caplog.records if "written in full" in r.getMessage()]
        assert len(logged) == 1 and f"written in full: {reason}" in logged[0], logged
        assert fasta.stat().st_ino != before
        before = fasta.stat().st_ino
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
