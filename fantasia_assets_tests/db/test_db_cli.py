"""`fantasia-assets db upgrade|current|check` on a fresh database of the embedded server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fantasia_assets.cli import main
from fantasia_assets.db import migrate


def test_db_commands(database_url, capsys):
    head = migrate.head_revision()
    assert main(["db", "current"]) == 0
    assert f"revision: none (never migrated; this version expects {head}" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert f"schema upgraded: unversioned -> {head}" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert f"schema already at revision {head}" in capsys.readouterr().out
    assert main(["db", "current"]) == 0
    assert f"revision: {head} (current)" in capsys.readouterr().out
    assert main(["db", "check"]) == 0
    assert "schema matches the models" in capsys.readouterr().out

    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_seqemb_type"))
        conn.execute(sa.text("ALTER TABLE protein ALTER COLUMN organelle TYPE text"))
        conn.execute(sa.text("ALTER TABLE sequence_embedding_type ALTER COLUMN id DROP DEFAULT"))
        conn.execute(sa.text("ALTER TABLE accession DROP COLUMN tag"))
    engine.dispose()
    assert main(["db", "check"]) == 1
    out = capsys.readouterr().out
    assert "schema differs from the models (4):" in out
    assert "sequence_embedding_type.id: not a serial in the database" in out
    assert "column accession.tag is missing from the database" in out
    assert "index ix_seqemb_type on sequence_embeddings is missing from the database" in out
    assert "protein.organelle: type is TEXT() in the database, String() in the models" in out


@pytest.mark.parametrize("action", ["upgrade", "current", "check"])
def test_db_commands_have_help(action, capsys):
    with pytest.raises(SystemExit) as done:
        main(["db", action, "--help"])
    assert done.value.code == 0
    assert "FANTASIA_DATABASE_URL" in capsys.readouterr().out
