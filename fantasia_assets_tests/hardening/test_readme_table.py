"""The README's hardening table is generated from these tests' names and must be current."""

from __future__ import annotations

import importlib.util

from fantasia_assets_tests.conftest import PROJECT


def _generator():
    spec = importlib.util.spec_from_file_location(
        "hardening_table", PROJECT / "scripts" / "hardening_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_hardening_table__lists_every_hardening_test_as_generated():
    generator = _generator()
    rows = generator.rows()
    assert len(rows) >= 20
    readme = (PROJECT / "README.md").read_text()
    assert generator.render(readme) == readme, "run: python scripts/hardening_table.py"
    for _, tried, sees, _ in rows:
        assert f"| {tried} | {sees} |" in readme
