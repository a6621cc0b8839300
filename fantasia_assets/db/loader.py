"""Loading a reference set (sequences, proteins, GO annotations, embeddings) into the database.

All input files are parsed and checked before the first write; everything is then written in
ONE transaction, so a failure at any point leaves the database as it was. Loads into the same
database are serialised by a transaction-scoped advisory lock: a load that finds another one
writing logs a warning naming it, then waits its turn (never interleaving with it). Rows
travel by COPY into temporary tables and are merged with
`INSERT … ON CONFLICT … DO UPDATE … WHERE … IS DISTINCT FROM`, which makes a re-load of
the same files a no-op (no row rewritten, so the reference fingerprint does not move) and a
newer GAF an update: for every protein a GAF names, its annotation set becomes the file's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sqlalchemy.engine import Engine

from fantasia_assets.errors import FantasiaError

from ..core.queries import EmbeddingCatalogue, EmbeddingFileError, scan
from ..progress import Progress, no_progress
from .migrate import schema_ready
from .models import LEGACY_LAYER_INDEX, UNDEFINED_CATEGORY
from .sources import (
    DEFAULT_EVIDENCE,
    ORGANISMS,
    InputFileError,
    read_fasta,
    read_gaf,
    read_obo,
)

_log = logging.getLogger(__name__)

LOAD_LOCK = "fantasia_assets.load_references"
# Rows per COPY chunk of embeddings: bounds memory at ~2 KiB × dim per chunk.
_EMBEDDING_CHUNK = 20000
_FP16_MAX = 65504.0


class LoadError(FantasiaError, ValueError):
    """The inputs cannot be loaded as asked; nothing was written."""


@dataclass
class Change:
    """Rows inserted and updated by one merge, and rows that were already identical."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def __str__(self) -> str:
        text = f"{self.inserted:,} new, {self.updated:,} updated, {self.unchanged:,} unchanged"
        return text + (f", {self.deleted:,} removed" if self.deleted else "")


@dataclass
class LoadReport:
    """What a load did: changes per table, totals, skips with reasons, and stage timings."""

    go_terms: Change = field(default_factory=Change)
    sequences: Change = field(default_factory=Change)
    proteins: Change = field(default_factory=Change)
    annotations: Change = field(default_factory=Change)
    annotations_by_aspect: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    embedding_type_id: int | None = None
    embeddings_by_layer: dict[int | None, Change] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def embedding_rows(self) -> int:
        return sum(c.inserted + c.updated + c.unchanged for c in self.embeddings_by_layer.values())

    def lines(self) -> list[str]:
        """A human-readable account, one line per fact."""
        out = []
        if self.go_terms.inserted + self.go_terms.updated + self.go_terms.unchanged:
            out.append(f"GO terms:     {self.go_terms}")
        if self.proteins.inserted + self.proteins.updated + self.proteins.unchanged:
            out.append(f"sequences:    {self.sequences}")
            out.append(f"proteins:     {self.proteins}")
            out.append(f"annotations:  {self.annotations}")
            aspects = ", ".join(f"{k} {v:,}" for k, v in sorted(self.annotations_by_aspect.items()))
            out.append(f"  kept by aspect: {aspects}")
        for layer, change in self.embeddings_by_layer.items():
            name = f"layer_{layer}" if layer is not None else "legacy (no layer)"
            out.append(f"embeddings:   {self.model} (type_{self.embedding_type_id}) {name}: {change}")
        for reason, count in sorted(self.skipped.items()):
            if count:
                out.append(f"skipped:      {count:,} {reason}")
        if self.timings:
            out.append("timings (s):  " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _copy_csv(cursor, table: str, frame: pl.DataFrame) -> None:
    """COPY a frame into a temporary table (CSV: polars writes NULL as empty, '' as "")."""
    columns = ", ".join(frame.columns)
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
        copy.write(frame.write_csv(include_header=False).encode("utf-8"))


def _merge_counts(rows) -> Change:
    flags = [bool(r[0]) for r in rows]
    inserted = sum(flags)
    return Change(inserted=inserted, updated=len(flags) - inserted)


def _halfvec_copy_payload(sequence_ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """PostgreSQL binary COPY of (int4 sequence_id, halfvec embedding) rows, built in numpy.

    Every row has the same size, so the whole stream is one structured array: field count,
    then each field's length and big-endian payload (halfvec: int16 dim, int16 unused,
    dim × float16).
    """
    n, dim = vectors.shape
    record = np.dtype(
        [
            ("nfields", ">i2"),
            ("id_len", ">i4"),
            ("id", ">i4"),
            ("vec_len", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("values", ">f2", (dim,)),
        ]
    )
    rows = np.empty(n, dtype=record)
    rows["nfields"] = 2
    rows["id_len"] = 4
    rows["id"] = sequence_ids
    rows["vec_len"] = 4 + 2 * dim
    rows["dim"] = dim
    rows["unused"] = 0
    rows["values"] = vectors
    header = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    return header + rows.tobytes() + (-1).to_bytes(2, "big", signed=True)


@dataclass
class _Annotations:
    proteins: pl.DataFrame
    annotations: pl.DataFrame
    covered: list[str]


def _prepare_annotations(
    fasta: Path, gaf: list[Path], obo: Path, evidence: tuple[str, ...], report: LoadReport
):
    started = time.perf_counter()
    ontology = read_obo(obo)
    report.timings["parse OBO"] = time.perf_counter() - started
    started = time.perf_counter()
    sequences = read_fasta(fasta)
    report.timings["parse FASTA"] = time.perf_counter() - started
    started = time.perf_counter()
    gaf_data = read_gaf(gaf, ontology, evidence)
    report.timings["parse GAF"] = time.perf_counter() - started
    for reason, count in gaf_data.skipped.items():
        report.skipped[f"GAF lines: {reason}"] += count

    kept = gaf_data.kept.join(sequences.rename({"accession": "protein_id"}), on="protein_id", how="left")
    without_sequence = kept.filter(pl.col("sequence").is_null())
    report.skipped["GAF annotations of proteins without a FASTA sequence"] += without_sequence.height
    report.skipped["proteins without a FASTA sequence"] += without_sequence["protein_id"].n_unique()
    kept = kept.filter(pl.col("sequence").is_not_null())
    proteins = (
        kept.group_by("protein_id", maintain_order=True)
        .agg(pl.col("sequence", "gene_name", "taxonomy_id", "description").first())
        .with_columns(
            pl.col("taxonomy_id")
            .replace_strict(ORGANISMS, default=None, return_dtype=pl.String)
            .fill_null(pl.lit("NCBITaxon:") + pl.col("taxonomy_id"))
            .alias("organism"),
            pl.col("sequence").map_elements(_md5, return_dtype=pl.String).alias("sequence_hash"),
        )
        .rename({"protein_id": "id"})
        .sort("id")
    )
    annotations = kept.select("protein_id", "go_id", "evidence_code", "aspect").sort("protein_id", "go_id")
    report.annotations_by_aspect = dict(annotations.group_by("aspect").len().sort("aspect").iter_rows())
    return ontology, _Annotations(
        proteins=proteins,
        annotations=annotations.drop("aspect"),
        covered=sorted(gaf_data.covered_proteins),
    )


def _write_ontology(cursor, ontology, report: LoadReport) -> None:
    cursor.execute("CREATE TEMP TABLE _go (go_id text, category text, description text) ON COMMIT DROP")
    _copy_csv(cursor, "_go", ontology.terms)
    cursor.execute(
        """
        INSERT INTO go_terms (go_id, category, description)
        SELECT go_id, coalesce(category, %s), description FROM _go
        ON CONFLICT (go_id) DO UPDATE
            SET category = EXCLUDED.category, description = EXCLUDED.description
            WHERE (go_terms.category, go_terms.description)
                  IS DISTINCT FROM (EXCLUDED.category, EXCLUDED.description)
        RETURNING (xmax = 0)
        """,
        (UNDEFINED_CATEGORY,),  # PIS: NOT NULL, 'undefined' when the term has no aspect
    )
    report.go_terms = _merge_counts(cursor.fetchall())
    report.go_terms.unchanged = ontology.terms.height - report.go_terms.inserted - report.go_terms.updated


def _write_annotations(cursor, data: _Annotations, report: LoadReport) -> None:
    proteins = data.proteins
    cursor.execute("CREATE TEMP TABLE _seq (sequence text, sequence_hash text) ON COMMIT DROP")
    unique_sequences = (
        proteins.select("sequence", "sequence_hash").unique("sequence_hash").sort("sequence_hash")
    )
    _copy_csv(cursor, "_seq", unique_sequences)
    cursor.execute(
        """
        INSERT INTO sequence (sequence, sequence_hash)
        SELECT sequence, sequence_hash FROM _seq ORDER BY sequence_hash
        ON CONFLICT (sequence_hash) DO NOTHING
        RETURNING id
        """
    )
    inserted = len(cursor.fetchall())
    report.sequences = Change(inserted=inserted, unchanged=unique_sequences.height - inserted)

    cursor.execute(
        """
        CREATE TEMP TABLE _protein (id text, sequence_hash text, gene_name text, organism text,
                                    taxonomy_id text, description text) ON COMMIT DROP
        """
    )
    _copy_csv(
        cursor,
        "_protein",
        proteins.select("id", "sequence_hash", "gene_name", "organism", "taxonomy_id", "description"),
    )
    cursor.execute(
        """
        INSERT INTO protein (id, sequence_id, gene_name, organism, taxonomy_id, description, created_at)
        SELECT p.id, s.id, p.gene_name, p.organism, p.taxonomy_id, p.description, now()
        FROM _protein p JOIN sequence s ON s.sequence_hash = p.sequence_hash
        ORDER BY p.id
        ON CONFLICT (id) DO UPDATE
            SET sequence_id = EXCLUDED.sequence_id, gene_name = EXCLUDED.gene_name,
                organism = EXCLUDED.organism, taxonomy_id = EXCLUDED.taxonomy_id,
                description = EXCLUDED.description, updated_at = now()
            WHERE (protein.sequence_id, protein.gene_name, protein.organism,
                   protein.taxonomy_id, protein.description)
                  IS DISTINCT FROM (EXCLUDED.sequence_id, EXCLUDED.gene_name, EXCLUDED.organism,
                                    EXCLUDED.taxonomy_id, EXCLUDED.description)
        RETURNING (xmax = 0)
        """
    )
    report.proteins = _merge_counts(cursor.fetchall())
    report.proteins.unchanged = proteins.height - report.proteins.inserted - report.proteins.updated
    cursor.execute(
        """
        INSERT INTO accession (code, "primary", protein_id, created_at)
        SELECT id, true, id, now() FROM _protein ORDER BY id
        ON CONFLICT (code) DO NOTHING
        """
    )

    cursor.execute(
        "CREATE TEMP TABLE _annotation (protein_id text, go_id text, evidence_code text) ON COMMIT DROP"
    )
    _copy_csv(cursor, "_annotation", data.annotations)
    # Proteins the GAF names take exactly the GAF's annotation set, so a newer release removes
    # what it no longer states (an annotation turned NOT, an evidence downgraded).
    cursor.execute("CREATE TEMP TABLE _covered (protein_id text PRIMARY KEY) ON COMMIT DROP")
    _copy_csv(cursor, "_covered", pl.DataFrame({"protein_id": data.covered}))
    cursor.execute("CREATE INDEX ON _annotation (protein_id, go_id)")
    cursor.execute("ANALYZE _annotation")
    cursor.execute("ANALYZE _covered")
    cursor.execute(
        """
        DELETE FROM protein_go_term_annotation a
        USING _covered c
        WHERE a.protein_id = c.protein_id
          AND NOT EXISTS (SELECT 1 FROM _annotation n
                          WHERE n.protein_id = a.protein_id AND n.go_id = a.go_id)
        """
    )
    deleted = cursor.rowcount
    cursor.execute(
        """
        INSERT INTO protein_go_term_annotation (protein_id, go_id, evidence_code)
        SELECT protein_id, go_id, evidence_code FROM _annotation ORDER BY protein_id, go_id
        ON CONFLICT (protein_id, go_id) DO UPDATE
            SET evidence_code = EXCLUDED.evidence_code
            WHERE protein_go_term_annotation.evidence_code IS DISTINCT FROM EXCLUDED.evidence_code
        RETURNING (xmax = 0)
        """
    )
    report.annotations = _merge_counts(cursor.fetchall())
    report.annotations.deleted = deleted
    report.annotations.unchanged = (
        data.annotations.height - report.annotations.inserted - report.annotations.updated
    )


def _resolve_embedding_type(cursor, catalogue: EmbeddingCatalogue, model: str, type_id: int | None) -> int:
    cursor.execute("SELECT id FROM sequence_embedding_type WHERE name = %s", (model,))
    row = cursor.fetchone()
    in_file = catalogue.type_ids()
    if row is not None:
        existing = int(row[0])
        if type_id is not None and type_id != existing:
            raise LoadError(f"model {model!r} has id {existing} in the database, not {type_id}")
        if existing not in in_file:
            raise LoadError(
                f"{catalogue.path}: model {model!r} is type_{existing} in the database, but the "
                f"file has only {', '.join(f'type_{t}' for t in in_file) or 'no type_<id> groups'}"
            )
        return existing
    if type_id is None:
        if len(in_file) != 1:
            raise LoadError(
                f"{catalogue.path}: holds {', '.join(f'type_{t}' for t in in_file) or 'no type_<id> groups'}; "
                f"say which one is {model!r} with --type-id"
            )
        type_id = in_file[0]
    elif type_id not in in_file:
        raise LoadError(f"{catalogue.path}: no type_{type_id} groups for model {model!r}")
    cursor.execute("SELECT name FROM sequence_embedding_type WHERE id = %s", (type_id,))
    clash = cursor.fetchone()
    if clash is not None:
        raise LoadError(
            f"{catalogue.path}: type_{type_id} is already the id of model {clash[0]!r} in the "
            f"database; load {model!r} with another id (--type-id) or under the name {clash[0]!r}"
        )
    cursor.execute(
        """
        INSERT INTO sequence_embedding_type (id, name, description, task_name, model_name)
        VALUES (%s, %s, %s, %s, %s)
        """,
        (
            type_id,
            model,
            f"loaded from {catalogue.path.name}",
            "embedding",
            str(catalogue.attrs.get("model_name") or model),
        ),
    )
    _advance_type_sequence(cursor, type_id)
    return type_id


def _advance_type_sequence(cursor, type_id: int) -> None:
    """Move the id serial past an explicit id, so PIS's own inserts (no id) never collide."""
    cursor.execute(
        """
        SELECT setval(seq, GREATEST(%s, coalesce(pg_sequence_last_value(seq), 0)))
        FROM (SELECT pg_get_serial_sequence('sequence_embedding_type', 'id')::regclass AS seq) s
        """,
        (type_id,),
    )


def _check_dimensions(cursor, catalogue: EmbeddingCatalogue, type_id: int, model: str) -> int:
    """The model's single vector length, checked across the file and the database."""
    cursor.execute(
        "SELECT vector_dims(embedding) FROM sequence_embeddings WHERE embedding_type_id = %s LIMIT 1",
        (type_id,),
    )
    row = cursor.fetchone()
    expected = int(row[0]) if row else None
    source = f"model {model!r} in the database"
    for layer in catalogue.layer_indices(type_id):
        entries = catalogue.layers[(type_id, layer)]
        if expected is None:
            expected = int(entries.dims[0])
            source = f"{catalogue.accessions[int(entries.rows[0])]} in {catalogue.path.name}"
        bad = np.flatnonzero(entries.dims != expected)
        if len(bad):
            accession = catalogue.accessions[int(entries.rows[bad[0]])]
            layer_name = f"layer_{layer}" if layer is not None else "embedding"
            raise LoadError(
                f"{catalogue.path}: accession_{accession}/type_{type_id}/{layer_name} has "
                f"{int(entries.dims[bad[0]])} dimensions, but {model!r} has {expected} ({source})"
            )
    return int(expected or 0)


def _match_sequences(cursor, catalogue: EmbeddingCatalogue, report: LoadReport) -> np.ndarray:
    """sequence_id per catalogue row (-1 when the accession is not a loaded reference protein)."""
    cursor.execute(
        """
        SELECT q.code, p.sequence_id, s.sequence
        FROM unnest(%s::text[]) AS q(code)
        JOIN LATERAL (
            SELECT pr.sequence_id FROM protein pr WHERE pr.id = q.code
            UNION ALL
            SELECT pr.sequence_id FROM accession a JOIN protein pr ON pr.id = a.protein_id
            WHERE a.code = q.code
            LIMIT 1
        ) p ON true
        JOIN sequence s ON s.id = p.sequence_id
        """,
        (catalogue.accessions,),
    )
    found = {code: (int(sequence_id), sequence) for code, sequence_id, sequence in cursor.fetchall()}
    ids = np.full(len(catalogue.accessions), -1, dtype=np.int64)
    seen: set[int] = set()
    for row, accession in enumerate(catalogue.accessions):
        hit = found.get(accession)
        if hit is None:
            report.skipped["embedded proteins that are not reference proteins in the database"] += 1
            continue
        sequence_id, sequence = hit
        if catalogue.sequences[row] is not None and catalogue.sequences[row].upper() != sequence:
            report.skipped["embedded proteins whose HDF5 sequence differs from the database's"] += 1
            continue
        if sequence_id in seen:
            report.skipped["embedded proteins sharing a sequence with an earlier one"] += 1
            continue
        seen.add(sequence_id)
        ids[row] = sequence_id
    return ids


def _write_embeddings(
    cursor,
    catalogue: EmbeddingCatalogue,
    model: str,
    type_id: int | None,
    report: LoadReport,
    progress: Progress,
) -> None:
    type_id = _resolve_embedding_type(cursor, catalogue, model, type_id)
    report.model, report.embedding_type_id = model, type_id
    dim = _check_dimensions(cursor, catalogue, type_id, model)
    sequence_ids = _match_sequences(cursor, catalogue, report)
    cursor.execute("CREATE TEMP TABLE _embedding (sequence_id int4, embedding halfvec) ON COMMIT DROP")
    layers = catalogue.layer_indices(type_id)
    total = sum(int((sequence_ids[catalogue.layers[(type_id, k)].rows] >= 0).sum()) for k in layers)
    done = 0
    for layer in layers:
        entries = catalogue.layers[(type_id, layer)]
        rows = entries.rows[sequence_ids[entries.rows] >= 0]
        cursor.execute("TRUNCATE _embedding")
        for start in range(0, len(rows), _EMBEDDING_CHUNK):
            block = rows[start : start + _EMBEDDING_CHUNK]
            try:
                vectors, block = catalogue.read((type_id, layer), block)
            except EmbeddingFileError as exc:
                raise LoadError(str(exc)) from exc
            too_big = np.flatnonzero(np.abs(vectors).max(axis=1) > _FP16_MAX)
            if len(too_big):
                accession = catalogue.accessions[int(block[too_big[0]])]
                raise LoadError(
                    f"{catalogue.path}: accession_{accession} layer {layer} has values beyond "
                    f"the float16 range (±{_FP16_MAX:g}) of halfvec"
                )
            payload = _halfvec_copy_payload(sequence_ids[block], vectors.astype(np.float16))
            with cursor.copy("COPY _embedding (sequence_id, embedding) FROM STDIN (FORMAT binary)") as copy:
                copy.write(payload)
            done += len(block)
            progress(f"embeddings {model}", done, total)
        cursor.execute(
            """
            INSERT INTO sequence_embeddings (sequence_id, embedding_type_id, layer_index, embedding, shape)
            SELECT sequence_id, %(type)s, %(layer)s, embedding, ARRAY[%(dim)s]::int[]
            FROM _embedding ORDER BY sequence_id
            ON CONFLICT (sequence_id, embedding_type_id, layer_index) DO UPDATE
                SET embedding = EXCLUDED.embedding, shape = EXCLUDED.shape, updated_at = now()
                WHERE sequence_embeddings.embedding IS DISTINCT FROM EXCLUDED.embedding
                   OR sequence_embeddings.shape IS DISTINCT FROM EXCLUDED.shape
            RETURNING (xmax = 0)
            """,
            {"type": type_id, "layer": LEGACY_LAYER_INDEX if layer is None else layer, "dim": dim},
        )
        change = _merge_counts(cursor.fetchall())
        change.unchanged = len(rows) - change.inserted - change.updated
        report.embeddings_by_layer[layer] = change


def _lock_holder(cursor) -> str:
    """Who holds the load lock, as far as this role may see: server pid, client, since when."""
    cursor.execute(
        """
        SELECT l.pid, a.application_name, a.client_addr::text, a.usename,
               to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS TZ')
        FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(%s)::bigint
        LIMIT 1
        """,
        (LOAD_LOCK,),
    )
    row = cursor.fetchone()
    if row is None:  # released in the meantime
        return ""
    pid, application, client, user, since = row
    parts = [f"server process {pid}"]
    if application:
        parts.append(application)
    if user:
        parts.append(f"user {user}" + (f" from {client}" if client else ""))
    if since:
        parts.append(f"since {since}")
    return " (" + ", ".join(parts) + ")"


def _take_load_lock(cursor, report: LoadReport) -> None:
    """Serialise loads into one database; say so when another one is writing, then wait for it.

    The lock is transaction-scoped: it goes with the commit or rollback of this load, and with
    the connection if this process dies.
    """
    # names this load to whoever waits behind it (pg_stat_activity); reverts at the commit
    cursor.execute(
        "SELECT set_config('application_name', %s, true)",
        (f"fantasia-assets load-references, pid {os.getpid()} on {socket.gethostname()}"[:63],),
    )
    cursor.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (LOAD_LOCK,))
    if cursor.fetchone()[0]:
        return
    _log.warning(
        "another load-references is writing to this database%s; waiting for it to finish",
        _lock_holder(cursor),
    )
    started = time.perf_counter()
    cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOAD_LOCK,))
    report.timings["wait for other load"] = time.perf_counter() - started
    _log.info("the other load-references finished; loading now")


def load_references(
    engine: Engine,
    *,
    fasta: str | Path | None = None,
    gaf: list[str | Path] | None = None,
    obo: str | Path | None = None,
    embeddings: str | Path | None = None,
    model: str | None = None,
    type_id: int | None = None,
    evidence: tuple[str, ...] = DEFAULT_EVIDENCE,
    progress: Progress = no_progress,
) -> LoadReport:
    """Load a reference set; see the module docstring for the guarantees.

    `gaf` needs `fasta` (sequences) and `obo` (term ids, aspects, names); `embeddings` needs
    `model`, and attaches vectors to proteins already in the database or loaded in the same
    call. Raises `LoadError` or `InputFileError` with the file and reason; nothing is written
    then.
    """
    report = LoadReport()
    gaf = [Path(p) for p in (gaf or [])]
    if gaf and (fasta is None or obo is None):
        raise LoadError("loading GAF annotations needs --fasta (sequences) and --obo (GO terms)")
    if embeddings is not None and not model:
        raise LoadError("loading embeddings needs --model NAME")
    if not gaf and embeddings is None and obo is None:
        raise LoadError("nothing to load: give --gaf/--fasta/--obo and/or --embeddings")
    evidence = tuple(code.strip().upper() for code in evidence if code.strip())
    if not evidence:
        raise LoadError("--evidence lists no evidence code")

    ontology = annotations = catalogue = None
    if gaf:
        ontology, annotations = _prepare_annotations(Path(fasta), gaf, Path(obo), evidence, report)
    elif obo is not None:
        started = time.perf_counter()
        ontology = read_obo(obo)
        report.timings["parse OBO"] = time.perf_counter() - started
    if embeddings is not None:
        started = time.perf_counter()
        try:
            catalogue = scan(embeddings)
        except EmbeddingFileError as exc:
            raise InputFileError(str(exc)) from exc
        report.timings["scan HDF5"] = time.perf_counter() - started
        for _group, reason in catalogue.skipped:
            report.skipped[f"HDF5 groups: {reason}"] += 1

    schema_ready(engine)
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        _take_load_lock(cursor, report)
        if ontology is not None:
            started = time.perf_counter()
            _write_ontology(cursor, ontology, report)
            report.timings["write GO terms"] = time.perf_counter() - started
        if annotations is not None:
            started = time.perf_counter()
            _write_annotations(cursor, annotations, report)
            report.timings["write proteins+annotations"] = time.perf_counter() - started
        if catalogue is not None:
            started = time.perf_counter()
            _write_embeddings(cursor, catalogue, model, type_id, report, progress)
            report.timings["write embeddings"] = time.perf_counter() - started
    return report
