"""Two (model, layer) partitions materialised at the same time never write the same file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from fantasia_assets.config import parse_config
from fantasia_assets.core import exports
from fantasia_assets.core.plan import ModelSpec, Partition
from fantasia_assets.runner import partition_paths, run_lookup
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import config_dict, hidden, near_only, tree, write_config


def test_two_partitions_materialised_at_once__disjoint_files_and_same_results(sample_loaded, tmp_path):
    reference = tmp_path / "reference"
    run_lookup(parse_config(config_dict(reference, **near_only())), sample_loaded)

    experiment = tmp_path / "experiment"
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, **near_only()))
    env = {**os.environ, "FANTASIA_CONFIG": str(config)}
    go = tmp_path / "go"
    keys = ["NEAR|layer_0", "NEAR|layer_1"]
    records = [tmp_path / f"touched-{i}.txt" for i in range(2)]
    drivers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fantasia_assets_tests.hardening.partition_driver",
                key,
                str(experiment),
                str(record),
                str(go),
            ],
            cwd=PROJECT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key, record in zip(keys, records, strict=True)
    ]
    go.touch()
    outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    for driver, output in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, output[-3000:]

    touched = [set(record.read_text().split("\n")) - {""} for record in records]
    assert all(len(t) > 50 for t in touched)  # the hook saw the shard files
    assert touched[0].isdisjoint(touched[1]), sorted(touched[0] & touched[1])[:10]
    # each partition wrote only inside its own folders (or their temporaries, `.layer_0.<pid>-….tmp`)
    for key, paths in zip(keys, touched, strict=True):
        own = re.compile(rf"^[a-z_]+/NEAR/\.?{re.escape(key.split('|')[1])}(\.[^/]+)?(/|$)")
        assert all(own.match(p) for p in paths), [p for p in paths if not own.match(p)][:5]
    # and the results are the single-process ones
    for area in ("raw_results", "topgo"):
        for layer in ("layer_0", "layer_1"):
            assert tree(experiment / area / "NEAR" / layer) == tree(reference / area / "NEAR" / layer)
    assert hidden(experiment) == []


def test_partition_folders_of_distinct_models__never_the_same_even_after_sanitising(tmp_path):
    config = parse_config(config_dict(tmp_path / "experiment"))
    names = ["a/b", "a_b", "a|b", "a,b", "ensemble", "a...b", "a_b~" + "0" * 10, "..", "x" * 300, "x" * 301]
    folders = {
        partition_paths(config, Partition(ModelSpec(name), 1, layer))[area]
        for name in names
        for layer in (0, None)
        for area in ("shards", "topgo")
    }
    assert len(folders) == len(names) * 2 * 2
    base = config.experiment_path.resolve()
    assert all(f.resolve().is_relative_to(base) for f in folders)
    assert all(f.parent.name != "ensemble" for f in folders)


def test_same_outputs_written_by_two_writers_at_once__both_finish_and_one_whole_version_wins(tmp_path):
    """Two runs of one partition overlapping (a backfill and a sensor's run, say)."""
    target = tmp_path / "raw_results" / "NEAR" / "layer_0"
    summary = tmp_path / "summary.csv"
    started = threading.Barrier(2)
    errors = []

    def writer(tag: str) -> None:
        def build(folder):
            started.wait(timeout=30)  # both temporaries exist before either swaps
            for i in range(200):
                (folder / f"Q{i}.csv").write_text(f"{tag}\n" * 50)
            time.sleep(0.2)

        try:
            exports.replace_dir(target, build)
            exports.write_bytes_atomic(summary, tag.encode() * 500_000)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    contents = {p.read_text() for p in target.iterdir()}
    assert len(list(target.iterdir())) == 200 and contents in ({"A\n" * 50}, {"B\n" * 50})
    assert set(summary.read_bytes()) in ({ord("A")}, {ord("B")})
    assert hidden(tmp_path) == []


def _folder(path, tag):
    path.mkdir()
    for i in range(3):
        (path / f"Q{i}.csv").write_text(tag)
    return path


def _tags(target):
    return {p.read_text() for p in target.iterdir()}


def _interleaved(monkeypatch, when, other):
    """`exports.os.rename` runs `other()` once, just before the first call `when(src, dst)` picks."""
    real = os.rename
    done = []

    def rename(src, dst):
        if not done and when(src, dst):
            done.append(True)
            other()
        return real(src, dst)

    monkeypatch.setattr(exports.os, "rename", rename)
    return done


def test_another_writers_folder_lands_between_our_two_renames__ours_lands_whole_and_nothing_is_left(
    tmp_path, monkeypatch
):
    """We moved the old folder aside; before ours goes in, the other writer's takes the place."""
    target = _folder(tmp_path / "layer_0", "old")
    ours, theirs = _folder(tmp_path / "ours", "A"), _folder(tmp_path / "theirs", "B")
    done = _interleaved(
        monkeypatch,
        lambda src, dst: src == ours and not target.exists(),
        lambda: os.replace(theirs, target),  # the other writer, seeing no folder, renames straight in
    )
    exports.swap_in(ours, target)
    assert done and _tags(target) == {"A"} and not ours.exists()
    assert hidden(tmp_path) == []  # the old folder and the other writer's, both set aside, are gone


def test_another_writer_moves_the_old_folder_aside_first__ours_lands_whole(tmp_path, monkeypatch):
    target = _folder(tmp_path / "layer_0", "old")
    ours = _folder(tmp_path / "ours", "A")
    moved = tmp_path / ".layer_0.other.old"
    done = _interleaved(monkeypatch, lambda src, dst: src == target, lambda: os.rename(target, moved))
    exports.swap_in(ours, target)
    assert done and _tags(target) == {"A"} and not ours.exists()
    assert hidden(tmp_path) == [moved.name]  # the other writer's to remove, not ours


def test_a_rename_refused_in_the_middle_of_a_folder_swap__the_old_folder_is_back_in_place(
    tmp_path, monkeypatch
):
    target = _folder(tmp_path / "layer_0", "old")
    ours = _folder(tmp_path / "ours", "A")
    real = os.rename

    def rename(src, dst):
        if src == ours and not target.exists():
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(exports.os, "rename", rename)
    try:
        exports.swap_in(ours, target)
    except PermissionError:
        pass
    else:
        raise AssertionError("the refused rename was not raised")
    assert _tags(target) == {"old"} and _tags(ours) == {"A"}
    assert hidden(tmp_path) == []


def test_a_file_where_a_folder_is_written__the_folder_replaces_it(tmp_path):
    target = tmp_path / "layer_0"
    target.write_text("a file")
    exports.swap_in(_folder(tmp_path / "ours", "A"), target)
    assert _tags(target) == {"A"} and hidden(tmp_path) == []
