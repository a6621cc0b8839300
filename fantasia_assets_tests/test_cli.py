"""Every command has --help; bad input ends with a clear message and exit status 2."""

import subprocess
import sys

import pytest

COMMANDS = ["load-references", "lookup", "demo"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", *command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "usage: fantasia-assets" in out.stdout


def test_load_references_reports_bad_input(database_url, tmp_path, capsys):
    from fantasia_assets.cli import main

    bad = tmp_path / "x.gaf.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code = main(["load-references", "--gaf", str(bad), "--fasta", str(bad), "--obo", str(bad)])
    assert code == 2
    assert str(bad) in capsys.readouterr().err
