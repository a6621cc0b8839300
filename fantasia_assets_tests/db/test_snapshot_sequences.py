"""The stamp's sequence files (`db.snapshot.LiveReads.prepare_finish`) serve the raw rows'
reference sequences once written: the very rows the database returns, the database for any id
they lack."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.db import reads as db_reads
from fantasia_assets.db.snapshot import LiveReads


def _scope(engine) -> ReferenceScope:
    type_id = min(LiveReads(engine).model_types().values())
    return ReferenceScope(type_id, 0, None, frozenset())


def _recording(engine) -> LiveReads:
    """Reads that record for a stamp, as on the embedded server's own database (the tests' fresh
    databases are not it, so the run's start is set by hand)."""
    reads = LiveReads(engine)
    reads._start = {"test": True}
    return reads


def test_sequences_come_from_the_prepared_files_as_the_database_gives_them(sample_loaded, monkeypatch):
    engine = sample_loaded
    reads = _recording(engine)
    scope = _scope(engine)
    reads.reference_fingerprint(scope)  # the scope is read: the files will hold its sequences
    in_scope = db_reads.fetch_scope_sequences(engine, scope)["sequence_id"].to_numpy()
    outside = np.array([in_scope.max() + 10_000])  # no such sequence: only the database knows
    wanted = np.concatenate([in_scope[::3], in_scope[:5]])  # repeated ids, unsorted
    expected = db_reads.fetch_sequences(engine, wanted)
    with ThreadPoolExecutor(1) as background:
        reads.prepare_finish(background)
        prepared = reads._prepared
        reads.prepare_finish(background)  # no scope read since: nothing again
        assert reads._prepared is prepared
        prepared[1].result()

    asked = []
    monkeypatch.setattr(db_reads, "fetch_sequences", lambda _, ids: asked.append(ids) or expected)
    served = reads.fetch_sequences(wanted)
    assert asked == []  # from the files
    assert served.equals(expected)
    assert served["sequence_id"].to_list() == sorted(set(wanted.tolist()))
    reads.fetch_sequences(np.concatenate([wanted, outside]))
    assert len(asked) == 1  # an id the files lack: the database answers


def test_sequences_come_from_the_database_until_the_files_are_written(sample_loaded, monkeypatch):
    engine = sample_loaded
    reads = _recording(engine)
    reads.reference_fingerprint(_scope(engine))
    asked = []
    original = db_reads.fetch_sequences
    monkeypatch.setattr(db_reads, "fetch_sequences", lambda e, ids: asked.append(ids) or original(e, ids))
    ids = np.array([1, 2])
    assert reads.fetch_sequences(ids).equals(original(engine, ids))  # nothing prepared
    assert len(asked) == 1
