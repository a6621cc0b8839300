"""Shard files made ahead (`core.ahead`): the folder written into them equals a plain write's."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from fantasia_assets.core import ahead, exports
from fantasia_assets.core.staging import RunStaging


def _raw() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "accession": ["A", "A", "B", "C", "D", "D", "D"],
            "distance": [0.1, 0.25, 0.3, 0.4, 0.5, 0.6, -0.0],
            "go_id": ["GO:1", "GO:2", "GO:1", "GO:3", None, "GO:4", "GO:5"],
        }
    )


def _folder(path) -> dict[str, tuple[bytes, int]]:
    """Name → (bytes, permission bits) of every entry, hidden ones included."""
    return {
        name: ((path / name).read_bytes(), stat.S_IMODE(os.lstat(path / name).st_mode))
        for name in sorted(os.listdir(path))
    }


def _made_ahead(target, names) -> None:
    ahead.create_ahead([(target, exports.tmp_sibling(target), names)])


@pytest.mark.parametrize(
    "names",
    [
        ["A.csv", "B.csv", "C.csv", "D.csv"],  # exactly the shards
        ["A.csv", "C.csv"],  # some shards not made ahead: created by the writer
        ["A.csv", "B.csv", "C.csv", "D.csv", "E.csv", "F.csv"],  # queries without rows: removed
        [],
    ],
)
def test_a_folder_made_ahead_is_written_as_the_plain_one(tmp_path, names):
    raw = _raw()
    plain = tmp_path / "plain" / "NEAR" / "layer_0"
    written = exports.write_raw_shards(plain, raw, raw.columns, 4)
    target = tmp_path / "ahead" / "NEAR" / "layer_0"
    _made_ahead(target, names)
    assert exports.write_raw_shards(target, raw, raw.columns, 4) == written
    assert _folder(target) == _folder(plain)
    assert os.listdir(target.parent) == ["layer_0"]  # the made folder was swapped in, none left
    assert ahead.claim(target) is None  # claimed once


def test_a_claim_stops_the_making_part_way_and_the_writer_completes_the_folder(tmp_path):
    raw = pl.DataFrame({"accession": [f"Q{i:04d}" for i in range(400)], "distance": [0.5] * 400})
    plain = tmp_path / "plain"
    exports.write_raw_shards(plain, raw, raw.columns, 4)
    target = tmp_path / "ahead"
    names = [f"Q{i:04d}.csv" for i in range(400)]
    started = threading.Event()
    real_open = os.open

    def slow_open(path, *args, **kwargs):  # the maker pauses after its first file, until claimed
        descriptor = real_open(path, *args, **kwargs)
        if (
            threading.current_thread().name == "files-ahead"
            and str(path).endswith(".csv")
            and not started.is_set()
        ):
            started.set()
            while target in ahead._pending:
                threading.Event().wait(0.001)
        return descriptor

    os.open = slow_open
    try:
        _made_ahead(target, names)
        made = ahead._pending[target]
        started.wait(10)
        exports.write_raw_shards(target, raw, raw.columns, 4)
    finally:
        os.open = real_open
    assert 1 <= len(made.made) < 400  # stopped part way
    assert _folder(target) == _folder(plain)


def test_linked_shards_replace_the_empty_files_made_ahead(tmp_path):
    raw = _raw()
    published = tmp_path / "published"
    exports.write_raw_shards(published, raw, raw.columns, 4)
    changed = raw.with_columns(
        pl.when(pl.col("accession") == "B").then(0.75).otherwise("distance").alias("distance")
    )
    staged = tmp_path / "staged"
    _made_ahead(staged, ["A.csv", "B.csv", "C.csv", "D.csv"])
    exports.write_raw_shards(staged, changed, changed.columns, 4, previous=published)
    fresh = tmp_path / "fresh"
    exports.write_raw_shards(fresh, changed, changed.columns, 4)
    assert _folder(staged) == _folder(fresh)
    assert (staged / "A.csv").stat().st_ino == (published / "A.csv").stat().st_ino
    assert (staged / "B.csv").stat().st_ino != (published / "B.csv").stat().st_ino


def test_two_accessions_on_one_file_fail_as_in_a_plain_write(tmp_path):
    raw = _raw()
    clash = {"A": "X.csv", "B": "X.csv", "C": "C.csv", "D": "D.csv"}
    with pytest.raises(exports.OutputWriteError) as plain:
        exports.write_raw_shards(tmp_path / "plain", raw, raw.columns, 4, clash)
    target = tmp_path / "ahead"
    _made_ahead(target, ["X.csv", "C.csv", "D.csv"])
    with pytest.raises(exports.OutputWriteError) as made:
        exports.write_raw_shards(target, raw, raw.columns, 4, clash)
    assert str(made.value) == str(plain.value).replace("plain", "ahead")
    assert os.listdir(tmp_path) == []  # neither folder, nor any temporary, is left


def test_a_run_that_fails_stops_the_making_and_leaves_nothing(tmp_path):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "raw_results" / "NEAR" / "layer_1").mkdir(parents=True)  # published: not made ahead
    with pytest.raises(RuntimeError), RunStaging(experiment) as staging:
        folders = [Path("raw_results") / "NEAR" / f"layer_{k}" for k in (0, 1)]
        staging.make_ahead(folders, [f"Q{i}.csv" for i in range(200)])
        assert staging.root / folders[0] in ahead._pending
        assert staging.root / folders[1] not in ahead._pending
        raise RuntimeError("the run fails before writing its shards")
    assert not ahead._pending
    assert sorted(os.listdir(experiment)) == ["raw_results"]  # the staging folder is gone


def test_a_folder_the_maker_has_not_come_to_is_never_made_and_its_claim_does_not_wait(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    gate, paused = threading.Event(), threading.Event()
    real_open = os.open

    def gated_open(path, *args, **kwargs):  # the maker waits inside the first folder until let go
        if threading.current_thread().name == "files-ahead" and str(path).endswith(".csv"):
            paused.set()
            assert gate.wait(10)
        return real_open(path, *args, **kwargs)

    os.open = gated_open
    try:
        ahead.create_ahead(
            [(first, exports.tmp_sibling(first), ["a.csv"]), (second, exports.tmp_sibling(second), ["b.csv"])]
        )
        assert paused.wait(10)
        assert ahead.claim(second) is None  # at once, while the maker is still in the first folder
    finally:
        gate.set()
        os.open = real_open
    made = ahead.claim(first)
    assert made is not None and made.made == {"a.csv"}
    raw = pl.DataFrame({"accession": ["b"], "distance": [0.5]})
    exports.write_raw_shards(second, raw, raw.columns, 4)  # written the plain way
    assert os.listdir(second) == ["b.csv"] and sorted(os.listdir(tmp_path)) == [made.folder.name, "second"]


def _flags(path) -> int | None:
    """The folder's inode flags (FS_IOC_GETFLAGS), or None where the file system has none."""
    import fcntl
    import struct

    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(descriptor, ahead._GETFLAGS, struct.pack("i", 0)))[0]
    except OSError:
        return None
    finally:
        os.close(descriptor)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inode flags are Linux's")
def test_the_staging_model_folder_spreads_its_shard_folders_and_no_written_folder_keeps_the_flag(tmp_path):
    if _flags(tmp_path) is None:
        pytest.skip("this file system has no inode flags")
    raw = _raw()
    target = tmp_path / "staging" / "raw_results" / "NEAR" / "layer_0"
    _made_ahead(target, ["A.csv", "B.csv"])
    exports.write_raw_shards(target, raw, raw.columns, 4)
    spread = _flags(target.parent)
    if not spread & ahead._TOPDIR:
        pytest.skip("this file system does not keep the top-of-hierarchy flag (not ext4)")
    assert not _flags(target) & ahead._TOPDIR  # the shard folder itself is plain: published as is
    assert not _flags(tmp_path / "staging" / "raw_results") & ahead._TOPDIR
