"""Reference loading on the real embedded server, checked against counts computed here."""

from __future__ import annotations

import gzip
import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import sqlalchemy as sa

from fantasia_assets.db.loader import LoadError, load_references
from fantasia_assets.db.sources import InputFileError
from fantasia_assets_tests.conftest import SAMPLE

EVIDENCE = {"EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "TAS", "IC"}
FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
NEAR = SAMPLE / "references_near.h5"


def _obo_ids(path: Path):
    """(alt id or id → primary id, obsolete ids), by a parse independent of goatools."""
    primary, obsolete = {}, set()
    for stanza in gzip.decompress(Path(path).read_bytes()).decode().split("\n[Term]")[1:]:
        term = re.search(r"^id: (GO:\d+)", stanza, re.M).group(1)
        stanza = stanza.split("\n[Typedef]")[0]
        if re.search(r"^is_obsolete: true", stanza, re.M):
            obsolete.add(term)
            continue
        primary[term] = term
        for alt in re.findall(r"^alt_id: (GO:\d+)", stanza, re.M):
            primary[alt] = term
    return primary, obsolete


def _fasta(path: Path) -> dict[str, str]:
    out, name = {}, None
    for line in gzip.decompress(Path(path).read_bytes()).decode().splitlines(keepends=True):
        line = line.strip()
        if line.startswith(">"):
            name = line[1:].split()[0]
            out[name] = ""
        elif line:
            out[name] += line
    return out


def expected_counts(gaf=GAF, fasta=FASTA, obo=OBO, h5=NEAR):
    primary, _ = _obo_ids(obo)
    sequences = _fasta(fasta)
    pairs = {}
    for line in gzip.decompress(Path(gaf).read_bytes()).decode().splitlines(keepends=True):
        if line.startswith("!"):
            continue
        f = line.rstrip("\n").split("\t")
        if f[6] not in EVIDENCE or "NOT" in f[3].split("|") or f[4] not in primary:
            continue
        if f[1] not in sequences:
            continue
        pairs.setdefault((f[1], primary[f[4]]), f[8])
    proteins = {p for p, _ in pairs}
    by_aspect = Counter(pairs.values())
    embeddings = Counter()
    with h5py.File(h5) as handle:
        seen = set()
        for group in sorted(handle):
            accession = group[len("accession_") :]
            sequence = handle[group]["sequence"][()].decode()
            if accession not in proteins or sequence != sequences[accession] or sequence in seen:
                continue
            seen.add(sequence)
            for layer in handle[group]["type_1"]:
                embeddings[int(layer[len("layer_") :])] += 1
    return {
        "proteins": len(proteins),
        "sequences": len({sequences[p] for p in proteins}),
        "annotations": len(pairs),
        "by_aspect": dict(by_aspect),
        "embeddings": dict(embeddings),
    }


def _db_counts(engine):
    with engine.connect() as conn:
        one = lambda q: conn.execute(sa.text(q)).scalar()  # noqa: E731
        return {
            "proteins": one("SELECT count(*) FROM protein"),
            "sequences": one("SELECT count(*) FROM sequence"),
            "annotations": one("SELECT count(*) FROM protein_go_term_annotation"),
            "by_aspect": dict(
                conn.execute(
                    sa.text(
                        "SELECT g.category, count(*) FROM protein_go_term_annotation a "
                        "JOIN go_terms g USING (go_id) GROUP BY 1"
                    )
                ).all()
            ),
            "embeddings": dict(
                conn.execute(
                    sa.text("SELECT layer_index, count(*) FROM sequence_embeddings GROUP BY 1")
                ).all()
            ),
        }


def _snapshot(engine):
    """Every row's content and version, so 'unchanged' means untouched, not just equal counts."""
    with engine.connect() as conn:
        return {
            table: conn.execute(
                sa.text(f"SELECT md5(string_agg(t::text || xmin::text, ',' ORDER BY t::text)) FROM {table} t")
            ).scalar()
            for table in (
                "sequence", "protein", "accession", "go_terms", "protein_go_term_annotation",
                "sequence_embedding_type", "sequence_embeddings",
            )
        }  # fmt: skip


def _load(engine, **overrides):
    arguments = dict(fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    arguments.update(overrides)
    return load_references(engine, **arguments)


def test_loader_counts_match_independent_counts(engine):
    report = _load(engine)
    expected = expected_counts()
    assert _db_counts(engine) == expected
    assert report.proteins.inserted == expected["proteins"]
    assert report.annotations.inserted == expected["annotations"]
    assert report.annotations_by_aspect == expected["by_aspect"]
    assert {k: v.inserted for k, v in report.embeddings_by_layer.items()} == expected["embeddings"]
    assert report.skipped["GAF lines: NOT qualifier"] > 0
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, name FROM sequence_embedding_type")).all() == [(1, "NEAR")]
        organisms = conn.execute(sa.text("SELECT DISTINCT organism, taxonomy_id FROM protein")).all()
        assert organisms == [("Homo sapiens", "9606")]
        # fp16 storage of the real vectors: equal to the file's values rounded to half precision
        sid, vector = conn.execute(
            sa.text(
                "SELECT p.id, e.embedding::text FROM sequence_embeddings e JOIN protein p USING (sequence_id) "
                "WHERE e.layer_index = 0 ORDER BY p.id LIMIT 1"
            )
        ).one()
    stored = np.array(vector.strip("[]").split(","), dtype=np.float32)
    with h5py.File(NEAR) as handle:
        original = handle[f"accession_{sid}/type_1/layer_0/embedding"][()]
    np.testing.assert_array_equal(stored, original.astype(np.float16).astype(np.float32))


def test_reload_is_a_no_op(engine):
    _load(engine)
    before = _snapshot(engine)
    report = _load(engine)
    assert _snapshot(engine) == before
    for change in (
        report.proteins,
        report.annotations,
        report.go_terms,
        *report.embeddings_by_layer.values(),
    ):
        assert (change.inserted, change.updated, change.deleted) == (0, 0, 0)


def test_newer_gaf_updates_annotations(engine, tmp_path):
    _load(engine)
    lines = gzip.decompress(Path(GAF).read_bytes()).decode().splitlines(keepends=True)
    body = [line for line in lines if not line.startswith("!")]
    kept = [line for line in body if line.split("\t")[6] in EVIDENCE and "NOT" not in line.split("\t")[3]]
    negated = kept[0].split("\t")
    negated[3] = "NOT|" + negated[3]
    target = (negated[1], negated[4])
    newer = [line for line in lines if line.split("\t")[1:5:3] != [target[0], target[1]]]
    newer.append("\t".join(negated))
    path = tmp_path / "newer.gaf.gz"
    with gzip.open(path, "wt") as handle:
        handle.writelines(newer)
    report = _load(engine, gaf=[path], embeddings=None, model=None)
    assert report.annotations.deleted == 1
    with engine.connect() as conn:
        gone = conn.execute(
            sa.text("SELECT count(*) FROM protein_go_term_annotation WHERE protein_id = :p AND go_id = :g"),
            {"p": target[0], "g": target[1]},
        ).scalar()
    assert gone == 0
    assert _db_counts(engine)["annotations"] == expected_counts(gaf=path)["annotations"]


def _truncated_gzip(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _wrong_columns(source: Path, target: Path) -> Path:
    lines = gzip.decompress(Path(source).read_bytes()).decode().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if not line.startswith("!")) + 3
    lines[index] = "\t".join(lines[index].split("\t")[:12]) + "\n"
    with gzip.open(target, "wt") as handle:
        handle.writelines(lines)
    return target


def _wrong_dimension(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as handle:
        group = sorted(handle)[7]
        del handle[f"{group}/type_1/layer_1/embedding"]
        handle[f"{group}/type_1/layer_1/embedding"] = np.ones(255, dtype=np.float32)
    return target


@pytest.mark.parametrize(
    "corrupt, argument, message",
    [
        (_truncated_gzip, "gaf", "corrupt or truncated gzip"),
        (_wrong_columns, "gaf", "tab-separated columns, expected 17"),
        (_wrong_dimension, "embeddings", "has 255 dimensions, but 'NEAR' has 256"),
    ],
)
def test_corrupt_input_is_rejected_and_database_unchanged(engine, tmp_path, corrupt, argument, message):
    _load(engine)
    before = _snapshot(engine)
    source = {"gaf": GAF, "embeddings": NEAR}[argument]
    bad = corrupt(source, tmp_path / source.name)
    value = [bad] if argument == "gaf" else bad
    with pytest.raises((InputFileError, LoadError)) as error:
        _load(engine, **{argument: value})
    assert message in str(error.value)
    assert str(bad) in str(error.value)
    assert _snapshot(engine) == before


def test_wrong_dimension_within_a_file_names_the_accession(engine, tmp_path):
    bad = _wrong_dimension(NEAR, tmp_path / "near.h5")
    with h5py.File(bad) as handle:
        accession = sorted(handle)[7]
    with pytest.raises(
        LoadError, match=rf"{accession}/type_1/layer_1 has 255 dimensions, but 'NEAR' has 256"
    ):
        _load(engine, embeddings=bad)
    assert _db_counts(engine)["proteins"] == 0


def test_model_id_clash_is_an_error(engine):
    _load(engine)
    with pytest.raises(LoadError, match="type_1 is already the id of model 'NEAR'"):
        _load(engine, model="OtherModel")


def test_second_model_uses_its_file_type_id(engine):
    _load(engine)
    report = _load(engine, embeddings=SAMPLE / "references_antiberty.h5", model="AntiBERTy")
    assert report.embedding_type_id == 2
    assert set(report.embeddings_by_layer) == {0, 3, 7}
    with engine.connect() as conn:
        dims = conn.execute(
            sa.text(
                "SELECT embedding_type_id, min(vector_dims(embedding)), max(vector_dims(embedding)) "
                "FROM sequence_embeddings GROUP BY 1 ORDER BY 1"
            )
        ).all()
    assert dims == [(1, 256, 256), (2, 512, 512)]
