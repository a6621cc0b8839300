"""Reference data for a lookup: the (model, layer) embedding matrix and the GO annotation table.

The matrix is streamed out of PostgreSQL with a binary COPY and parsed by numpy in one step
(every row of a model has the same size), straight into one contiguous float16 array ordered
by sequence id: no Python object per row, even at a million rows. Both the matrix and the
annotation table are cached under `$FANTASIA_HOME/cache`, keyed by a *fingerprint* of the rows
they come from, so an unchanged reference set is never fetched twice.

The fingerprint reads no vector: it aggregates row counts, ids and each row's `xmin` (the id of
the transaction that last wrote the row). Any insert, update or delete moves it; a re-load of
identical files writes nothing (see the loader) and leaves it unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Engine

from fantasia_assets.errors import FantasiaError

from ..db.sources import normalise_category
from ..progress import Progress, no_progress
from .queries import LEGACY_LAYER_INDEX

log = logging.getLogger(__name__)

_COPY_HEADER = 19  # "PGCOPY\n\377\r\n\0" + flags int32 + extension length int32


class ReferenceError(FantasiaError, LookupError):
    """The reference database lacks what the lookup needs (model, layer, rows)."""


@dataclass(frozen=True)
class ReferenceScope:
    """Which reference rows a lookup uses: one model and layer, filtered by taxonomy."""

    type_id: int
    layer: int | None
    include_taxa: frozenset[str] | None = None  # None: every taxon
    exclude_taxa: frozenset[str] = frozenset()
    limit: int | None = None  # SPEC `limit_execution`: first N rows by sequence id

    def key(self) -> dict:
        return {
            "type_id": self.type_id,
            "layer": self.layer,
            "include": sorted(self.include_taxa) if self.include_taxa is not None else None,
            "exclude": sorted(self.exclude_taxa),
            "limit": self.limit,
        }


@dataclass
class ReferenceMatrix:
    """Embeddings of one scope: row i is sequence `sequence_ids[i]`; ids ascend."""

    scope: ReferenceScope
    sequence_ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float16 (n, dim), C-contiguous
    fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.sequence_ids)


def _protein_filter(scope: ReferenceScope, alias: str) -> tuple[sql.Composable, dict]:
    """SQL condition on protein `alias` for the taxonomy filter; values are bound, never inlined."""
    parts: list[sql.Composable] = [sql.SQL("true")]
    params: dict = {}
    column = sql.SQL("{}.taxonomy_id").format(sql.Identifier(alias))
    if scope.include_taxa is not None:
        parts.append(sql.SQL("{} = ANY(%(include_taxa)s)").format(column))
        params["include_taxa"] = sorted(scope.include_taxa)
    if scope.exclude_taxa:
        parts.append(sql.SQL("NOT ({} = ANY(%(exclude_taxa)s))").format(column))
        params["exclude_taxa"] = sorted(scope.exclude_taxa)
    return sql.SQL(" AND ").join(parts), params


def _rows_query(scope: ReferenceScope, columns: sql.Composable) -> tuple[sql.Composable, dict]:
    condition, params = _protein_filter(scope, "p")
    # the database keeps a legacy entry (no layer) under LEGACY_LAYER_INDEX (PIS: NOT NULL)
    layer = LEGACY_LAYER_INDEX if scope.layer is None else scope.layer
    params.update(type_id=scope.type_id, layer=layer)
    query = sql.SQL(
        """
        SELECT {columns} FROM sequence_embeddings se
        WHERE se.embedding_type_id = %(type_id)s
          AND se.layer_index = %(layer)s
          AND EXISTS (SELECT 1 FROM protein p WHERE p.sequence_id = se.sequence_id AND {condition})
        ORDER BY se.sequence_id
        """
    ).format(columns=columns, condition=condition)
    if scope.limit is not None:
        query = sql.SQL("{} LIMIT %(limit)s").format(query)
        params["limit"] = scope.limit
    return query, params


def _raw_cursor(conn):
    return conn.connection.driver_connection.cursor()


def database_identity(engine: Engine) -> str:
    """Which database this is: the cluster's system identifier (unique per initdb) and the
    database's oid and name, so caches of two databases with equal row ids never mix."""
    with engine.connect() as conn:
        name, oid = conn.execute(
            sa.text("SELECT current_database(), oid FROM pg_database WHERE datname = current_database()")
        ).one()
        try:
            with conn.begin_nested():
                system = conn.execute(sa.text("SELECT system_identifier FROM pg_control_system()")).scalar()
        except sa.exc.DBAPIError:  # not readable by every role; the oid and name still separate databases
            system = None
    return f"{system}:{oid}:{name}"


def annotation_version(engine: Engine) -> str:
    """Fingerprint of the tables the GO transfer reads (proteins, annotations, GO terms)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                """
                SELECT (SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) FROM protein),
                       (SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0)
                          FROM protein_go_term_annotation),
                       (SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) FROM go_terms)
                """
            )
        ).one()
    return hashlib.sha256(json.dumps([database_identity(engine), *row]).encode()).hexdigest()[:16]


def reference_fingerprint(engine: Engine, scope: ReferenceScope) -> str:
    """Fingerprint of the embedding rows in `scope` (plus the proteins' taxa that filter them)."""
    inner, params = _rows_query(scope, sql.SQL("se.id, se.sequence_id, se.xmin::text::bigint AS version"))
    query = sql.SQL(
        "SELECT count(*), coalesce(sum(id), 0), coalesce(sum(sequence_id), 0), "
        "coalesce(sum(version), 0) FROM ({}) rows"
    ).format(inner)
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        cursor.execute(query, params)
        counts = cursor.fetchone()
        cursor.execute("SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) FROM protein")
        proteins = cursor.fetchone()[0]
    payload = json.dumps(
        {
            "database": database_identity(engine),
            "scope": scope.key(),
            "rows": [str(v) for v in counts],
            "proteins": proteins,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parse_halfvec_copy(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(sequence ids, float16 matrix) from a binary COPY of (int4, halfvec) rows."""
    body = memoryview(payload)[_COPY_HEADER:]
    if len(body) <= 2:
        return np.empty(0, np.int64), np.empty((0, 0), np.float16)
    dim = int.from_bytes(body[14:16], "big", signed=True)
    record = np.dtype(
        [("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("vec_len", ">i4"),
         ("dim", ">i2"), ("unused", ">i2"), ("values", ">f2", (dim,))]
    )  # fmt: skip
    usable = len(body) - 2  # trailer int16 -1
    if usable % record.itemsize:
        raise ReferenceError("reference embeddings of one model and layer have different dimensions")
    rows = np.frombuffer(body[:usable], dtype=record)
    odd = np.flatnonzero((rows["nfields"] != 2) | (rows["dim"] != dim))
    if len(odd):
        raise ReferenceError(
            f"sequence {int(rows['id'][odd[0]])} has a {int(rows['dim'][odd[0]])}-dim embedding, "
            f"others have {dim}"
        )
    return rows["id"].astype(np.int64), np.ascontiguousarray(rows["values"], dtype=np.float16)


def _copy_out(engine: Engine, query: sql.Composable, params: dict, options: str) -> bytes:
    """The rows of `query` as one COPY … TO STDOUT payload (`options`: "FORMAT binary", …)."""
    buffer = io.BytesIO()
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        statement = sql.SQL("COPY ({}) TO STDOUT ({})").format(query, sql.SQL(options))
        with cursor.copy(statement, params) as copy:
            for block in copy:
                buffer.write(block)
    return buffer.getvalue()


def fetch_reference_matrix(engine: Engine, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix:
    """Stream the scope's embeddings from the database (binary COPY) into one array."""
    query, params = _rows_query(scope, sql.SQL("se.sequence_id, se.embedding"))
    ids, vectors = _parse_halfvec_copy(_copy_out(engine, query, params, "FORMAT binary"))
    return ReferenceMatrix(scope, ids, vectors, fingerprint)


def _atomic_save(path: Path, writer) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_matrix(tmp: Path, matrix: ReferenceMatrix) -> None:
    with open(tmp, "wb") as handle:
        np.savez(handle, sequence_ids=matrix.sequence_ids, vectors=matrix.vectors)


class ReferenceStore:
    """Reference matrices by scope: memory (at most `max_in_memory`), then disk cache, then DB.

    The disk cache keeps the `max_on_disk` most recently used matrices; a damaged cache file
    is fetched again rather than trusted.
    """

    def __init__(self, engine: Engine, cache_dir: Path, max_in_memory: int = 4, max_on_disk: int = 8) -> None:
        self.engine = engine
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_in_memory = max_in_memory
        self.max_on_disk = max_on_disk
        self._memory: OrderedDict[str, ReferenceMatrix] = OrderedDict()
        self._lock = threading.Lock()
        self.last_source: str | None = None  # "memory", "disk" or "database", for reports

    def _file(self, fingerprint: str) -> Path:
        return self.cache_dir / f"matrix-{fingerprint}.npz"

    def _from_disk(self, path: Path, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix | None:
        try:
            with np.load(path) as stored:
                matrix = ReferenceMatrix(scope, stored["sequence_ids"], stored["vectors"], fingerprint)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("damaged reference cache %s (%s); fetching from the database", path, exc)
            return None
        os.utime(path)  # recently used: kept by the pruning below
        return matrix

    def _prune(self) -> None:
        files = sorted(self.cache_dir.glob("matrix-*.npz"), key=lambda f: f.stat().st_mtime, reverse=True)
        for stale in files[self.max_on_disk :]:
            stale.unlink(missing_ok=True)

    def get(self, scope: ReferenceScope, progress: Progress = no_progress) -> ReferenceMatrix:
        """The scope's matrix, fetched from the database only when its rows changed."""
        fingerprint = reference_fingerprint(self.engine, scope)
        with self._lock:
            if fingerprint in self._memory:
                self._memory.move_to_end(fingerprint)
                self.last_source = "memory"
                return self._memory[fingerprint]
        path = self._file(fingerprint)
        matrix = self._from_disk(path, scope, fingerprint)
        if matrix is not None:
            self.last_source = "disk"
        else:
            progress("fetch references", 0, 1)
            matrix = fetch_reference_matrix(self.engine, scope, fingerprint)
            _atomic_save(path, lambda tmp: _save_matrix(tmp, matrix))
            self._prune()
            progress("fetch references", 1, 1)
            self.last_source = "database"
        if not len(matrix):
            raise ReferenceError(
                f"no reference embeddings for type_{scope.type_id} layer {scope.layer} "
                "after the taxonomy filter"
            )
        with self._lock:
            if self.max_in_memory > 0:
                self._memory[fingerprint] = matrix
                while len(self._memory) > self.max_in_memory:
                    self._memory.popitem(last=False)
        return matrix


ANNOTATION_COLUMNS = [
    "sequence_id", "protein_id", "organism", "gene_name", "go_id", "category", "go_description",
    "evidence_code",
]  # fmt: skip


def fetch_annotations(engine: Engine, scope: ReferenceScope | None = None) -> pl.DataFrame:
    """Every GO annotation of every protein with a sequence, as a columnar table.

    One row per (protein, GO term), ordered by sequence id, protein, GO id; categories
    normalised to P/F/C. With a scope, only proteins passing its taxonomy filter.
    """
    condition, params = _protein_filter(scope or ReferenceScope(0, None), "p")
    query = sql.SQL(
        """
        SELECT p.sequence_id, p.id AS protein_id, p.organism, p.gene_name, a.go_id, g.category,
               g.description AS go_description, a.evidence_code
        FROM protein p
        JOIN protein_go_term_annotation a ON a.protein_id = p.id
        LEFT JOIN go_terms g ON g.go_id = a.go_id
        WHERE p.sequence_id IS NOT NULL AND {condition}
        ORDER BY p.sequence_id, p.id, a.go_id
        """
    ).format(condition=condition)
    payload = _copy_out(engine, query, params, "FORMAT csv, HEADER")
    schema = {name: pl.String for name in ANNOTATION_COLUMNS} | {"sequence_id": pl.Int64}
    frame = pl.read_csv(io.BytesIO(payload), schema=schema, quote_char='"')
    spellings = {value: normalise_category(value) for value in frame["category"].unique().drop_nulls()}
    return frame.with_columns(pl.col("category").replace(spellings))


class AnnotationStore:
    """The annotation table, cached as Parquet per annotation version and taxonomy filter."""

    def __init__(self, engine: Engine, cache_dir: Path) -> None:
        self.engine = engine
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def get(self, scope: ReferenceScope | None = None) -> tuple[pl.DataFrame, str]:
        """(annotations, version) for the scope's taxonomy filter."""
        filter_key = {k: v for k, v in (scope.key() if scope else {}).items() if k in ("include", "exclude")}
        version = annotation_version(self.engine)
        key = hashlib.sha256(json.dumps([version, filter_key]).encode()).hexdigest()[:16]
        path = self.cache_dir / f"annotations-{key}.parquet"
        if path.exists():
            return pl.read_parquet(path), version
        frame = fetch_annotations(self.engine, scope)
        _atomic_save(path, lambda tmp: frame.write_parquet(tmp))
        return frame, version


def fetch_sequences(engine: Engine, sequence_ids: np.ndarray) -> pl.DataFrame:
    """(sequence_id, sequence) for the given ids (bound as one array parameter)."""
    ids = np.unique(np.asarray(sequence_ids, dtype=np.int64).ravel()).tolist()
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        cursor.execute("SELECT id, sequence FROM sequence WHERE id = ANY(%s) ORDER BY id", (ids,))
        rows = cursor.fetchall()
    return pl.DataFrame(rows, schema={"sequence_id": pl.Int64, "sequence": pl.String}, orient="row")


class SequenceCache:
    """Reference sequences by id, fetched once per run however many stages ask for them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._known: dict[int, str] = {}

    def get(self, sequence_ids: np.ndarray) -> dict[int, str]:
        wanted = np.unique(np.asarray(sequence_ids, dtype=np.int64))
        missing = [i for i in wanted.tolist() if i not in self._known]
        if missing:
            self._known.update(fetch_sequences(self.engine, np.asarray(missing)).iter_rows())
        return {i: self._known[i] for i in wanted.tolist() if i in self._known}


def fetch_reference_sequences(
    engine: Engine,
    type_ids: list[int],
    include_taxa: frozenset[str] | None = None,
    exclude_taxa: frozenset[str] = frozenset(),
) -> pl.DataFrame:
    """(sequence_id, sequence) of every sequence embedded by one of `type_ids`, taxonomy-filtered."""
    condition, params = _protein_filter(ReferenceScope(0, None, include_taxa, exclude_taxa), "p")
    params["type_ids"] = list(type_ids)
    query = sql.SQL(
        """
        SELECT s.id, s.sequence FROM sequence s
        WHERE EXISTS (SELECT 1 FROM sequence_embeddings se
                      WHERE se.sequence_id = s.id AND se.embedding_type_id = ANY(%(type_ids)s))
          AND EXISTS (SELECT 1 FROM protein p WHERE p.sequence_id = s.id AND {condition})
        ORDER BY s.id
        """
    ).format(condition=condition)
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        cursor.execute(query, params)
        rows = cursor.fetchall()
    return pl.DataFrame(rows, schema={"sequence_id": pl.Int64, "sequence": pl.String}, orient="row")
