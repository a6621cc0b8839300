"""Baseline: the schema fantasia-assets created before migrations (its hand-written `ensure_schema`).

A database made by that version has no revision table; `db.migrate` stamps it at this revision,
then upgrades it. An empty database runs this revision first, then the later ones.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The DDL that version's models produced, as PostgreSQL itself dumped it.
_TABLES = [
    """
    CREATE TABLE sequence (
        id serial PRIMARY KEY,
        sequence text NOT NULL,
        sequence_hash varchar NOT NULL CONSTRAINT sequence_sequence_hash_key UNIQUE
    )
    """,
    """
    CREATE TABLE protein (
        id varchar PRIMARY KEY,
        sequence_id integer REFERENCES sequence (id),
        gene_name varchar,
        organism varchar,
        taxonomy_id varchar,
        description text
    )
    """,
    "CREATE INDEX ix_protein_sequence_id ON protein (sequence_id)",
    "CREATE INDEX ix_protein_taxonomy_id ON protein (taxonomy_id)",
    """
    CREATE TABLE accession (
        code varchar PRIMARY KEY,
        "primary" boolean NOT NULL,
        protein_id varchar NOT NULL REFERENCES protein (id)
    )
    """,
    "CREATE INDEX ix_accession_protein_id ON accession (protein_id)",
    "CREATE TABLE go_terms (go_id varchar PRIMARY KEY, category varchar, description text)",
    """
    CREATE TABLE protein_go_term_annotation (
        id serial PRIMARY KEY,
        protein_id varchar NOT NULL REFERENCES protein (id),
        go_id varchar NOT NULL REFERENCES go_terms (go_id),
        evidence_code varchar,
        CONSTRAINT uq_protein_go_term UNIQUE (protein_id, go_id)
    )
    """,
    "CREATE INDEX ix_protein_go_term_annotation_protein_id ON protein_go_term_annotation (protein_id)",
    """
    CREATE TABLE sequence_embedding_type (
        id integer PRIMARY KEY,
        name varchar NOT NULL CONSTRAINT sequence_embedding_type_name_key UNIQUE,
        description text,
        task_name varchar,
        model_name varchar
    )
    """,
    """
    CREATE TABLE sequence_embeddings (
        id serial PRIMARY KEY,
        sequence_id integer NOT NULL REFERENCES sequence (id),
        embedding_type_id integer NOT NULL REFERENCES sequence_embedding_type (id),
        layer_index integer,
        embedding halfvec NOT NULL,
        shape integer[],
        CONSTRAINT uq_sequence_embedding_layer
            UNIQUE NULLS NOT DISTINCT (sequence_id, embedding_type_id, layer_index)
    )
    """,
]

_DROP_ORDER = [
    "sequence_embeddings",
    "sequence_embedding_type",
    "protein_go_term_annotation",
    "go_terms",
    "accession",
    "protein",
    "sequence",
]


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    for statement in _TABLES:
        op.execute(statement)


def downgrade() -> None:
    for table in _DROP_ORDER:
        op.execute(f"DROP TABLE {table}")
