"""A rerun's shards: those whose bytes stay the same are linked from the published folder."""

from __future__ import annotations

import polars as pl

from fantasia_assets.core import exports


def test_unchanged_shards_are_linked_and_changed_ones_written(tmp_path):
    raw = pl.DataFrame({"accession": ["A", "A", "B", "C"], "distance": [0.1, 0.2, 0.3, 0.4]})
    published = tmp_path / "published"
    exports.write_raw_shards(published, raw, raw.columns, 4)
    (published / "C.csv").write_bytes(b"edited by hand\n")  # not what this run writes: rewritten
    changed = raw.with_columns(
        pl.when(pl.col("accession") == "B").then(0.5).otherwise(pl.col("distance")).alias("distance")
    )
    staged = tmp_path / "staged"
    exports.write_raw_shards(staged, changed, changed.columns, 4, previous=published)
    fresh = tmp_path / "fresh"
    exports.write_raw_shards(fresh, changed, changed.columns, 4)
    for name in ("A.csv", "B.csv", "C.csv"):
        assert (staged / name).read_bytes() == (fresh / name).read_bytes()
    inode = {name: (staged / name).stat().st_ino for name in ("A.csv", "B.csv", "C.csv")}
    assert inode["A.csv"] == (published / "A.csv").stat().st_ino
    assert inode["B.csv"] != (published / "B.csv").stat().st_ino
    assert inode["C.csv"] != (published / "C.csv").stat().st_ino
    assert (published / "C.csv").read_bytes() == b"edited by hand\n"  # the published folder is untouched


def test_a_missing_published_folder_writes_every_shard(tmp_path):
    """A first run's `previous` folder does not exist: the shards are those written without one."""
    raw = pl.DataFrame({"accession": ["A", "A", "B"], "distance": [0.1, 0.2, 0.3]})
    exports.write_raw_shards(tmp_path / "plain", raw, raw.columns, 4)
    exports.write_raw_shards(tmp_path / "staged", raw, raw.columns, 4, previous=tmp_path / "absent")
    for name in ("A.csv", "B.csv"):
        assert (tmp_path / "staged" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == ["A.csv", "B.csv"]
