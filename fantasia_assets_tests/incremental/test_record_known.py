"""A file recorded with the indexes of files already recorded takes one only when its bytes
are the same (the ensemble copied from a partition's TopGO files): the index it gets is the one
parsing it gives."""

from __future__ import annotations

import shutil
from pathlib import Path

from fantasia_assets import incremental_lines as lines_


def _same(a: lines_.Recorded | None, b: lines_.Recorded | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[1] == b[1] and a[0].frame("f").equals(b[0].frame("f"))


def test_copied_files_take_the_known_index_and_others_are_parsed(tmp_path: Path) -> None:
    source, copy = tmp_path / "topgo", tmp_path / "ensemble"
    source.mkdir()
    (source / "P.topgo").write_bytes(b"A\tGO:1\t0.5000\nA\tGO:2\t0.2500\nB\tGO:1\t1.0000\n")
    (source / "F.topgo").write_bytes(b"C\tGO:3\t0.1000\nC\tGO:4\tNaN\n")
    (source / "C.topgo").write_bytes(b"B\tGO:9\t0.3000\nA\tGO:9\t0.3000\n")  # not sorted: no index
    shutil.copytree(source, copy)
    (copy / "F.topgo").write_bytes(b"D\tGO:3\t0.1000\n")  # other bytes than the partition's
    recorded: dict[str, lines_.Recorded | None] = {}
    lines_.record_folder(tmp_path, Path("topgo"), recorded)
    assert recorded["topgo/C.topgo"] is None
    reused: dict[str, lines_.Recorded | None] = {}
    lines_.record_folder(tmp_path, Path("ensemble"), reused, recorded.values())
    parsed: dict[str, lines_.Recorded | None] = {}
    lines_.record_folder(tmp_path, Path("ensemble"), parsed)
    assert set(reused) == set(parsed) == {"ensemble/C.topgo", "ensemble/F.topgo", "ensemble/P.topgo"}
    for name in parsed:
        assert _same(reused[name], parsed[name])
    assert reused["ensemble/P.topgo"][0] is recorded["topgo/P.topgo"][0]  # taken, not parsed
    assert reused["ensemble/F.topgo"][1] != recorded["topgo/F.topgo"][1]
    assert "D" in reused["ensemble/F.topgo"][0].frame("f")["accession"].to_list()
