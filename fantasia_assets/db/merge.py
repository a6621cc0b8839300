"""The SQL of a reference load: each input merged into its table inside the load's transaction.

Rows travel by COPY into temporary tables and are merged with
`INSERT … ON CONFLICT … DO UPDATE … WHERE … IS DISTINCT FROM`, which makes a re-load of the
same files a no-op (no row rewritten, so the reference fingerprint does not move) and a newer
GAF an update: for every protein a GAF names and the FASTA holds, its annotation set becomes the
file's (`loader`: one the FASTA lacks is left as it is).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..core.progress import Progress
from ..core.queries import EmbeddingCatalogue, EmbeddingFileError
from ..core.sequences import clean
from . import halfvec
from .load_report import Annotations, Change, LoadError, LoadReport
from .models import LEGACY_LAYER_INDEX, UNDEFINED_CATEGORY
from .reload import note_changed_sequences, remove_stale_embeddings

# Rows per COPY chunk of embeddings: bounds memory at ~2 KiB × dim per chunk.
_EMBEDDING_CHUNK = 20000
_FP16_MAX = 65504.0


def _copy_csv(cursor, table: str, frame: pl.DataFrame) -> None:
    """COPY a frame into a temporary table (CSV: polars writes NULL as empty, '' as "")."""
    columns = ", ".join(frame.columns)
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT csv)") as copy:
        copy.write(frame.write_csv(include_header=False).encode("utf-8"))


def _merge_counts(rows) -> Change:
    flags = [bool(r[0]) for r in rows]
    inserted = sum(flags)
    return Change(inserted=inserted, updated=len(flags) - inserted)


def write_ontology(cursor, ontology, report: LoadReport) -> None:
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


def write_annotations(cursor, data: Annotations, report: LoadReport) -> None:
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
    note_changed_sequences(cursor)
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
    remove_stale_embeddings(cursor, report)
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
    # Proteins the GAF names (and the FASTA holds) take exactly the GAF's annotation set, so a
    # newer release removes what it no longer states (an annotation turned NOT, an evidence
    # downgraded).
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
        raise LoadError(
            f"{catalogue.path}: no type_{type_id} groups for model {model!r} (the file has "
            f"{', '.join(f'type_{t}' for t in in_file) or 'no type_<id> groups'})"
        )
    cursor.execute("SELECT name FROM sequence_embedding_type WHERE id = %s", (type_id,))
    clash = cursor.fetchone()
    if clash is not None:
        # --type-id only says which groups of the file to read: a model's id in the database is
        # the one its query files carry, so a second model cannot share type_<id> with the first
        raise LoadError(
            f"{catalogue.path}: type_{type_id} is already the id of model {clash[0]!r} in the "
            f"database, and query files find a model by that id; to add these vectors to "
            f"{clash[0]!r}, load them with --model {clash[0]!r}; to load them as a separate model "
            f"{model!r}, store them under a type_<id> no model uses yet, in this file and in its query files"
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
    left_out: dict[str, list[str]] = {}  # reason → accessions, in file order, counted and named
    for row, accession in enumerate(catalogue.accessions):
        hit = found.get(accession)
        reason = None
        if hit is None:
            reason = "embedded proteins that are not reference proteins in the database"
        # both sides under the sequence rule: references loaded before it may hold gaps
        elif catalogue.sequences[row] is not None and catalogue.sequences[row] != clean(hit[1]):
            reason = "embedded proteins whose HDF5 sequence differs from the database's"
        elif hit[0] in seen:
            reason = "embedded proteins sharing a sequence with an earlier one"
        if reason is not None:
            left_out.setdefault(reason, []).append(accession)
            continue
        seen.add(hit[0])
        ids[row] = hit[0]
    for reason, accessions in left_out.items():
        report.skipped[reason] += len(accessions)
        report.name_skipped(reason, accessions)
    return ids


def write_embeddings(
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
            payload = halfvec.encode(sequence_ids[block], vectors.astype(np.float16))
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
