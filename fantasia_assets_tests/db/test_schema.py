"""The reference schema on the real embedded PostgreSQL: FANTASIA-compatible tables, pgvector."""

import sqlalchemy as sa

from fantasia_assets.db import schema_ready


def _columns(conn, table):
    rows = conn.execute(
        sa.text(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    ).all()
    return dict(rows)


def test_schema_and_extension_created(engine):
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
        assert {"id", "sequence", "sequence_hash"} <= set(_columns(conn, "sequence"))
        protein = _columns(conn, "protein")
        assert {"id", "sequence_id", "gene_name", "organism", "taxonomy_id", "description"} <= set(protein)
        assert protein["taxonomy_id"] == "varchar"
        assert {"code", "primary", "protein_id"} <= set(_columns(conn, "accession"))
        assert {"go_id", "category", "description"} <= set(_columns(conn, "go_terms"))
        assert {"protein_id", "go_id", "evidence_code"} <= set(_columns(conn, "protein_go_term_annotation"))
        assert {"id", "name", "description", "task_name", "model_name"} <= set(
            _columns(conn, "sequence_embedding_type")
        )
        embeddings = _columns(conn, "sequence_embeddings")
        assert embeddings["embedding"] == "halfvec"
        assert embeddings["shape"] == "_int4"
        assert embeddings["layer_index"] == "int4"
        uniques = (
            conn.execute(
                sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE tablename IN "
                    "('sequence_embeddings', 'protein_go_term_annotation', 'sequence') AND indexdef LIKE '%UNIQUE%'"
                )
            )
            .scalars()
            .all()
        )
        text = " ".join(uniques)
        assert "(sequence_id, embedding_type_id, layer_index)" in text
        assert "(protein_id, go_id)" in text
        assert "(sequence_hash)" in text


def test_schema_creation_is_idempotent(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO go_terms VALUES ('GO:0000001', 'P', 'kept')"))
    schema_ready(engine)
    schema_ready(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT description FROM go_terms")).scalar() == "kept"


def test_halfvec_round_trip(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO sequence (id, sequence, sequence_hash) VALUES (1, 'MK', 'h')"))
        conn.execute(sa.text("INSERT INTO sequence_embedding_type (id, name) VALUES (7, 'm')"))
        conn.execute(
            sa.text(
                "INSERT INTO sequence_embeddings (sequence_id, embedding_type_id, layer_index, embedding, shape) "
                "VALUES (1, 7, 0, '[0.5, -1.25, 3]'::halfvec, ARRAY[3])"
            )
        )
        value = conn.execute(sa.text("SELECT embedding::text FROM sequence_embeddings")).scalar()
    assert value == "[0.5,-1.25,3]"
