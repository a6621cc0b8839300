"""All or nothing per run: staged output sets are published together, or not at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fantasia_assets.core import exports, staging
from fantasia_assets.core.staging import MANIFEST, RunStaging, recover
from fantasia_assets_tests.hardening.helpers import hidden, tree

ENTRIES = [Path("parquet/M/layer_0/raw_rows.parquet"), Path("raw_results/M/layer_0"), Path("summary.csv")]


def _write_set(root: Path, tag: str) -> None:
    (root / "parquet/M/layer_0").mkdir(parents=True, exist_ok=True)
    (root / "parquet/M/layer_0/raw_rows.parquet").write_text(f"rows {tag}")
    shards = root / "raw_results/M/layer_0"
    shards.mkdir(parents=True, exist_ok=True)
    for name in ("A.csv", "B.csv") if tag == "old" else ("A.csv", "C.csv"):
        (shards / name).write_text(f"{name} {tag}")
    (root / "summary.csv").write_text(f"summary {tag}")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_publish_replaces_every_entry_and_leaves_nothing_hidden(tmp_path):
    _write_set(tmp_path, "old")
    with RunStaging(tmp_path) as run:
        _write_set(run.root, "new")
        run.publish(ENTRIES)
    expected = tmp_path / "expected"
    _write_set(expected, "new")
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("expected/")} == tree(expected)
    assert hidden(tmp_path) == []


def test_failure_before_publication_leaves_the_previous_tree_byte_for_byte(tmp_path):
    _write_set(tmp_path, "old")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="injected"), RunStaging(tmp_path) as run:
        _write_set(run.root, "new")
        raise RuntimeError("injected between two writes")
    assert tree(tmp_path) == before
    assert hidden(tmp_path) == []


def test_write_error_names_the_final_path_not_the_staging_folder(tmp_path):
    with pytest.raises(exports.OutputWriteError) as caught, RunStaging(tmp_path) as run:
        (run.root / "topgo").write_text("a file where a folder must go")
        exports.write_bytes_atomic(run.root / "topgo" / "P.topgo", b"x")
    assert f"cannot write {tmp_path / 'topgo' / 'P.topgo'}:" in str(caught.value)
    assert ".staging" not in str(caught.value) and hidden(tmp_path) == []


def test_staging_of_a_run_killed_while_writing_is_removed_by_the_next_run(tmp_path):
    _write_set(tmp_path, "old")
    before = tree(tmp_path)
    left = tmp_path / f".run.{_dead_pid()}-deadbeef.staging"
    _write_set(left, "new")
    recover(tmp_path)
    assert tree(tmp_path) == before and hidden(tmp_path) == []


def test_publication_killed_half_way_is_finished_by_the_next_run(tmp_path):
    _write_set(tmp_path, "old")
    left = tmp_path / f".run.{_dead_pid()}-deadbeef.staging"
    _write_set(left, "new")
    (left / MANIFEST).write_text(json.dumps({"entries": [str(e) for e in ENTRIES]}))
    # killed after the first entry moved and in the middle of swapping the shard folder
    exports.swap_in(left / ENTRIES[0], tmp_path / ENTRIES[0])
    shards = tmp_path / ENTRIES[1]
    shards.rename(shards.with_name(f".{shards.name}.{_dead_pid()}-cafe.old"))
    recover(tmp_path)
    expected = tmp_path.parent / f"{tmp_path.name}-expected"
    _write_set(expected, "new")
    assert tree(tmp_path) == tree(expected)
    assert hidden(tmp_path) == []


def test_staging_of_a_live_run_is_left_alone(tmp_path):
    live = tmp_path / f".run.{staging.os.getppid()}-0000.staging"
    live.mkdir()
    recover(tmp_path)
    assert live.exists()


def test_patched_folder_is_updated_file_by_file_and_a_killed_patch_is_finished(tmp_path):
    """A patch (an incremental run's shards): staged files replace or join the published ones,
    the named ones go, every other file keeps its inode; a publication killed half-way through
    the patch is finished by the next run to the same tree."""
    folder = Path("raw_results/M/layer_0")
    for killed in (False, True):
        root = tmp_path / f"experiment-{killed}"
        _write_set(root, "old")
        (root / folder / "D.csv").write_text("D.csv old")
        kept = (root / folder / "D.csv").stat().st_ino
        run = RunStaging(root)
        (run.root / folder).mkdir(parents=True)
        (run.root / folder / "A.csv").write_text("A.csv new")
        (run.root / folder / "C.csv").write_text("C.csv new")
        patches = {folder: ["B.csv"]}
        if killed:
            manifest = {"entries": [], "patches": {str(folder): ["B.csv"]}}
            (run.root / MANIFEST).write_text(json.dumps(manifest))
            (run.root / folder / "A.csv").replace(root / folder / "A.csv")  # killed after one move
            run.root.rename(root / f".run.{_dead_pid()}-deadbeef.staging")
            recover(root)
        else:
            with run:
                run.publish([], patches)
        shards = root / folder
        assert {p.name: p.read_text() for p in shards.iterdir()} == {
            "A.csv": "A.csv new",
            "C.csv": "C.csv new",
            "D.csv": "D.csv old",
        }
        assert (shards / "D.csv").stat().st_ino == kept
        assert not list(root.glob(".run.*"))


def _new_tree(tmp_path: Path) -> dict[str, str]:
    expected = tmp_path.parent / f"{tmp_path.name}-expected"
    _write_set(expected, "new")
    return tree(expected)


def test_ctrl_c_between_two_moves_of_the_publication__every_entry_published_then_interrupted(
    tmp_path, monkeypatch
):
    import os
    import signal

    _write_set(tmp_path, "old")
    moves, swap_in = [], exports.swap_in

    def interrupted_swap(staged, target):  # the user's Ctrl-C lands after the first move
        moves.append(target)
        if len(moves) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return swap_in(staged, target)

    monkeypatch.setattr(exports, "swap_in", interrupted_swap)
    with pytest.raises(KeyboardInterrupt), RunStaging(tmp_path) as run:
        _write_set(run.root, "new")
        run.publish(ENTRIES)
    assert len(moves) == len(ENTRIES)
    assert tree(tmp_path) == _new_tree(tmp_path)
    assert hidden(tmp_path) == []


def test_move_refused_midway_through_the_publication__the_next_run_completes_it(tmp_path, monkeypatch):
    _write_set(tmp_path, "old")
    moves, swap_in = [], exports.swap_in

    def refused_second(staged, target):
        moves.append(target)
        if len(moves) == 2:
            raise OSError(5, "Input/output error")
        return swap_in(staged, target)

    monkeypatch.setattr(exports, "swap_in", refused_second)
    with pytest.raises(OSError), RunStaging(tmp_path) as run:
        _write_set(run.root, "new")
        run.publish(ENTRIES)
    assert len(hidden(tmp_path)) == 1  # the staging folder, its manifest with it, is kept
    monkeypatch.setattr(exports, "swap_in", swap_in)
    recover(tmp_path)  # as the next run starts
    assert tree(tmp_path) == _new_tree(tmp_path)
    assert hidden(tmp_path) == []
