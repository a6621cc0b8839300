"""`db.copy_file.copied`: the server writes the COPY file itself on the embedded server (no row
through Python), with the very bytes the client COPY gives; anything else reads as a client."""

from __future__ import annotations

import pytest
from psycopg import sql

from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.db import copy_file
from fantasia_assets.db import reads as db_reads

_QUERY = sql.SQL(
    "SELECT p.sequence_id, p.id, p.organism, a.go_id FROM protein p "
    "JOIN protein_go_term_annotation a ON a.protein_id = p.id "
    "WHERE p.taxonomy_id = ANY(%(taxa)s) ORDER BY p.sequence_id, p.id, a.go_id"
)


def _taxa(engine) -> list[str]:
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute("SELECT DISTINCT taxonomy_id FROM protein WHERE taxonomy_id IS NOT NULL ORDER BY 1")
        return [row[0] for row in cursor.fetchall()]


def _client_only(monkeypatch) -> None:
    monkeypatch.setattr(copy_file, "_server_folder", lambda connection: None)


def test_the_server_writes_the_file_in_its_data_directory_and_it_is_removed(sample_loaded):
    engine = sample_loaded
    taxa = _taxa(engine)
    with engine.connect() as conn:
        folder = copy_file._server_folder(conn.connection.driver_connection)
    assert folder is not None  # the embedded server: a superuser over a Unix socket
    with copy_file.copied(engine, _QUERY, {"taxa": taxa[:1]}, "FORMAT csv, HEADER") as path:
        assert path.parent == folder and path.name.startswith("fantasia-copy-")
        written = path.read_bytes()
    assert not path.exists()
    assert written.count(b"\n") > 1  # the header and rows of the bound taxon


def test_server_and_client_files_hold_the_same_bytes(sample_loaded, monkeypatch):
    engine = sample_loaded
    taxa = _taxa(engine)
    for chosen in (taxa, taxa[:1], ["no-such-taxon"]):
        with copy_file.copied(engine, _QUERY, {"taxa": chosen}, "FORMAT csv, HEADER") as path:
            by_server = path.read_bytes()
        with monkeypatch.context() as patched:
            _client_only(patched)
            with copy_file.copied(engine, _QUERY, {"taxa": chosen}, "FORMAT csv, HEADER") as path:
                assert "fantasia-copy-" not in path.name
                by_client = path.read_bytes()
        assert by_server == by_client
    scope = ReferenceScope(0, None, frozenset(taxa[:1]), frozenset())
    expected = db_reads.fetch_annotations(engine, scope)
    assert len(expected)
    _client_only(monkeypatch)
    assert db_reads.fetch_annotations(engine, scope).equals(expected)


def test_a_file_the_server_wrote_out_of_sight_is_emptied_and_the_client_reads(sample_loaded, monkeypatch):
    engine = sample_loaded
    taxa = _taxa(engine)
    with copy_file.copied(engine, _QUERY, {"taxa": taxa}, "FORMAT csv, HEADER") as path:
        expected = path.read_bytes()
    left = []
    real = copy_file._visible

    def unseen(path):
        left.append(path)
        assert real(path)  # it is there: the test stands in for another file system
        return False

    monkeypatch.setattr(copy_file, "_visible", unseen)
    try:
        with copy_file.copied(engine, _QUERY, {"taxa": taxa}, "FORMAT csv, HEADER") as path:
            assert path not in left
            assert path.read_bytes() == expected
        assert len(left) == 1 and left[0].stat().st_size == 0  # nothing of the rows stays there
    finally:
        for path in left:
            path.unlink(missing_ok=True)


def test_a_session_without_superuser_reads_as_a_client(sample_loaded):
    engine = sample_loaded
    with engine.connect() as conn:
        connection = conn.connection.driver_connection
        cursor = connection.cursor()
        cursor.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fa_copy_reader') "
            "THEN CREATE ROLE fa_copy_reader NOLOGIN; END IF; END $$"
        )
        cursor.execute("SET ROLE fa_copy_reader")
        try:
            assert copy_file._server_folder(connection) is None
        finally:
            cursor.execute("RESET ROLE")
        connection.rollback()


@pytest.mark.parametrize("bad", ["x'; DROP TABLE protein; --", "a\\b"])
def test_values_stay_bound_on_the_server_path(sample_loaded, bad):
    engine = sample_loaded
    with copy_file.copied(engine, _QUERY, {"taxa": [bad]}, "FORMAT csv, HEADER") as path:
        assert path.read_bytes().count(b"\n") == 1  # the header only: no protein has that taxon
    assert _taxa(engine)  # the table is still there


def test_a_lookup_knows_whether_its_tables_come_through_the_client(sample_loaded, monkeypatch):
    """What `lookup_start.read_annotations` asks before deferring the annotation table's read."""
    from fantasia_assets.db.snapshot import LiveReads, RecordedReads

    reads = LiveReads(sample_loaded)
    assert copy_file.server_writes(sample_loaded) and not reads.copies_through_client()
    assert not RecordedReads({}).copies_through_client()  # cache files only: no server at all
    _client_only(monkeypatch)
    assert not copy_file.server_writes(sample_loaded) and reads.copies_through_client()
