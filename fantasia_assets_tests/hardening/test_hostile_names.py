"""Hostile names: accessions and model names never escape experiment_path, never collide, and
their exact originals are recorded in output_names.csv."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from fantasia_assets.config import parse_config
from fantasia_assets.core import exports
from fantasia_assets.db.loader import load_references
from fantasia_assets.defs.partitions import partition_key
from fantasia_assets.runner import run_lookup
from fantasia_assets.sample import SAMPLE_DIR
from fantasia_assets_tests.hardening.helpers import (
    config_dict,
    hidden,
    near_only,
    sample_groups,
    write_queries,
)

# names an HDF5 group can carry (no '/', no NUL)
HDF5_HOSTILE = [
    "..",
    "...",
    "a\\b",
    "line\nbreak",
    "tab\there",
    " spaced ",
    "x" * 300,
    "P12345",
    "p12345",  # differs from the one above only by case
    "sp|P1|X",
    "-rf",
    "CON",
    "é\u202eevil",
    "$(touch pwned)",
    "a,b;c",
]


def _inside(root: Path) -> None:
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve()), path
        name = path.name
        assert "/" not in name and "\\" not in name and "\n" not in name and "\x00" not in name
        assert len(name.encode()) <= 255


def test_hostile_accessions_in_the_query_file__files_confined_unique_and_mapped(sample_loaded, tmp_path):
    groups = [("accession_" + name, content) for name, (_, content) in zip(HDF5_HOSTILE, sample_groups())]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    _inside(experiment)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert hidden(experiment) == []
    shards = experiment / "raw_results" / "NEAR" / "layer_0"
    files = sorted(p.name for p in shards.iterdir())
    assert len(files) == len(HDF5_HOSTILE)
    # unique even for a file system that ignores case
    assert len({f.casefold() for f in files}) == len(files)
    names = pl.read_csv(experiment / "output_names.csv").filter(pl.col("kind") == "accession")
    mapping = dict(names.select("name", "file_name").iter_rows())
    assert set(mapping) == set(HDF5_HOSTILE)  # exact originals, line break and all
    assert sorted(mapping.values()) == files
    for accession, file in mapping.items():
        recorded = pl.read_csv(shards / file)["accession"].unique().to_list()
        # CSV fields never break lines: a line break inside a name is written as a space
        assert recorded == [accession.replace("\n", " ")]
    unchanged = [a for a, f in mapping.items() if f == a + ".csv"]
    assert set(unchanged) == {"-rf", "CON"}
    topgo = pl.read_csv(
        experiment / "topgo" / "NEAR" / "layer_0" / "F.topgo",
        separator="\t",
        has_header=False,
        quote_char='"',
    )
    assert topgo.height > 0


@pytest.mark.parametrize(
    "accession",
    ["../../etc/passwd", "a/b", "/abs/olute", "nul\x00byte", ".", "..", ".hidden", "", "x" * 300],
    ids=["traversal", "slash", "absolute", "nul", "dot", "dotdot", "hidden", "empty", "long"],
)
def test_accessions_no_hdf5_group_can_hold__shard_writer_still_confines_them(tmp_path, accession):
    raw = pl.DataFrame({"accession": [accession, "P1"], "go_id": ["GO:1", "GO:2"]})
    target = tmp_path / "deep" / "shards"
    names = exports.write_raw_shards(target, raw.sort("accession"), ["accession", "go_id"], 4)
    _inside(tmp_path)
    written = sorted(p.name for p in target.iterdir())
    assert written == sorted(names.values()) and len(written) == 2
    assert not names[accession].startswith(".") and names[accession] != ".csv"
    assert names[accession] != "P1.csv"


def test_hostile_model_names__folders_and_partition_keys_safe_distinct_and_recorded(engine, tmp_path):
    # the sample's two models loaded under names that are paths, separators or reserved words
    models = {"esm/2|x,y...": "references_near.h5", "ensemble": "references_antiberty.h5"}
    for model, h5 in models.items():
        load_references(
            engine,
            fasta=SAMPLE_DIR / "references.fasta.gz",
            gaf=[SAMPLE_DIR / "references.gaf.gz"],
            obo=SAMPLE_DIR / "go-basic.obo.gz",
            embeddings=SAMPLE_DIR / h5,
            model=model,
        )
    raw = config_dict(tmp_path / "experiment")
    raw["embedding"]["models"] = {
        "esm/2|x,y...": {"enabled": True, "layer_index": [0]},
        "ensemble": {"enabled": True, "layer_index": [0]},
    }
    config = parse_config(raw)
    result = run_lookup(config, engine)
    experiment = config.experiment_path
    _inside(experiment)
    dirs = {p.name for p in (experiment / "raw_results").iterdir()}
    assert len(dirs) == 2 and "ensemble" not in dirs
    assert all("|" not in d and "," not in d and "..." not in d for d in dirs)
    # the run-wide ensemble keeps its folder; the model called "ensemble" has its own
    topgo = {p.name for p in (experiment / "topgo").iterdir()}
    assert topgo == dirs | {"ensemble"}
    ensemble_files = {p.name for p in (experiment / "topgo" / "ensemble").iterdir()}
    assert ensemble_files and all(name.endswith(".topgo") for name in ensemble_files)
    recorded = pl.read_csv(experiment / "output_names.csv").filter(pl.col("kind") == "model")
    assert dict(recorded.select("name", "file_name").iter_rows()) == {
        m: exports.model_dir_name(m) for m in models
    }
    keys = [partition_key(p.partition) for p in result.partitions]
    assert len(set(keys)) == 2
    # Dagster accepts them as dynamic partition keys
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("model_layer", keys)
        assert sorted(instance.get_dynamic_partitions("model_layer")) == sorted(keys)
    raw_rows = pl.read_parquet(next((experiment / "parquet").rglob("raw_rows.parquet")))
    assert set(raw_rows["model_name"]) <= set(models)
