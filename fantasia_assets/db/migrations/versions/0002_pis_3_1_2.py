"""The seven shared tables take PIS 3.1.2's schema (FANTASIA 4.1.1's databases).

Written to converge from either side: a database of the baseline revision, or a FANTASIA
database (already PIS-shaped, or partly so) that was stamped at the baseline because it had no
revision table. Every step therefore checks or tolerates what is already there, and no row is
removed: values PIS forbids are replaced by PIS's own markers (a NULL GO category by its default
'undefined', a NULL layer by the legacy layer index -1, which no real layer uses).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LEGACY_LAYER_INDEX = -1  # frozen here: a migration must not change when the models do
UNDEFINED = "undefined"

_PROTEIN_COLUMNS = {
    "data_class": "varchar",
    "molecule_type": "varchar",
    "created_date": "date",
    "sequence_update_date": "date",
    "annotation_update_date": "date",
    "organelle": "varchar",
    "comments": "varchar",
    "protein_existence": "integer",
    "seqinfo": "varchar",
    "disappeared": "boolean",
    "created_at": "timestamp",
    "updated_at": "timestamp",
}


def _constraint_exists(name: str) -> bool:
    bind = op.get_bind()
    return bool(
        bind.execute(
            sa.text(
                "SELECT 1 FROM pg_constraint WHERE conname = :name AND connamespace = current_schema()::regnamespace"
            ),
            {"name": name},
        ).scalar()
    )


def _primary_key(table: str) -> list[str]:
    return sa.inspect(op.get_bind()).get_pk_constraint(table)["constrained_columns"]


def upgrade() -> None:
    # sequence: text -> varchar (binary-compatible, no rewrite); the hash unique as an index
    op.execute("ALTER TABLE sequence ALTER COLUMN sequence TYPE varchar")
    op.execute("CREATE UNIQUE INDEX IF NOT EXISTS ix_sequence_sequence_hash ON sequence (sequence_hash)")
    op.execute("CREATE INDEX IF NOT EXISTS idx_sequence_hash ON sequence (sequence_hash)")
    op.execute("ALTER TABLE sequence DROP CONSTRAINT IF EXISTS sequence_sequence_hash_key")
    op.execute("ALTER TABLE sequence ALTER COLUMN sequence_hash DROP NOT NULL")

    added = ", ".join(f"ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in _PROTEIN_COLUMNS.items())
    op.execute(f"ALTER TABLE protein {added}")
    op.execute("ALTER TABLE protein ALTER COLUMN description TYPE varchar")
    op.execute("ALTER INDEX IF EXISTS ix_protein_sequence_id RENAME TO ix_fa_protein_sequence_id")
    op.execute("ALTER INDEX IF EXISTS ix_protein_taxonomy_id RENAME TO ix_fa_protein_taxonomy_id")
    op.execute("CREATE INDEX IF NOT EXISTS ix_fa_protein_sequence_id ON protein (sequence_id)")
    op.execute("CREATE INDEX IF NOT EXISTS ix_fa_protein_taxonomy_id ON protein (taxonomy_id)")

    op.execute(
        "ALTER TABLE accession ADD COLUMN IF NOT EXISTS tag varchar, "
        "ADD COLUMN IF NOT EXISTS created_at timestamp, ADD COLUMN IF NOT EXISTS updated_at timestamp"
    )
    op.execute('ALTER TABLE accession ALTER COLUMN "primary" DROP NOT NULL')
    op.execute("ALTER TABLE accession ALTER COLUMN protein_id DROP NOT NULL")
    op.execute("ALTER INDEX IF EXISTS ix_accession_protein_id RENAME TO ix_fa_accession_protein_id")
    op.execute("CREATE INDEX IF NOT EXISTS ix_fa_accession_protein_id ON accession (protein_id)")

    op.execute(sa.text("UPDATE go_terms SET category = :u WHERE category IS NULL").bindparams(u=UNDEFINED))
    op.execute("ALTER TABLE go_terms ALTER COLUMN category SET NOT NULL")
    op.execute("ALTER TABLE go_terms ALTER COLUMN description TYPE varchar")

    op.execute(
        sa.text(
            "UPDATE protein_go_term_annotation SET evidence_code = :u WHERE evidence_code IS NULL"
        ).bindparams(u=UNDEFINED)
    )
    op.execute("ALTER TABLE protein_go_term_annotation ALTER COLUMN evidence_code SET NOT NULL")
    # the unique (protein_id, go_id) serves lookups by protein as well
    op.execute("DROP INDEX IF EXISTS ix_protein_go_term_annotation_protein_id")
    if _constraint_exists("uq_protein_go_term"):
        op.execute(
            "ALTER TABLE protein_go_term_annotation RENAME CONSTRAINT uq_protein_go_term TO uq_pga_protein_go"
        )
    elif not _constraint_exists("uq_pga_protein_go"):
        op.execute(
            "ALTER TABLE protein_go_term_annotation ADD CONSTRAINT uq_pga_protein_go UNIQUE (protein_id, go_id)"
        )
    if _primary_key("protein_go_term_annotation") != ["id", "protein_id", "go_id"]:
        op.execute(
            "ALTER TABLE protein_go_term_annotation DROP CONSTRAINT protein_go_term_annotation_pkey, "
            "ADD CONSTRAINT protein_go_term_annotation_pkey PRIMARY KEY (id, protein_id, go_id)"
        )

    # explicit ids stay valid; the serial starts after the largest one
    op.execute("ALTER TABLE sequence_embedding_type ALTER COLUMN description TYPE varchar")
    op.execute(
        "CREATE SEQUENCE IF NOT EXISTS sequence_embedding_type_id_seq AS integer "
        "OWNED BY sequence_embedding_type.id"
    )
    op.execute(
        "ALTER TABLE sequence_embedding_type ALTER COLUMN id "
        "SET DEFAULT nextval('sequence_embedding_type_id_seq'::regclass)"
    )
    op.execute(
        "SELECT setval('sequence_embedding_type_id_seq', "
        "GREATEST(coalesce((SELECT max(id) FROM sequence_embedding_type), 0), "
        "coalesce(pg_sequence_last_value('sequence_embedding_type_id_seq'), 0)) + 1, false)"
    )

    op.execute(f"UPDATE sequence_embeddings SET layer_index = {LEGACY_LAYER_INDEX} WHERE layer_index IS NULL")
    op.execute("ALTER TABLE sequence_embeddings ALTER COLUMN layer_index SET NOT NULL")
    op.execute(
        "ALTER TABLE sequence_embeddings "
        "ADD COLUMN IF NOT EXISTS created_at timestamp NOT NULL DEFAULT now(), "
        "ADD COLUMN IF NOT EXISTS updated_at timestamp NOT NULL DEFAULT now()"
    )
    op.execute("ALTER TABLE sequence_embeddings DROP CONSTRAINT IF EXISTS uq_sequence_embedding_layer")
    if not _constraint_exists("uq_seqemb_seq_type_layer"):
        op.execute(
            "ALTER TABLE sequence_embeddings ADD CONSTRAINT uq_seqemb_seq_type_layer "
            "UNIQUE (sequence_id, embedding_type_id, layer_index)"
        )
    op.execute("CREATE INDEX IF NOT EXISTS ix_seqemb_seq ON sequence_embeddings (sequence_id)")
    op.execute("CREATE INDEX IF NOT EXISTS ix_seqemb_type ON sequence_embeddings (embedding_type_id)")
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_fa_seqemb_type_layer ON sequence_embeddings (embedding_type_id, layer_index)"
    )


def downgrade() -> None:
    """Back to the baseline; the PIS-only columns (and their values) are dropped."""
    op.execute("DROP INDEX ix_fa_seqemb_type_layer, ix_seqemb_type, ix_seqemb_seq")
    op.execute(
        "ALTER TABLE sequence_embeddings DROP CONSTRAINT uq_seqemb_seq_type_layer, "
        "ADD CONSTRAINT uq_sequence_embedding_layer "
        "UNIQUE NULLS NOT DISTINCT (sequence_id, embedding_type_id, layer_index), "
        "DROP COLUMN created_at, DROP COLUMN updated_at, ALTER COLUMN layer_index DROP NOT NULL"
    )
    op.execute(f"UPDATE sequence_embeddings SET layer_index = NULL WHERE layer_index = {LEGACY_LAYER_INDEX}")

    op.execute("ALTER TABLE sequence_embedding_type ALTER COLUMN id DROP DEFAULT")
    op.execute("DROP SEQUENCE sequence_embedding_type_id_seq")
    op.execute("ALTER TABLE sequence_embedding_type ALTER COLUMN description TYPE text")

    op.execute(
        "ALTER TABLE protein_go_term_annotation DROP CONSTRAINT protein_go_term_annotation_pkey, "
        "ADD CONSTRAINT protein_go_term_annotation_pkey PRIMARY KEY (id), "
        "ALTER COLUMN evidence_code DROP NOT NULL"
    )
    op.execute(
        "ALTER TABLE protein_go_term_annotation RENAME CONSTRAINT uq_pga_protein_go TO uq_protein_go_term"
    )
    op.execute(
        "CREATE INDEX ix_protein_go_term_annotation_protein_id ON protein_go_term_annotation (protein_id)"
    )

    op.execute("ALTER TABLE go_terms ALTER COLUMN category DROP NOT NULL, ALTER COLUMN description TYPE text")

    op.execute("ALTER INDEX ix_fa_accession_protein_id RENAME TO ix_accession_protein_id")
    op.execute(
        "ALTER TABLE accession DROP COLUMN tag, DROP COLUMN created_at, DROP COLUMN updated_at, "
        'ALTER COLUMN "primary" SET NOT NULL, ALTER COLUMN protein_id SET NOT NULL'
    )

    op.execute("ALTER INDEX ix_fa_protein_sequence_id RENAME TO ix_protein_sequence_id")
    op.execute("ALTER INDEX ix_fa_protein_taxonomy_id RENAME TO ix_protein_taxonomy_id")
    dropped = ", ".join(f"DROP COLUMN {name}" for name in _PROTEIN_COLUMNS)
    op.execute(f"ALTER TABLE protein {dropped}, ALTER COLUMN description TYPE text")

    op.execute(
        "ALTER TABLE sequence ADD CONSTRAINT sequence_sequence_hash_key UNIQUE (sequence_hash), "
        "ALTER COLUMN sequence_hash SET NOT NULL, ALTER COLUMN sequence TYPE text"
    )
    op.execute("DROP INDEX idx_sequence_hash, ix_sequence_sequence_hash")
