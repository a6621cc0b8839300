"""Every read of the lookup from the reference database: model ids, fingerprints, the reference
matrix (binary COPY), the annotation table, sequences.

Fingerprints read no vector: they aggregate row counts, ids and each row's `xmin` (the id of
the transaction that last wrote the row). Any insert, update or delete moves them; a re-load of
identical files writes nothing (see the loader) and leaves them unchanged. Values are always
bound parameters; identifiers never come from data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import polars as pl
import sqlalchemy as sa
from psycopg import sql
from psycopg.errors import UndefinedTable
from sqlalchemy.engine import Engine

from ..core.queries import LEGACY_LAYER_INDEX
from ..core.references import ANNOTATION_COLUMNS, ReferenceMatrix, ReferenceScope, ReferenceSetError
from . import halfvec
from .copy_file import copied
from .engine import translate_errors
from .sources import normalise_category

# The version of a whole table: its row count and the sum of its rows' xmin (see the docstring).
_TABLE_VERSION = "SELECT count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) FROM {}"
# the tables whose versions may be asked for (identifiers cannot be bound; these are ours)
_VERSIONED_TABLES = frozenset({"protein", "protein_go_term_annotation", "go_terms", "sequence"})


def _raw_cursor(conn):
    return conn.connection.driver_connection.cursor()


def _table_versions(conn, tables: list[str]) -> list[str]:
    """`count:sum(xmin)` of each table, in one statement."""
    if not set(tables) <= _VERSIONED_TABLES:
        raise ValueError(f"no version for tables {sorted(set(tables) - _VERSIONED_TABLES)}")
    columns = ", ".join(f"({_TABLE_VERSION.format(table)})" for table in tables)
    return list(conn.execute(sa.text(f"SELECT {columns}")).one())


@translate_errors
def table_version(engine: Engine, table: str) -> str:
    """`count:sum(xmin)` of one table (`go_terms`, …): moves with any write to it."""
    with engine.connect() as conn:
        return _table_versions(conn, [table])[0]


NEVER_LOADED = (
    "the reference database has no reference set yet: load one first (fantasia-assets load-references --help)"
)


@translate_errors
def model_types(engine: Engine) -> dict[str, int]:
    """Model name → embedding type id, from the reference database."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, id FROM sequence_embedding_type ORDER BY id")).all()
    except sa.exc.ProgrammingError as error:
        if isinstance(error.orig, UndefinedTable):
            raise ReferenceSetError(NEVER_LOADED) from error
        raise
    return {name: int(type_id) for name, type_id in rows}


@translate_errors
def layers_with_rows(engine: Engine, wanted: list[tuple[int, int | None]]) -> set[tuple[int, int | None]]:
    """Which of the (type id, layer) pairs have at least one reference embedding loaded."""
    found = set()
    with engine.connect() as conn:
        for type_id, layer in wanted:
            stored = LEGACY_LAYER_INDEX if layer is None else layer
            row = conn.execute(
                sa.text(
                    "SELECT 1 FROM sequence_embeddings "
                    "WHERE embedding_type_id = :type_id AND layer_index = :layer LIMIT 1"
                ),
                {"type_id": type_id, "layer": stored},
            ).first()
            if row is not None:
                found.add((type_id, layer))
    return found


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


@translate_errors
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


@translate_errors
def quiescent_state(engine: Engine) -> dict | None:
    """The next transaction id X0 while no transaction is in progress (`db.snapshot`: a stamp is
    written only then), with the data directory and database name; None when transactions are in
    progress or the settings are not readable by this role."""
    with engine.connect() as conn:
        try:
            with conn.begin_nested():
                xmin, xmax, folder, database = conn.execute(
                    sa.text(
                        "SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, "
                        "current_setting('data_directory'), current_database() FROM pg_current_snapshot() s"
                    )
                ).one()
        except sa.exc.DBAPIError:
            return None
    if xmin != xmax:
        return None
    return {"next_xid": int(xmax), "data_directory": folder, "database": database}


@translate_errors
def annotation_version(engine: Engine) -> str:
    """Fingerprint of the tables the GO transfer reads (proteins, annotations, GO terms)."""
    with engine.connect() as conn:
        row = _table_versions(conn, ["protein", "protein_go_term_annotation", "go_terms"])
    return hashlib.sha256(json.dumps([database_identity(engine), *row]).encode()).hexdigest()[:16]


@translate_errors
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
        proteins = _table_versions(conn, ["protein"])[0]
    payload = json.dumps(
        {
            "database": database_identity(engine),
            "scope": scope.key(),
            "rows": [str(v) for v in counts],
            "proteins": proteins,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@translate_errors
def copy_reference_rows(
    engine: Engine, scope: ReferenceScope, sink: Callable[[np.ndarray, np.ndarray], None]
) -> int:
    """Stream the scope's embeddings into `sink` in ascending sequence id, group by group as
    (int64 ids, float16 rows), packed by the server (`halfvec.grouped_select`, binary COPY):
    the matrix is never held whole. Returns the dimension (0 when the scope has no rows).

    The database stores halfvec (float16), so the float16 rows are its values exactly.
    """
    query, params = _rows_query(scope, sql.SQL("se.sequence_id, se.embedding"))
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        native = halfvec.native_reads(cursor)
        decoder = halfvec.GroupDecoder(native is not None)
        statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(
            halfvec.grouped_select(query, native)
        )
        with cursor.copy(statement, params) as copy:
            for block in copy:
                for ids, vectors in decoder.feed(block):
                    sink(ids, vectors)
    decoder.finish()
    return decoder.dim or 0


def fetch_reference_matrix(engine: Engine, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix:
    """The scope's embeddings in memory (float16), for callers that want no cache file."""
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    dim = copy_reference_rows(engine, scope, lambda i, v: (ids.append(i), vectors.append(v)))
    if not ids:
        return ReferenceMatrix(scope, np.empty(0, np.int64), np.empty((0, dim), np.float16), fingerprint)
    return ReferenceMatrix(scope, np.concatenate(ids), np.concatenate(vectors), fingerprint)


@translate_errors
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
    schema = {name: pl.String for name in ANNOTATION_COLUMNS} | {"sequence_id": pl.Int64}
    with copied(engine, query, params, "FORMAT csv, HEADER", "-annotations.csv") as path:
        frame = pl.read_csv(path, schema=schema, quote_char='"')
    spellings = {value: normalise_category(value) for value in frame["category"].unique().drop_nulls()}
    return frame.with_columns(pl.col("category").replace(spellings))


@translate_errors
def fetch_scope_sequences(engine: Engine, scope: ReferenceScope) -> pl.DataFrame:
    """(sequence_id, sequence) of every row of the scope's reference matrix (`db.snapshot`)."""
    inner, params = _rows_query(scope, sql.SQL("se.sequence_id"))
    query = sql.SQL(
        "SELECT s.id AS sequence_id, s.sequence FROM sequence s WHERE s.id IN ({}) ORDER BY s.id"
    ).format(inner)
    # a file of COPY text, not fetched rows: no Python object per row (`copy_file`); CSV tells an
    # empty sequence ("") from a missing one, as the rows would
    schema = {"sequence_id": pl.Int64, "sequence": pl.String}
    with copied(engine, query, params, "FORMAT csv, HEADER", "-sequences.csv") as path:
        return pl.read_csv(path, schema=schema, quote_char='"')


@translate_errors
def fetch_sequences(engine: Engine, sequence_ids: np.ndarray) -> pl.DataFrame:
    """(sequence_id, sequence) for the given ids (bound as one array parameter)."""
    ids = np.unique(np.asarray(sequence_ids, dtype=np.int64).ravel()).tolist()
    with engine.connect() as conn:
        cursor = _raw_cursor(conn)
        cursor.execute("SELECT id, sequence FROM sequence WHERE id = ANY(%s) ORDER BY id", (ids,))
        rows = cursor.fetchall()
    return pl.DataFrame(rows, schema={"sequence_id": pl.Int64, "sequence": pl.String}, orient="row")


@translate_errors
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
