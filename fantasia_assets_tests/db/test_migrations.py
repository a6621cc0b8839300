"""Alembic migrations: a database of the previous version upgraded in place, concurrency, once per process.

The previous version's database is rebuilt exactly: its DDL is the baseline revision (the same
statements its `ensure_schema` ran, as `pg_dump` shows them), and its rows are those its
loader wrote for the bundled sample (NEAR), copied column by column, plus what only it could hold: a
legacy embedding without a layer and a GO term without a category.
"""

from __future__ import annotations

import io
import threading

import pytest
import sqlalchemy as sa
from alembic import command

from fantasia_assets.db import get_engine, migrate, schema_ready
from fantasia_assets.db.engine import DatabaseError
from fantasia_assets.db.loader import load_references
from fantasia_assets.sample import SAMPLE_DIR
from fantasia_assets_tests.db.test_pis_schema import ddl

# (table, the columns the previous version had, its key), in foreign-key order
OLD_TABLES = [
    ("sequence", "id, sequence, sequence_hash", "id"),
    ("protein", "id, sequence_id, gene_name, organism, taxonomy_id, description", "id"),
    ("accession", 'code, "primary", protein_id', "code"),
    ("go_terms", "go_id, category, description", "go_id"),
    ("protein_go_term_annotation", "id, protein_id, go_id, evidence_code", "id"),
    ("sequence_embedding_type", "id, name, description, task_name, model_name", "id"),
    ("sequence_embeddings", "id, sequence_id, embedding_type_id, layer_index, embedding, shape", "id"),
]
SAMPLE_FILES = {
    "fasta": SAMPLE_DIR / "references.fasta.gz",
    "gaf": [SAMPLE_DIR / "references.gaf.gz"],
    "obo": SAMPLE_DIR / "go-basic.obo.gz",
    "embeddings": SAMPLE_DIR / "references_near.h5",
    "model": "NEAR",
}
SERIALS = ["sequence", "protein_go_term_annotation", "sequence_embeddings"]


def _to_revision(engine, revision: str, *, down: bool = False) -> None:
    with engine.begin() as conn:
        config = migrate._config(conn)
        (command.downgrade if down else command.upgrade)(config, revision)


def _rows(engine, table: str, columns: str, key: str) -> list[tuple]:
    with engine.connect() as conn:
        select = columns.replace("embedding,", "embedding::text,")
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT {select} FROM {table} ORDER BY {key}"))]


def _copy(source, target, table: str, columns: str, key: str) -> None:
    buffer = io.BytesIO()
    with source.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(f"COPY (SELECT {columns} FROM {table} ORDER BY {key}) TO STDOUT") as copy:
            for block in copy:
                buffer.write(block)
    with target.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            copy.write(buffer.getvalue())


@pytest.fixture()
def previous_version_database(make_database):
    """(engine, rows per table): a database as the previous version left it, never migrated."""
    source = get_engine(make_database())
    load_references(source, **SAMPLE_FILES)
    engine = sa.create_engine(make_database())
    _to_revision(engine, migrate.BASELINE)
    with engine.begin() as conn:  # that version had no revision table
        conn.execute(sa.text(f"DROP TABLE {migrate.VERSION_TABLE}"))
    for table, columns, key in OLD_TABLES:
        _copy(source, engine, table, columns, key)
    with engine.begin() as conn:
        for table in SERIALS:
            conn.execute(sa.text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
        conn.execute(
            sa.text(
                "INSERT INTO sequence_embeddings (sequence_id, embedding_type_id, layer_index, embedding, shape) "
                "SELECT sequence_id, embedding_type_id, NULL, embedding, shape FROM sequence_embeddings "
                "WHERE embedding_type_id = 1 AND layer_index = 0 ORDER BY sequence_id LIMIT 3"
            )
        )
        conn.execute(sa.text("INSERT INTO go_terms VALUES ('GO:9999999', NULL, 'a term without aspect')"))
    rows = {table: _rows(engine, table, columns, key) for table, columns, key in OLD_TABLES}
    yield engine, rows
    engine.dispose()


def test_previous_version_database_is_upgraded_in_place_without_loss(previous_version_database):
    old, before = previous_version_database
    engine = get_engine(old.url)
    schema_ready(engine)
    with engine.connect() as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()
    assert migrate.check(engine) == []
    for table, columns, key in OLD_TABLES:
        expected = before[table]
        if table == "sequence_embeddings":  # a legacy entry takes the legacy layer index
            expected = [(*r[:3], -1 if r[3] is None else r[3], *r[4:]) for r in expected]
        if table == "go_terms":  # PIS's marker for a term without aspect
            expected = [(r[0], "undefined" if r[1] is None else r[1], r[2]) for r in expected]
        assert _rows(engine, table, columns, key) == expected, table
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT count(*) FROM sequence_embeddings WHERE layer_index = -1")).scalar()
            == 3
        )
    # our loader finds everything it wrote before: a re-load changes nothing
    report = load_references(engine, **SAMPLE_FILES)
    assert report.proteins.inserted == report.proteins.updated == 0
    assert report.annotations.inserted == report.annotations.updated == report.annotations.deleted == 0
    assert all(c.inserted == c.updated == 0 for c in report.embeddings_by_layer.values())


def test_concurrent_first_uses_upgrade_once(make_database):
    url = make_database()
    engines = [sa.create_engine(url) for _ in range(3)]
    barrier = threading.Barrier(len(engines))
    results, errors = [], []

    def first_use(engine):
        barrier.wait()
        try:
            results.append(migrate.upgrade(engine))
        except Exception as error:  # the assertion below shows it
            errors.append(error)

    threads = [threading.Thread(target=first_use, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    head = migrate.head_revision()
    assert errors == []
    assert sorted(results, key=str) == sorted([(None, head), (head, head), (head, head)], key=str)


def test_schema_ready_queries_the_database_once_per_engine(engine):
    statements = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    for _ in range(3):
        schema_ready(engine)
    assert statements == []  # the fixture's call already made it ready


def test_a_newer_schema_is_refused_with_a_clear_error(engine):
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = 'fffffff'"))
    other = sa.create_engine(engine.url)
    try:
        with pytest.raises(DatabaseError, match="newer version"):
            schema_ready(other)
    finally:
        other.dispose()


def test_downgrade_returns_to_the_baseline_ddl(make_database):
    baseline, roundtrip = (sa.create_engine(make_database()) for _ in range(2))
    try:
        _to_revision(baseline, migrate.BASELINE)
        _to_revision(roundtrip, "head")
        _to_revision(roundtrip, migrate.BASELINE, down=True)
        assert ddl(roundtrip) == ddl(baseline)
        _to_revision(roundtrip, "head")
        assert migrate.check(roundtrip) == []
    finally:
        baseline.dispose()
        roundtrip.dispose()
