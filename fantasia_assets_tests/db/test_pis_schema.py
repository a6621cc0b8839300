"""Our schema is PIS 3.1.2's for every shared table, as PostgreSQL itself describes both.

One database is made by PIS's own `create_all` (its model definitions, from the wheel), the other
by our migrations; every column (type, default, NOT NULL), constraint and index is compared as
the server reports it. Our own indexes (`ix_fa_*`) are the only difference allowed.
"""

from __future__ import annotations

import sqlalchemy as sa

from fantasia_assets.db import migrate
from fantasia_assets.db.models import SHARED_TABLES
from fantasia_assets_tests.db.pis import create_pis_database

OUR_INDEXES = {
    "protein": {"ix_fa_protein_sequence_id", "ix_fa_protein_taxonomy_id"},
    "accession": {"ix_fa_accession_protein_id"},
    "sequence_embeddings": {"ix_fa_seqemb_type_layer"},
}


def ddl(engine) -> dict[str, dict]:
    """Per shared table: columns, constraints and indexes, each as the server renders it."""
    out = {}
    with engine.connect() as conn:
        for table in SHARED_TABLES:
            columns = conn.execute(
                sa.text(
                    """
                    SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                           pg_get_expr(d.adbin, d.adrelid)
                    FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                    WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped
                    """
                ),
                {"t": table},
            ).all()
            constraints = conn.execute(
                sa.text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = CAST(:t AS regclass)"
                ),
                {"t": table},
            ).all()
            indexes = conn.execute(
                sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table}
            ).all()
            out[table] = {
                "columns": {name: (kind, not_null, default) for name, kind, not_null, default in columns},
                "constraints": dict(constraints),
                "indexes": dict(indexes),
            }
    return out


def _without_ours(schema: dict[str, dict]) -> dict[str, dict]:
    return {
        table: {**parts, "indexes": {k: v for k, v in parts["indexes"].items() if not k.startswith("ix_fa_")}}
        for table, parts in schema.items()
    }


def test_migrated_schema_is_pis_schema(make_database):
    pis_url, our_url = make_database(), make_database()
    create_pis_database(pis_url, shared_only=True)
    ours = sa.create_engine(our_url)
    theirs = sa.create_engine(pis_url)
    try:
        migrate.upgrade(ours)
        our_ddl, their_ddl = ddl(ours), ddl(theirs)
        for table in SHARED_TABLES:
            assert _without_ours(our_ddl)[table] == their_ddl[table], table
            extra = set(our_ddl[table]["indexes"]) - set(their_ddl[table]["indexes"])
            assert extra == OUR_INDEXES.get(table, set()), table
        # the serial ids PIS relies on, and the NOT NULL layer it declares
        columns = our_ddl["sequence_embedding_type"]["columns"]
        assert columns["id"][2] == "nextval('sequence_embedding_type_id_seq'::regclass)"
        assert our_ddl["sequence_embeddings"]["columns"]["layer_index"] == ("integer", True, None)
        # the models are what the migrations build
        assert migrate.check(ours) == []
    finally:
        ours.dispose()
        theirs.dispose()


def test_pis_database_is_recognised_and_takes_only_our_indexes(make_database):
    url = make_database()
    create_pis_database(url)  # with PIS's other tables too
    engine = sa.create_engine(url)
    try:
        before = ddl(engine)
        assert migrate.upgrade(engine) == (None, migrate.head_revision())
        after = ddl(engine)
        assert _without_ours(after) == before
        assert migrate.check(engine) == []
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        assert {"structure", "chain", "cluster", "state"} <= tables  # PIS's own tables untouched
    finally:
        engine.dispose()
