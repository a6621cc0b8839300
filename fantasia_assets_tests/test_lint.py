"""The house style is checked, not hoped for: ruff's lint and format on the whole project."""

import subprocess
import sys

from fantasia_assets_tests.conftest import PROJECT

PATHS = ["fantasia_assets", "fantasia_assets_tests", "bench", "scripts"]


def test_ruff_lint_and_format():
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *PATHS], cwd=PROJECT, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *PATHS],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert form.returncode == 0, form.stdout + form.stderr
