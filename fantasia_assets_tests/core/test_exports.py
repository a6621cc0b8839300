"""Output helpers: safe names, FASTA text, whole-folder replacement."""

import pytest

from fantasia_assets.core.exports import fasta_bytes, replace_dir, safe_name


def test_safe_name_keeps_plain_names_and_separates_changed_ones():
    assert safe_name("P12345") == "P12345"
    assert safe_name("Q9-1.2_x") == "Q9-1.2_x"
    changed = [safe_name(n) for n in ("a/b", "a_b~", "../../etc/passwd", "...", "x" * 300, "a\x00b", "a\nb")]
    assert all("/" not in n and "\x00" not in n and "\n" not in n and not n.startswith(".") for n in changed)
    assert all(len(n) <= 131 for n in changed)
    assert safe_name("a/b") != safe_name("a_b") and safe_name("a/b") != safe_name("a|b")


def test_fasta_wraps_at_sixty_and_keeps_empty_records():
    text = fasta_bytes([("Q0", "A" * 130), ("R5", "MK"), ("E", "")]).decode()
    assert text == ">Q0\n" + "A" * 60 + "\n" + "A" * 60 + "\n" + "A" * 10 + "\n>R5\nMK\n>E\n"
    assert fasta_bytes([]) == b""


def test_replace_dir_swaps_whole_content(tmp_path):
    target = tmp_path / "layer_0"
    replace_dir(target, lambda d: (d / "a.csv").write_text("1"))
    replace_dir(target, lambda d: (d / "b.csv").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_0"]  # no temporary or old folder left

    def failing(d):
        (d / "c.csv").write_text("3")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_dir(target, failing)
    assert sorted(p.name for p in target.iterdir()) == ["b.csv"]  # a failed build leaves the old content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_0"]


@pytest.mark.parametrize(
    "options",
    [{}, {"include_header": False, "separator": "\t", "float_precision": 3}, {"float_precision": 0}],
)
def test_utf8_csv_is_the_encoded_text_polars_writes(options):
    import polars as pl

    from fantasia_assets.core.exports import utf8_csv

    frame = pl.DataFrame(
        {
            "text": ["é\nx", 'q"u,o', None, "", "日本", "a\r\nb"],
            "value": [1.5, None, float("nan"), -0.0, 1e300, 2.5e-7],
            "count": [1, 2, None, -3, 0, 2**40],
        }
    )
    for rows in (frame, frame.head(0)):
        assert utf8_csv(rows, **options) == rows.write_csv(**options).encode("utf-8")
