"""A function that hands a stored halfvec over as its bytes, for the reference fetch.

`fa_halfvec_bytes(halfvec)` is PostgreSQL's own `byteasend` (detoast, copy) declared for a
halfvec argument: the stored value as it is (int16 dim, int16 unused, dim × float16, in the
server's byte order), instead of pgvector's `halfvec_send`, which writes each value with its own
call, byte-swapped (`db.halfvec`). Declaring a LANGUAGE internal function takes a superuser:
where the migrating role is not one, nothing is created and the fetch uses `halfvec_send`. It
is made here, once, and not by each read: DDL takes a transaction id, which the server-free
lookup's proof (`db.snapshot`) requires no read to take.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    superuser = op.get_bind().exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if superuser.scalar():
        op.execute(
            "CREATE OR REPLACE FUNCTION fa_halfvec_bytes(halfvec) RETURNS bytea "
            "LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteasend'"
        )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS fa_halfvec_bytes(halfvec)")
