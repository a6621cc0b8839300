"""Incremental reruns on real data (the bundled sample: human references, mouse queries): each
kind of change, and each hostile case, gives outputs byte for byte equal to a full run in a fresh
experiment_path; a state that cannot be trusted falls back to a full run and says why."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from fantasia_assets.cli import report_lines
from fantasia_assets.config import parse_config
from fantasia_assets.core import writers
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets.db.loader import load_references
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, tree

REFS = SAMPLE / "references_near.h5"
FASTA, GAF, OBO = SAMPLE / "references.fasta.gz", SAMPLE / "references.gaf.gz", SAMPLE / "go-basic.obo.gz"
HITS = Path("parquet/NEAR/layer_0/neighbour_hits.parquet")


def _config(tmp_path: Path, queries: Path = SAMPLE / "queries.h5", **overrides) -> dict:
    """The sample's NEAR layer 0 without alignment (the shared hardening config), overridden."""
    defaults = {
        "embedding.models.AntiBERTy.enabled": False,
        "embedding.models.NEAR.layer_index": [0],
        "postprocess.alignment": False,
    }
    return config_dict(tmp_path / "experiment", queries, **{**defaults, **overrides})


# every output and the incremental state; not the lineage log, which every run appends to, nor
# the state's records of other files' (size, mtime, inode), which differ between any two runs
_digests = tree


def _run(raw: dict, engine, **kwargs):
    result = run_lookup(parse_config(raw), engine, **kwargs)
    return result, result.updates["NEAR|layer_0"]


def _fresh_full_run(raw: dict, engine, tmp_path: Path) -> dict[str, str]:
    """The output digests of a full run of `raw` in a fresh experiment_path."""
    fresh = copy.deepcopy(raw)
    fresh["experiment_path"] = str(tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}")
    _, update = _run(fresh, engine)
    assert update.kind == "full" and "no stored state" in update.reason
    return _digests(Path(fresh["experiment_path"]))


def _assert_equals_fresh_full_run(raw: dict, engine, tmp_path: Path) -> None:
    assert _digests(Path(raw["experiment_path"])) == _fresh_full_run(raw, engine, tmp_path)


def _subset_h5(source: Path, target: Path, names: list[str], vectors: dict | None = None) -> Path:
    """`names` groups of `source` (sequence and every embedding), some vectors replaced."""
    with h5py.File(source) as src, h5py.File(target, "w") as out:
        for key, value in src.attrs.items():
            out.attrs[key] = value
        for name in names:
            src.copy(src[name], out, name=name)
            for path, vector in (vectors or {}).get(name, {}).items():
                del out[name][path]
                out[name].create_dataset(path, data=vector)
    return target


def _load(engine, embeddings: Path | None = None, fasta: Path = FASTA, gaf: list[Path] | None = None):
    gaf = gaf if gaf is not None else [GAF]
    return load_references(
        engine,
        fasta=fasta if gaf else None,  # gaf=[]: vectors of proteins already loaded
        gaf=gaf,
        obo=OBO,
        embeddings=embeddings,
        model="NEAR",
    )


def _gaf_for(tmp_path: Path, accession: str, template: str | None = None) -> Path:
    """A one-line GAF naming `accession` (the loader creates proteins from GAF and FASTA), with
    the first annotation of `template` (default: of the first protein)."""
    lines = [
        line for line in gzip.decompress(GAF.read_bytes()).decode().splitlines() if not line.startswith("!")
    ]
    line = next(line for line in lines if template in (None, line.split("\t")[1])).split("\t")
    line[1] = accession
    path = tmp_path / f"{accession}.gaf"
    path.write_text("!gaf-version: 2.1\n" + "\t".join(line) + "\n")
    return path


def _hits(raw: dict) -> pl.DataFrame:
    return pl.read_parquet(Path(raw["experiment_path"]) / HITS)


def _sequence_id(engine, accession: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT p.sequence_id FROM accession a JOIN protein p ON p.id = a.protein_id WHERE a.code = :c"
            ),
            {"c": accession},
        ).scalar_one()


def _names(path: Path) -> list[str]:
    with h5py.File(path) as handle:
        return sorted(handle)


def test_references_added_then_removed(engine, tmp_path):
    names = _names(REFS)
    _load(engine, _subset_h5(REFS, tmp_path / "first.h5", names[:200]))
    raw = _config(tmp_path)
    assert _run(raw, engine)[1].kind == "full"
    _load(engine, _subset_h5(REFS, tmp_path / "later.h5", names[200:]), gaf=[])
    result, update = _run(raw, engine)
    assert update.kind == "references added" and update.searched == 0 and update.merged == 50
    assert update.details["references_added"] == 100
    # only the queries whose neighbours changed have their outputs rebuilt; the others are kept
    moved = update.details["outputs_rebuilt"]
    assert 0 < moved < 50
    assert (
        "  update: incremental (references added): 0 queries searched, 50 merged with a search of "
        f"the new references only; outputs of {moved} queries rebuilt, the others kept"
    ) in report_lines(result)
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    # remove the first query's nearest neighbour and a few references no query has
    hits = _hits(raw)
    nearest = int(hits.filter(pl.col("rank") == 0)["ref_idx"][0])
    unused = sorted(set(range(1, 400)) - set(hits["ref_idx"].to_list()))[:5]
    with engine.begin() as conn:
        conn.execute(
            sa.text("DELETE FROM sequence_embeddings WHERE sequence_id = ANY(:ids)"),
            {"ids": [nearest, *unused]},
        )
    _, update = _run(raw, engine)
    touched = hits.filter(pl.col("ref_idx") == nearest)["accession"].n_unique()
    assert update.kind == "references removed" and update.searched == touched and 0 < touched < 50
    assert nearest not in _hits(raw)["ref_idx"].to_list()
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_annotations_only_needs_no_search(engine, tmp_path):
    _load(engine, REFS)
    raw = _config(tmp_path, **{"postprocess.alignment": True})
    _run(raw, engine)
    # a newer GAF: every tenth protein keeps only its first annotation
    lines = gzip.decompress(GAF.read_bytes()).decode().splitlines()
    body = [line for line in lines if not line.startswith("!")]
    proteins = sorted({line.split("\t")[1] for line in body})[::10]
    seen, kept = set(), []
    for line in body:
        protein = line.split("\t")[1]
        if protein in proteins and protein in seen:
            continue
        seen.add(protein)
        kept.append(line)
    trimmed = tmp_path / "trimmed.gaf"
    trimmed.write_text("\n".join([lines[0], *kept]) + "\n")
    report = load_references(engine, fasta=FASTA, gaf=[trimmed], obo=OBO)
    assert report.annotations.deleted > 0
    _, update = _run(raw, engine)
    assert update.kind == "annotations" and update.searched == 0 and update.merged == 0
    # no neighbour changed: every query rebuilt is one whose neighbours' annotations changed
    assert 0 < update.details["outputs_rebuilt"] < _hits(raw)["accession"].n_unique()
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_queries_added_removed_changed_and_settings(engine, tmp_path):
    _load(engine, REFS)
    queries = _names(SAMPLE / "queries.h5")
    first = _subset_h5(SAMPLE / "queries.h5", tmp_path / "q1.h5", queries[:40])
    raw = _config(tmp_path, first)
    _run(raw, engine)
    with h5py.File(SAMPLE / "queries.h5") as handle:
        moved = {
            name: {"type_1/layer_0/embedding": handle[name]["type_1/layer_0/embedding"][()][::-1].copy()}
            for name in queries[5:7]
        }
    second = _subset_h5(SAMPLE / "queries.h5", tmp_path / "q2.h5", queries[3:], moved)
    raw = _config(tmp_path, second)
    _, update = _run(raw, engine)
    assert update.kind == "queries added + queries removed + queries changed + output settings"
    assert update.searched == 10 + 2 and update.merged == 0
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    raw["precision"] = 6  # an output-only setting
    _, update = _run(raw, engine)
    assert update.kind == "output settings" and update.searched == 0
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    raw["postprocess"]["alignment"] = True  # output-only too: the previous rows have no alignments
    _, update = _run(raw, engine)
    assert update.kind == "output settings" and update.searched == 0
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    raw["lookup"].update(backend="numpy", screening="fp32", batch_size=7, lookup_cache_max=0)
    _, update = _run(raw, engine)  # settings of speed alone: nothing searched or rebuilt
    assert update.kind == "unchanged" and update.searched == 0, update
    assert update.details.get("outputs_rebuilt", 0) == 0, update.details
    raw["postprocess"].setdefault("summary", {})["weighted_prefix"] = "wt_"  # run-wide outputs alone
    _, update = _run(raw, engine)  # the partitions' outputs stand; summary.csv is rebuilt
    assert update.kind == "unchanged" and update.details.get("outputs_rebuilt", 0) == 0, update
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    raw["lookup"]["limit_per_entry"] = 3  # changes the search
    _, update = _run(raw, engine)
    assert update.kind == "full" and update.reason == "search settings changed: k"


def test_query_sequence_changed_with_its_vector_unchanged(engine, tmp_path):
    """A model may give a changed sequence the same vector (past its length cut, or residues it
    maps to one token): the neighbours stay, but the query's length and alignments change."""
    _load(engine, REFS)
    queries = _names(SAMPLE / "queries.h5")[:12]
    first = _subset_h5(SAMPLE / "queries.h5", tmp_path / "q1.h5", queries)
    raw = _config(tmp_path, first, **{"postprocess.alignment": True})
    _run(raw, engine)
    with h5py.File(first, "r+") as handle:  # the same file, edited: no output setting changes
        sequence = handle[queries[4]]["sequence"][()]
        del handle[queries[4]]["sequence"]
        handle[queries[4]].create_dataset("sequence", data=sequence + b"ACDEFGHIKLMNPQRSTVWY")
    _, update = _run(raw, engine)
    assert update.kind == "queries changed" and update.searched == 1
    assert update.details["outputs_rebuilt"] == 1
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


@pytest.mark.parametrize("ties", [False, True])
def test_new_reference_tying_the_kth_neighbour(engine, tmp_path, ties):
    _load(engine, REFS)
    raw = _config(tmp_path, **{"lookup.tie_expansion": ties})
    _run(raw, engine)
    kth = _hits(raw).filter(pl.col("rank") == 4).row(0, named=True)
    with engine.connect() as conn:
        accession, sequence = conn.execute(
            sa.text("SELECT a.code, s.sequence FROM accession a JOIN protein p ON p.id = a.protein_id "
                    "JOIN sequence s ON s.id = p.sequence_id WHERE p.sequence_id = :i LIMIT 1"),
            {"i": kth["ref_idx"]},
        ).one()  # fmt: skip
    fasta = tmp_path / "tie.fasta"
    fasta.write_text(f">TIE001\nW{sequence[1:]}\n")  # another sequence, the same vector
    twin = tmp_path / "tie.h5"
    with h5py.File(REFS) as src, h5py.File(twin, "w") as out:
        for key, value in src.attrs.items():
            out.attrs[key] = value
        src.copy(src[f"accession_{accession}"], out, name="accession_TIE001")
        del out["accession_TIE001/sequence"]
        out["accession_TIE001"].create_dataset("sequence", data=f"W{sequence[1:]}", dtype=h5py.string_dtype())
    _load(engine, twin, fasta=fasta, gaf=[_gaf_for(tmp_path, "TIE001", accession)])
    _, update = _run(raw, engine)
    assert update.kind == "references added + annotations" and update.searched == 0
    new_id = _sequence_id(engine, "TIE001")
    assert new_id > kth["ref_idx"]  # ties go to the smaller id: the newcomer ranks after
    mine = _hits(raw).filter(pl.col("accession") == kth["accession"])
    assert (new_id in mine["ref_idx"].to_list()) == ties
    if ties:
        assert mine.filter(pl.col("ref_idx") == new_id)["distance"][0] == kth["distance"]
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_distance_exactly_at_the_threshold(engine, tmp_path):
    names = _names(REFS)
    _load(engine, _subset_h5(REFS, tmp_path / "first.h5", names[:250]))
    with h5py.File(REFS) as refs, h5py.File(SAMPLE / "queries.h5") as queries:
        later = np.stack([refs[n]["type_1/layer_0/embedding"][()] for n in names[250:]]).astype(np.float16)
        query = queries[_names(SAMPLE / "queries.h5")[0]]["type_1/layer_0/embedding"][()][None, :]
    distances, _ = SearchEngine("cosine", "torch", "cpu").build(later).search(query.astype(np.float32), 1)
    threshold = float(distances[0, 0])  # the float32 distance, exactly: a later reference sits on it
    raw = _config(tmp_path, **{"embedding.models.NEAR.distance_threshold": threshold})
    _run(raw, engine)
    _load(engine, _subset_h5(REFS, tmp_path / "later.h5", names[250:]), gaf=[])
    _, update = _run(raw, engine)
    assert update.kind == "references added"
    assert (_hits(raw)["distance"] == threshold).any()
    assert (_hits(raw)["distance"] <= threshold).all()
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_new_reference_joining_a_query_cluster_runs_in_full(engine, tmp_path):
    """MMseqs2 masking: a reference with a query's own sequence changes the clusters, so the
    partition is searched in full (clusters are not merged), and masks the newcomer."""
    _load(engine, REFS)
    raw = _config(tmp_path, **{"lookup.redundancy.identity": 0.9})
    _run(raw, engine)
    query = _names(SAMPLE / "queries.h5")[0]
    twin = _subset_h5(SAMPLE / "queries.h5", tmp_path / "twin.h5", [query])
    with h5py.File(twin, "a") as handle:
        handle.move(query, "accession_TWIN01")
        for model in [k for k in handle["accession_TWIN01"] if k.startswith("type_") and k != "type_1"]:
            del handle["accession_TWIN01"][model]
        sequence = handle["accession_TWIN01/sequence"][()].decode()
    fasta = tmp_path / "twin.fasta"
    fasta.write_text(f">TWIN01\n{sequence}\n")
    _load(engine, twin, fasta=fasta, gaf=[_gaf_for(tmp_path, "TWIN01")])
    _, update = _run(raw, engine)
    assert update.kind == "full" and update.reason.startswith("MMseqs2 clusters changed")
    assert _sequence_id(engine, "TWIN01") not in _hits(raw)["ref_idx"].to_list()
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_untrusted_state_falls_back_to_a_full_run(engine, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fantasia_assets.incremental_run")
    _load(engine, REFS)
    raw = _config(tmp_path)
    _run(raw, engine)
    # a run that fails part-way publishes nothing: outputs and state stay the previous run's
    changed = copy.deepcopy(raw)
    changed["embeddings_path"] = str(
        _subset_h5(SAMPLE / "queries.h5", tmp_path / "q.h5", _names(SAMPLE / "queries.h5")[5:])
    )

    def fail(*args):
        raise RuntimeError("killed while writing the summary")

    with monkeypatch.context() as patch:
        patch.setattr(writers, "write_summary", fail)
        with pytest.raises(RuntimeError, match="killed"):
            _run(changed, engine)
    assert _run(raw, engine)[1].kind == "unchanged"
    state = Path(raw["experiment_path"]) / "state" / "NEAR" / "layer_0"

    def damage_neighbours():
        (state / "neighbours.parquet").write_bytes(b"PAR1 not a parquet file")

    def other_code():
        meta = json.loads((state / "state.json").read_text())
        meta["search_key"]["code"] = "an older version"
        (state / "state.json").write_text(json.dumps(meta))

    def outputs_rewritten():  # as a run that failed after writing some outputs leaves them
        raw_rows = Path(raw["experiment_path"]) / "parquet" / "NEAR" / "layer_0" / "raw_rows.parquet"
        pl.read_parquet(raw_rows).head(3).write_parquet(raw_rows)

    def missing():
        for path in state.iterdir():
            path.unlink()

    cases = [
        (damage_neighbours, "stored state damaged"),
        (other_code, "stored state from other code"),
        (outputs_rewritten, "the partition's outputs are not the ones"),
        (missing, "no stored state"),
    ]
    expected = _fresh_full_run(raw, engine, tmp_path)
    for harm, reason in cases:
        harm()
        caplog.clear()
        _, update = _run(raw, engine)
        assert update.kind == "full" and update.reason.startswith(reason), update.reason
        # an untrusted state is warned about; a missing one is a first run, logged as such
        level = "INFO" if harm is missing else "WARNING"
        assert [r.levelname for r in caplog.records if reason in r.getMessage()] == [level]
        assert _digests(Path(raw["experiment_path"])) == expected


def test_query_removed_and_added_rebuild_only_those(engine, tmp_path):
    """The last query removed and two added after it: nobody else's query index moves, so the
    other queries' shards, TopGO and summary lines are kept as they were (shards linked)."""
    _load(engine, REFS)
    queries = _names(SAMPLE / "queries.h5")
    raw = _config(tmp_path, _subset_h5(SAMPLE / "queries.h5", tmp_path / "q1.h5", queries[:40]))
    _run(raw, engine)
    shards = Path(raw["experiment_path"]) / "raw_results" / "NEAR" / "layer_0"
    before = {p.name: p.stat().st_ino for p in shards.iterdir()}
    second = _subset_h5(SAMPLE / "queries.h5", tmp_path / "q2.h5", [*queries[:39], *queries[40:42]])
    raw = _config(tmp_path, second)
    result, update = _run(raw, engine)
    assert update.kind == "queries added + queries removed + output settings"
    # the two added queries' outputs built, the removed one's removed: not counted as rebuilt
    assert (update.details["outputs_rebuilt"], update.details["outputs_removed"]) == (2, 1)
    assert "; outputs of 2 queries rebuilt, of 1 removed, the others kept" in "\n".join(report_lines(result))
    after = {p.name: p.stat().st_ino for p in shards.iterdir()}
    kept = [name for name in after if before.get(name) == after[name]]
    assert len(kept) >= len(after) - 2  # the added queries' shards are new files; the rest linked
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_outputs_edited_since_are_rebuilt(engine, tmp_path, caplog):
    """A shard or summary.csv that is not the file the state recorded is never spliced from."""
    caplog.set_level(logging.INFO, logger="fantasia_assets.incremental_write")
    _load(engine, REFS)
    raw = _config(tmp_path)
    _run(raw, engine)
    root = Path(raw["experiment_path"])
    shard = sorted((root / "raw_results" / "NEAR" / "layer_0").iterdir())[0]
    shard.write_bytes(shard.read_bytes() + b"edited by hand\n")
    _, update = _run(raw, engine)
    assert update.kind == "unchanged" and update.details["outputs_rebuilt"] == 1
    _assert_equals_fresh_full_run(raw, engine, tmp_path)
    summary = root / "summary.csv"
    summary.write_bytes(summary.read_bytes().replace(b"\n", b"\r\n", 1))
    caplog.clear()
    _run(raw, engine)
    assert any("summary.csv is not the file the state recorded" in r.getMessage() for r in caplog.records)
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_untrusted_line_indexes_rebuild_the_files_whole(engine, tmp_path, caplog):
    """summary.csv and the TopGO files are spliced at the byte ranges state/lines.parquet
    recorded only while that index, its digest in run.json and each file's digest hold; a file
    edited to the same size and mtime, or an index that is missing, damaged, from another code
    version or does not fit, makes the run write them whole, and say why."""
    caplog.set_level(logging.INFO, logger="fantasia_assets.incremental_write")
    _load(engine, REFS)
    raw = _config(tmp_path)
    _run(raw, engine)
    root = Path(raw["experiment_path"])
    state, lines = root / "state" / "run.json", root / "state" / "lines.parquet"
    ensemble = sorted((root / "topgo" / "ensemble").iterdir())[0]

    def same_size_same_mtime(path: Path) -> None:  # an edit the (size, mtime, inode) check misses
        before = path.stat()
        data = bytearray(path.read_bytes())
        data[-3] = ord("9") if data[-3] != ord("9") else ord("8")
        path.write_bytes(bytes(data))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    def recorded(edit) -> None:  # lines.parquet edited, and run.json made to vouch for it
        frame = edit(pl.read_parquet(lines))
        frame.write_parquet(lines)
        meta = json.loads(state.read_text())
        meta["lines"] = hashlib.sha256(lines.read_bytes()).hexdigest()
        state.write_text(json.dumps(meta))

    def shifted(frame: pl.DataFrame) -> pl.DataFrame:
        last = frame.filter(pl.col("file") == "summary.csv").height - 2
        return frame.with_columns(
            pl.when((pl.col("file") == "summary.csv") & (pl.int_range(pl.len()) == last))
            .then(pl.col("end") - 1)
            .otherwise(pl.col("end"))
            .alias("end")
        )

    def other_version() -> None:
        meta = json.loads(state.read_text())
        meta["format"] = meta["format"].replace("incremental-outputs-3", "incremental-outputs-2")
        state.write_text(json.dumps(meta))

    cases = [
        (lambda: same_size_same_mtime(root / "summary.csv"), "summary.csv is not the file the state recorded (its digest differs)"),
        (lambda: same_size_same_mtime(ensemble), f"{ensemble.name} is not the file the state recorded (its digest differs)"),
        (lambda: lines.unlink(), "state/lines.parquet is missing"),
        (lambda: lines.write_bytes(b"PAR1 damaged"), "state/lines.parquet is not the one run.json recorded"),
        (lambda: recorded(lambda f: f.rename({"lines": "count"})), "state/lines.parquet has other columns"),
        (lambda: recorded(shifted), "the line index of summary.csv does not fit it"),
        (other_version, "state/run.json is from another code version"),
    ]  # fmt: skip
    expected = _fresh_full_run(raw, engine, tmp_path)
    for harm, reason in cases:
        harm()
        caplog.clear()
        _, update = _run(raw, engine)
        assert update.kind == "unchanged"
        assert any(reason in r.getMessage() for r in caplog.records), (reason, caplog.messages)
        assert _digests(root) == expected
    # and with everything in place again, the next rerun splices: no file is written whole
    caplog.clear()
    _run(raw, engine)
    assert not [m for m in caplog.messages if "in full" in m], caplog.messages


def test_state_of_code_that_aligned_otherwise__its_alignments_are_not_reused(engine, tmp_path, monkeypatch):
    from fantasia_assets.core.stages import AlignmentCache

    _load(engine, REFS)
    raw = _config(tmp_path, **{"postprocess.alignment": True})
    _run(raw, engine)
    preloaded = []
    original = AlignmentCache.preload
    monkeypatch.setattr(
        AlignmentCache, "preload", lambda self, known: (preloaded.append(known.height), original(self, known))
    )
    _run(raw, engine)
    assert preloaded and preloaded[-1] > 0  # this code's state: the previous alignments reused
    # the state of code before ending stops were dropped records no raw-rows code version
    state = Path(raw["experiment_path"]) / "state" / "NEAR" / "layer_0" / "state.json"
    meta = json.loads(state.read_text())
    del meta["raw_rows_code"]
    meta["outputs_config"] = meta["outputs_config"].split("|")[0]  # nor the raw rows' code
    state.write_text(json.dumps(meta))
    preloaded.clear()
    _, update = _run(raw, engine)
    assert preloaded == [] and update.searched == 0, update
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def _one_vector_changed_in_layer_0(tmp_path: Path, name: str = "second.h5") -> Path:
    """The sample queries with one query's NEAR layer-0 vector reversed, its layer 1 as it was."""
    queries = _names(SAMPLE / "queries.h5")
    with h5py.File(SAMPLE / "queries.h5") as handle:
        moved = {
            queries[4]: {
                "type_1/layer_0/embedding": handle[queries[4]]["type_1/layer_0/embedding"][()][::-1].copy()
            }
        }
    return _subset_h5(SAMPLE / "queries.h5", tmp_path / name, queries, moved)


def test_query_rebuilt_in_one_layer_only__its_ensemble_and_summary_lines_hold_every_layer(engine, tmp_path):
    """The spliced ensemble and summary lines of an accession rebuilt in one partition were built
    from that partition's rows alone: its ensemble lines were layer 0's TopGO lines."""
    _load(engine, REFS)
    layers = {"embedding.models.NEAR.layer_index": [0, 1]}
    _run(_config(tmp_path, **layers), engine)
    raw = _config(tmp_path, _one_vector_changed_in_layer_0(tmp_path), **layers)
    result = run_lookup(parse_config(raw), engine)
    assert result.updates["NEAR|layer_0"].searched == 1 and result.updates["NEAR|layer_1"].searched == 0
    _assert_equals_fresh_full_run(raw, engine, tmp_path)


def test_partition_state_of_a_later_run_beside_earlier_run_wide_files__rebuilt_not_spliced(engine, tmp_path):
    """A publication stopped after one partition's state, Parquet and shards (a refused move)
    leaves a run.json that vouches for the other files it recorded; it must not vouch for them."""
    import shutil

    _load(engine, REFS)
    raw = _config(tmp_path, _one_vector_changed_in_layer_0(tmp_path))
    first = _config(tmp_path)
    _run(first, engine)
    root = Path(first["experiment_path"])
    earlier = tmp_path / "earlier"
    shutil.copytree(root, earlier, copy_function=os.link)  # the same inodes, as renames keep them
    _run(raw, engine, full=True)  # the later run, written whole: one query moved
    for folder in ("state/NEAR/layer_0", "parquet/NEAR/layer_0", "raw_results/NEAR/layer_0"):
        shutil.rmtree(earlier / folder)
        shutil.copytree(root / folder, earlier / folder, copy_function=os.link)
    mixed = {**raw, "experiment_path": str(earlier)}
    _run(mixed, engine)
    _assert_equals_fresh_full_run(mixed, engine, tmp_path)


@pytest.mark.parametrize("setting", ["lookup.per_aspect", "postprocess.fantasia_compat"])
def test_run_that_keeps_less_state_than_the_one_before__the_earlier_state_removed(engine, tmp_path, setting):
    """A per-aspect search keeps no partition state and FANTASIA-compatible outputs no line
    index: the earlier run's were left in place, then read and named as a failed run's."""
    _load(engine, REFS)
    _run(_config(tmp_path), engine)
    keyed = _config(tmp_path)
    section, key = setting.split(".")
    keyed[section][key] = True
    _run(keyed, engine)
    fresh = {**keyed, "experiment_path": str(tmp_path / "fresh")}
    _run(fresh, engine)
    assert _digests(Path(keyed["experiment_path"])) == _digests(tmp_path / "fresh")  # state/ included
    _, update = _run(_config(tmp_path), engine)  # off again
    assert "failed part-way" not in (update.reason or ""), update
    _assert_equals_fresh_full_run(_config(tmp_path), engine, tmp_path)
