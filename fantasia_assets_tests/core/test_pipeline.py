"""The whole lookup on the bundled sample: every SPEC §4 output, re-runs, masking, names."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import h5py
import numpy as np
import polars as pl
import pytest
import yaml
from pgvector import HalfVector

from fantasia_assets.config import parse_config
from fantasia_assets.core import exports, screen
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.hardening.helpers import tree


def _config(tmp_path: Path, queries: Path | None = None, **overrides) -> dict:
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(queries or SAMPLE / "queries.h5")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def test_lookup_writes_every_output(sample_loaded, tmp_path):
    config = parse_config(_config(tmp_path))
    result = run_lookup(config, sample_loaded)
    base = config.experiment_path
    assert {p.partition.key for p in result.partitions} == {
        "NEAR|layer_0", "NEAR|layer_1", "AntiBERTy|layer_0", "AntiBERTy|layer_3",
    }  # fmt: skip
    with h5py.File(SAMPLE / "queries.h5") as handle:
        accessions = sorted(k[len("accession_") :] for k in handle)
    for model, layer in (("NEAR", 0), ("NEAR", 1), ("AntiBERTy", 0), ("AntiBERTy", 3)):
        shards = base / "raw_results" / model / f"layer_{layer}"
        assert sorted(p.stem for p in shards.glob("*.csv")) == accessions
        frame = pl.read_csv(shards / f"{accessions[0]}.csv")
        assert frame.columns == exports.raw_columns(keep_sequences=False, alignment=True)
        assert (frame["model_name"] == model).all() and (frame["layer_index"] == layer).all()
        # neighbours ordered by distance, at most limit_per_entry of them
        neighbours = frame.unique("ref_idx", maintain_order=True)
        assert neighbours.height <= 5
        assert neighbours["distance"].to_list() == sorted(neighbours["distance"].to_list())
        assert np.allclose(frame["reliability_index"], 1 - frame["distance"], atol=2e-4)
        for category in ("P", "F", "C"):
            assert (base / "topgo" / model / f"layer_{layer}" / f"{category}.topgo").exists()
    for category in ("P", "F", "C"):
        lines = (base / "topgo" / "ensemble" / f"{category}.topgo").read_text().splitlines()
        assert lines and all(len(line.split("\t")) == 3 for line in lines)
    summary = pl.read_csv(base / "summary.csv")
    assert summary.columns[:4] == ["accession", "go_id", "category", "go_description"]
    assert {"final_score_NEAR_L0", "final_score_AntiBERTy_L3", "term_count", "proteins"} <= set(
        summary.columns
    )
    assert summary.select("accession", "go_id").is_unique().all()
    mapping = pl.read_csv(base / "query_index_mapping.csv")
    assert mapping.columns == ["query_idx", "query_fasta_id", "accessions", "sequence_length"]
    assert sorted("|".join(mapping["accessions"]).split("|")) == accessions
    fasta = (base / "sequences.fasta").read_text()
    assert fasta.count(">Q") == mapping.height
    refs_in_fasta = {int(line[2:]) for line in fasta.splitlines() if line.startswith(">R")}
    raw_refs = set(pl.read_parquet(base / "parquet" / "NEAR" / "layer_0" / "raw_rows.parquet")["ref_idx"])
    assert raw_refs <= refs_in_fasta


def test_rerun_is_byte_identical_and_replaces(sample_loaded, tmp_path):
    config = parse_config(_config(tmp_path))
    run_lookup(config, sample_loaded)
    first = tree(config.experiment_path)
    stray = config.experiment_path / "raw_results" / "NEAR" / "layer_0" / "GONE.csv"
    stray.write_text("from an earlier run")
    again = run_lookup(config, sample_loaded)
    assert tree(config.experiment_path) == first  # no duplicate rows, stray shard gone
    assert {p.matrix_source for p in again.partitions} == {"disk"}  # unchanged references: not refetched
    assert not list(config.experiment_path.rglob("*.tmp"))
    with duckdb.connect(str(config.experiment_path / "lineage.duckdb"), read_only=True) as conn:
        runs = conn.execute(
            "SELECT run_id, count(*), count(DISTINCT reference_version), any_value(config_hash), "
            "list(partition ORDER BY partition) FROM lineage GROUP BY run_id"
        ).fetchall()
    assert len(runs) == 2  # each CLI run recorded under its own generated run id
    for _, rows, references, config_hash, partitions in runs:
        assert rows == 5 and references == 5 and config_hash == config.fingerprint()
        assert partitions == ["AntiBERTy|layer_0", "AntiBERTy|layer_3", "NEAR|layer_0", "NEAR|layer_1", None]


@pytest.mark.skipif(not screen.int8_sums_exactly(), reason="this CPU's int8 product does not sum exactly")
def test_the_int8_screen_writes_the_very_outputs_of_the_default(sample_loaded, tmp_path):
    """`lookup.screening: int8` runs torch's int8 screen (a pinned screen skips the numpy engine
    of small searches) and every output file equals the default run's, byte for byte."""
    default = parse_config(_config(tmp_path / "default"))
    run_lookup(default, sample_loaded)
    pinned = parse_config(_config(tmp_path / "int8", **{"lookup.screening": "int8", "lookup.use_gpu": False}))
    built = []
    real_build = SearchEngine.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            SearchEngine, "build", lambda self, *a, **k: built.append(self) or real_build(self, *a, **k)
        )
        run_lookup(pinned, sample_loaded)
    assert built and {engine.screening for engine in built} == {"int8"}
    assert tree(pinned.experiment_path) == tree(default.experiment_path)


def test_identical_query_is_masked_by_mmseqs2(sample_loaded, tmp_path):
    """A query carrying a reference's own sequence and vector finds it at distance 0, unless masked."""
    queries = tmp_path / "queries.h5"
    with h5py.File(SAMPLE / "references_near.h5") as refs, h5py.File(queries, "w") as out:
        for name in sorted(refs)[:3]:
            group = out.create_group(name)
            group.create_dataset(
                "sequence", data=refs[name]["sequence"][()].decode(), dtype=h5py.string_dtype()
            )
            group.create_dataset("type_1/layer_0/embedding", data=refs[name]["type_1/layer_0/embedding"][()])
        accessions = [name[len("accession_") :] for name in sorted(refs)[:3]]
    base = {"embedding.models.AntiBERTy.enabled": False, "embedding.models.NEAR.layer_index": [0],
            "postprocess.alignment": False}  # fmt: skip
    plain = run_lookup(parse_config(_config(tmp_path / "plain", queries, **base)), sample_loaded)
    masked_config = parse_config(
        _config(tmp_path / "masked", queries, **base, **{"lookup.redundancy.identity": 0.9})
    )
    masked = run_lookup(masked_config, sample_loaded)
    assert plain.partitions[0].n_hits == masked.partitions[0].n_hits == 15  # k neighbours remain
    own = {}
    plain_hits = pl.read_parquet(
        tmp_path / "plain" / "experiment" / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet"
    )
    for accession in accessions:
        first = plain_hits.filter((pl.col("accession") == accession) & (pl.col("rank") == 0)).row(
            0, named=True
        )
        assert first["distance"] == pytest.approx(0.0, abs=1e-6)
        own[accession] = first["ref_idx"]
    masked_hits = pl.read_parquet(
        masked_config.experiment_path / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet"
    )
    for accession, ref in own.items():
        assert ref not in masked_hits.filter(pl.col("accession") == accession)["ref_idx"].to_list()


def test_hostile_accessions_stay_inside_the_experiment(sample_loaded, tmp_path):
    hostile = ["../../etc/passwd", "a/b", "...", "x" * 300, "semi;colon"]
    queries = tmp_path / "hostile.h5"
    with h5py.File(SAMPLE / "queries.h5") as source, h5py.File(queries, "w") as out:
        for name, new in zip(sorted(source)[:5], hostile, strict=True):
            group = out.create_group("accession_" + new.replace("/", "\u2215"))
            group.create_dataset(
                "sequence", data=source[name]["sequence"][()].decode(), dtype=h5py.string_dtype()
            )
            group.create_dataset(
                "type_1/layer_0/embedding", data=source[name]["type_1/layer_0/embedding"][()]
            )
    config = parse_config(
        _config(
            tmp_path,
            queries,
            **{"embedding.models.AntiBERTy.enabled": False, "embedding.models.NEAR.layer_index": [0]},
        )
    )
    run_lookup(config, sample_loaded)
    shards = config.experiment_path / "raw_results" / "NEAR" / "layer_0"
    files = sorted(p.name for p in shards.iterdir())
    assert len(files) == 5
    for path in config.experiment_path.rglob("*"):
        assert path.resolve().is_relative_to(config.experiment_path.resolve())
    for name in files:
        assert "/" not in name and not name.startswith(".") and len(name) < 200
    recorded = {pl.read_csv(shards / name)["accession"][0] for name in files}
    assert len(recorded) == 5


def test_model_without_references_is_skipped_with_a_warning(sample_loaded, tmp_path, caplog):
    raw = _config(
        tmp_path, **{"embedding.models.AntiBERTy.enabled": False, "embedding.models.NEAR.layer_index": [0]}
    )
    raw["embedding"]["models"]["ESM-2"] = {"enabled": True, "layer_index": [0]}
    result = run_lookup(parse_config(raw), sample_loaded)
    assert [p.partition.key for p in result.partitions] == ["NEAR|layer_0"]
    assert "'ESM-2' is enabled but not in the reference database" in caplog.text


def test_sample_shards_keep_sequences_when_asked(sample_loaded, tmp_path):
    config = parse_config(
        _config(
            tmp_path,
            **{
                "embedding.models.AntiBERTy.enabled": False,
                "embedding.models.NEAR.layer_index": [0],
                "postprocess.keep_sequences": True,
                "postprocess.alignment": False,
            },
        )
    )
    run_lookup(config, sample_loaded)
    shard = next((config.experiment_path / "raw_results" / "NEAR" / "layer_0").glob("*.csv"))
    frame = pl.read_csv(shard)
    assert frame.columns == exports.raw_columns(keep_sequences=True, alignment=False)
    assert (frame["sequence_query"].str.len_chars() == frame["query_len"]).all()
    assert (frame["sequence_reference"].str.len_chars() == frame["ref_len"]).all()
    shutil.rmtree(config.experiment_path)


def test_reference_scope_filters_in_sql(sample_loaded):
    from fantasia_assets.core.references import ReferenceScope
    from fantasia_assets.db.reads import fetch_reference_matrix

    def rows(**scope):
        return fetch_reference_matrix(sample_loaded, ReferenceScope(1, 0, **scope), "test").sequence_ids

    everything = rows()
    assert len(everything) == 300 and list(everything) == sorted(everything)
    assert len(rows(include_taxa=frozenset({"9606"}))) == 300
    assert len(rows(exclude_taxa=frozenset({"9606"}))) == 0
    assert len(rows(include_taxa=frozenset({"10090"}))) == 0
    # hostile text is a bound value that matches no taxon, never SQL
    assert len(rows(include_taxa=frozenset({"1) OR 1=1 --"}))) == 0
    assert list(rows(limit=10)) == list(everything[:10])


def test_legacy_layout_without_layers(engine, tmp_path):
    """`type_<id>/embedding` without layer groups: loaded and searched as the legacy layer."""
    from fantasia_assets.core.queries import scan
    from fantasia_assets.db.loader import load_references

    def legacy(source: Path, target: Path, count: int) -> Path:
        with h5py.File(source) as src, h5py.File(target, "w") as out:
            for name in sorted(src)[:count]:
                group = out.create_group(name)
                group.create_dataset(
                    "sequence", data=src[name]["sequence"][()].decode(), dtype=h5py.string_dtype()
                )
                group.create_dataset("type_1/embedding", data=src[name]["type_1/layer_0/embedding"][()])
        return target

    references = legacy(SAMPLE / "references_near.h5", tmp_path / "refs.h5", 300)
    queries = legacy(SAMPLE / "queries.h5", tmp_path / "queries.h5", 10)
    assert list(scan(queries).layers) == [(1, None)]
    report = load_references(
        engine, fasta=SAMPLE / "references.fasta.gz", gaf=[SAMPLE / "references.gaf.gz"],
        obo=SAMPLE / "go-basic.obo.gz", embeddings=references, model="NEAR",
    )  # fmt: skip
    assert report.embeddings_by_layer[None].inserted == 300
    raw = _config(
        tmp_path,
        queries,
        **{"embedding.models.AntiBERTy.enabled": False, "embedding.models.NEAR.layer_index": None},
    )
    result = run_lookup(parse_config(raw), engine)
    assert [p.partition.key for p in result.partitions] == ["NEAR|layer_legacy"]
    shards = list((tmp_path / "experiment" / "raw_results" / "NEAR" / "layer_legacy").glob("*.csv"))
    assert len(shards) == 10
    summary = pl.read_csv(tmp_path / "experiment" / "summary.csv")
    assert "final_score_NEAR_Llegacy" in summary.columns


def _vector_files(folder):
    return sorted(p for p in folder.glob("matrix-*.npy") if not p.name.endswith((".ids.npy", ".digests.npy")))


def test_reference_cache_survives_damage_and_stays_bounded(sample_loaded, tmp_path):
    from fantasia_assets.core.references import ReferenceScope
    from fantasia_assets.db.reads import fetch_reference_matrix
    from fantasia_assets.db.stores import ReferenceStore

    store = ReferenceStore(sample_loaded, tmp_path, max_in_memory=0, max_on_disk=2)
    first = store.get(ReferenceScope(1, 0))
    assert store.last_source == "database"
    # streamed into the cache file and mapped read-only: equal to the rows fetched in memory,
    # and to the database's rows read one by one through pgvector-python's own decoder
    plain = fetch_reference_matrix(sample_loaded, ReferenceScope(1, 0), first.fingerprint)
    with sample_loaded.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT se.sequence_id, halfvec_send(se.embedding) FROM sequence_embeddings se "
            "WHERE se.embedding_type_id = 1 AND se.layer_index = 0 ORDER BY se.sequence_id"
        ).all()
    one_by_one = np.array([HalfVector.from_binary(bytes(value)).to_numpy() for _, value in rows])
    np.testing.assert_array_equal(plain.sequence_ids, [sequence_id for sequence_id, _ in rows])
    np.testing.assert_array_equal(
        plain.vectors.view(np.uint16), one_by_one.astype(np.float16).view(np.uint16)
    )
    assert isinstance(first.vectors, np.memmap) and not first.vectors.flags.writeable
    assert first.vectors.dtype == np.float16 and first.vectors.flags.c_contiguous
    np.testing.assert_array_equal(first.vectors.view(np.uint16), plain.vectors.view(np.uint16))
    np.testing.assert_array_equal(first.sequence_ids, plain.sequence_ids)
    # the damage below rewrites the files in place: a map of them must not be read afterwards
    expected_vectors, expected_ids = np.array(first.vectors), first.sequence_ids
    del first
    (cached,) = _vector_files(tmp_path)
    ids_file = store.ids_file(cached)
    intact_vectors, intact_ids = cached.read_bytes(), ids_file.read_bytes()
    damages = [
        (cached, intact_vectors[:100]),  # header cut
        (cached, intact_vectors[:-2]),  # last value cut
        (ids_file, intact_ids[:-8]),  # one id fewer than vectors
        (ids_file, intact_ids[:50]),  # header cut
    ]
    for damaged, content in damages:  # a damaged cache file is refetched, not trusted
        damaged.write_bytes(content)
        again = store.get(ReferenceScope(1, 0))
        assert store.last_source == "database", damaged
        np.testing.assert_array_equal(expected_vectors, again.vectors)
        np.testing.assert_array_equal(expected_ids, again.sequence_ids)
        del again
    ids_file.unlink()  # vectors without their ids: incomplete, fetched again
    store.get(ReferenceScope(1, 0))
    assert store.last_source == "database"
    store.get(ReferenceScope(1, 0))
    assert store.last_source == "disk"
    for layer in (1, 4):
        store.get(ReferenceScope(1, layer))
    assert len(_vector_files(tmp_path)) == 2
    assert len(list(tmp_path.glob("matrix-*.ids.npy"))) == 2


def test_reference_prefetch_gives_what_get_gives(sample_loaded, tmp_path):
    """`ReferenceStore.prefetch` (the matrix read while the query file is scanned): the next `get`
    of the guessed scope returns the matrix and source a plain `get` gives; a wrong guess, a
    failed choice and a guess of nothing leave `get` to fetch its own; a fetch's error is raised
    by the `get` of its scope."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fantasia_assets.core.references import ReferenceScope, ReferenceSetError
    from fantasia_assets.db.stores import ReferenceStore

    plain_store = ReferenceStore(sample_loaded, tmp_path / "plain", max_in_memory=0)
    plain = {layer: plain_store.get(ReferenceScope(1, layer)) for layer in (0, 1)}

    def same(matrix, layer):
        np.testing.assert_array_equal(matrix.vectors.view(np.uint16), plain[layer].vectors.view(np.uint16))
        np.testing.assert_array_equal(matrix.sequence_ids, plain[layer].sequence_ids)
        assert matrix.fingerprint == plain[layer].fingerprint

    def failing_choice():
        raise RuntimeError("the choice's read failed")

    with ThreadPoolExecutor(2) as background:
        # (guessed layer, asked layer, in the main thread? for each COPY of rows)
        cases = [(0, 0, [False]), (1, 0, [False, True]), (None, 1, [True]), ("fails", 1, [True])]
        for n, (guess, asked, in_main) in enumerate(cases):
            store = ReferenceStore(sample_loaded, tmp_path / str(n), max_in_memory=0)
            copies = []  # the thread of every COPY of reference rows
            copy_rows = store.source.copy_reference_rows
            store.source.copy_reference_rows = lambda *a, c=copy_rows, seen=copies: (
                seen.append(threading.current_thread()),
                c(*a),
            )[1]
            if guess == "fails":
                store.prefetch(background, failing_choice)
            else:
                store.prefetch(background, lambda g=guess: None if g is None else ReferenceScope(1, g))
            same(store.get(ReferenceScope(1, asked)), asked)
            assert store.last_source == "database"
            # the right guess is fetched in the background only; any other scope, here
            assert [t is threading.main_thread() for t in copies] == in_main
            same(store.get(ReferenceScope(1, asked)), asked)  # the guess is taken once
            assert store.last_source == "disk"
        store = ReferenceStore(sample_loaded, tmp_path / "empty", max_in_memory=0)
        empty = ReferenceScope(1, 0, include_taxa=frozenset({"no such taxon"}))
        store.prefetch(background, lambda: empty)
        with pytest.raises(ReferenceSetError, match="after the taxonomy filter"):
            store.get(empty)


def test_groups_without_sequence_are_skipped_with_a_warning(tmp_path, caplog):
    from fantasia_assets.core.queries import scan

    path = tmp_path / "queries.h5"
    with h5py.File(SAMPLE / "queries.h5") as source, h5py.File(path, "w") as out:
        for index, name in enumerate(sorted(source)[:4]):
            group = out.create_group(name)
            if index != 2:
                sequence = source[name]["sequence"][()].decode()
                group.create_dataset("sequence", data=sequence, dtype=h5py.string_dtype())
            group.create_dataset(
                "type_1/layer_0/embedding", data=source[name]["type_1/layer_0/embedding"][()]
            )
        missing = sorted(source)[2]
    catalogue = scan(path)
    assert len(catalogue.accessions) == 3 and missing[len("accession_") :] not in catalogue.accessions
    assert catalogue.skipped == [(missing, "no 'sequence' dataset")]
    assert f"skipped {missing}: no 'sequence' dataset" in caplog.text
    vectors, _rows = catalogue.read((1, 0))
    assert vectors.shape == (3, 256)


def test_search_progress_says_where_the_search_runs(sample_loaded, tmp_path):
    """The search's progress lines (terminal and Dagster log alike) name where it runs, so a user
    sees whether the card is used, and the arithmetic it screens in."""
    from fantasia_assets.core.stages import SearchSettings, _where

    stages = []
    config = parse_config(_config(tmp_path, **{"lookup.use_gpu": False}))
    run_lookup(config, sample_loaded, progress=lambda stage, done, total: stages.append(stage))
    keys = ("NEAR|layer_0", "NEAR|layer_1", "AntiBERTy|layer_0", "AntiBERTy|layer_3")
    searches = {s for s in stages if s.startswith("search ")}
    screens = ("fp32", "bf16", "int8")  # this machine's (`core.screen`)
    assert {s.rsplit(", ", 1)[0] for s in searches} == {f"search {key} on the cpu" for key in keys}
    assert all(s.rsplit(", ", 1)[1] in {f"{name} screen" for name in screens} for s in searches)
    assert _where(SearchSettings(device="cpu"), lambda *_: iter(())) == "on the Dask cluster"
