"""Loading a reference set (sequences, proteins, GO annotations, embeddings) into the database.

All input files are parsed and checked before the first write; everything is then written in
ONE transaction, so a failure at any point leaves the database as it was. Loads into the same
database are serialised by a transaction-scoped advisory lock: a load that finds another one
writing logs a warning naming it, then waits its turn (never interleaving with it). The merges
themselves (re-loads change nothing, a newer GAF updates) are `db.merge`'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from sqlalchemy.engine import Engine

from ..core.progress import Progress, no_progress
from ..core.queries import EmbeddingCatalogue, EmbeddingFileError, scan
from ..core.timing import timed
from . import merge
from .engine import DRIVER_ERRORS, translate_errors
from .load_report import Annotations, Change, LoadError, LoadReport
from .migrate import schema_ready
from .reload import check_changed_proteins
from .sources import (
    DEFAULT_EVIDENCE,
    ORGANISMS,
    InputFileError,
    evidence_codes,
    read_fasta,
    read_gaf,
    read_obo,
)

_log = logging.getLogger(__name__)

LOAD_LOCK = "fantasia_assets.load_references"
# what callers import from here
__all__ = ["LOAD_LOCK", "Change", "LoadError", "LoadReport", "load_references", "reference_snapshot"]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _prepare_annotations(
    fasta: Path, gaf: list[Path], obo: Path, evidence: tuple[str, ...], report: LoadReport
):
    """The proteins and annotations to merge, and the ontology; what is left out is counted and named.

    A protein the GAF names is loaded only with a FASTA sequence, and then takes exactly the
    GAF's annotation set (`db.merge`). One the FASTA lacks is left as it is: a FASTA of a subset
    must not strip the annotations of the proteins it leaves out.
    """
    with timed(report.timings, "parse OBO"):
        ontology = read_obo(obo)
    with timed(report.timings, "parse FASTA"):
        sequences = read_fasta(fasta)
    with timed(report.timings, "parse GAF"):
        gaf_data = read_gaf(gaf, ontology, evidence)
    for reason, count in gaf_data.skipped.items():
        report.skipped[f"GAF lines: {reason}"] += count
    for reason, terms in gaf_data.skipped_terms.items():
        report.name_skipped(f"GAF lines: {reason}", terms, what="GO terms")

    kept = gaf_data.kept.join(sequences.rename({"accession": "protein_id"}), on="protein_id", how="left")
    without_sequence = kept.filter(pl.col("sequence").is_null())
    report.skipped["GAF annotations of proteins without a FASTA sequence"] += without_sequence.height
    unsequenced = without_sequence["protein_id"].unique(maintain_order=True)
    reason = "GAF proteins without a FASTA sequence, not loaded or changed"
    report.skipped[reason] += unsequenced.len()
    report.name_skipped(reason, unsequenced)
    kept = kept.filter(pl.col("sequence").is_not_null())
    accessions = sequences["accession"]
    named = accessions.is_in(pl.Series(list(gaf_data.covered_proteins), dtype=pl.String).implode())
    annotated = accessions.is_in(kept["protein_id"].unique().implode())
    for reason, left_out in (
        ("FASTA proteins the GAF does not name, not loaded or changed", ~named),
        (
            "FASTA proteins whose GAF lines were all filtered out, left without annotations",
            named & ~annotated,
        ),
    ):
        report.skipped[reason] += int(left_out.sum())
        report.name_skipped(reason, accessions.filter(left_out))
    covered = accessions.filter(named)
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
    return ontology, Annotations(
        proteins=proteins,
        annotations=annotations.drop("aspect"),
        covered=covered.sort().to_list(),
    )


_LAYOUT = "accession_<ID>/sequence and accession_<ID>/type_<id>/layer_<k>/embedding"


def _check_has_vectors(catalogue: EmbeddingCatalogue) -> None:
    """A reference HDF5 without a single vector is the wrong file, or one of another layout."""
    if catalogue.layers:
        return
    if catalogue.accessions:
        problem = f"no vectors in its {len(catalogue.accessions):,} accession_<ID> groups"
    else:
        problem = "no accession_<ID> groups"
    found = ", ".join(f"{group} ({reason})" for group, reason in catalogue.skipped[:3])
    if len(catalogue.skipped) > 3:
        found += f" and {len(catalogue.skipped) - 3:,} more"
    if found:
        found = f"; found {found}"
    elif not catalogue.accessions:
        found = "; the file is empty"
    raise InputFileError(f"{catalogue.path}: {problem} (expected {_LAYOUT}){found}")


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
        "another load-references is writing to this database, or a lookup is reading it%s; "
        "waiting for it to finish",
        _lock_holder(cursor),
    )
    with timed(report.timings, "wait for other load"):
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOAD_LOCK,))
    _log.info("the other load-references finished; loading now")


@translate_errors
def _snapshot_connection(engine: Engine):
    """A connection of its own holding the load lock shared (waiting, and saying so, for a load)."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    cursor = conn.connection.driver_connection.cursor()
    cursor.execute(
        "SELECT set_config('application_name', %s, false)",
        (f"fantasia-assets lookup, pid {os.getpid()} on {socket.gethostname()}"[:63],),
    )
    cursor.execute("SELECT pg_try_advisory_lock_shared(hashtext(%s))", (LOAD_LOCK,))
    if not cursor.fetchone()[0]:
        _log.warning(
            "load-references is writing to this database%s; the lookup waits for it to commit, "
            "so that it reads one consistent reference set",
            _lock_holder(cursor),
        )
        cursor.execute("SELECT pg_advisory_lock_shared(hashtext(%s))", (LOAD_LOCK,))
    return conn


@contextmanager
def reference_snapshot(engine: Engine) -> Iterator[None]:
    """Read one committed reference set for the block: the load lock, held shared.

    A lookup reads matrices, annotations and sequences in many queries; a load committing in
    between would mix two reference sets. Holding the load lock shared makes loads wait for the
    lookup, and the lookup wait for a load in progress (both say so). Session-scoped, on a
    connection of its own: it goes with that connection if this process dies.
    """
    with _snapshot_connection(engine) as conn:
        cursor = conn.connection.driver_connection.cursor()
        try:
            yield
        finally:
            try:
                cursor.execute("SELECT pg_advisory_unlock_shared(hashtext(%s))", (LOAD_LOCK,))
                cursor.execute("SELECT set_config('application_name', '', false)")
            except DRIVER_ERRORS:
                conn.invalidate()  # a pooled connection must never keep the lock


def check_load_arguments(fasta, gaf: list, obo, embeddings: bool, model: str | None) -> None:
    """What `load_references` is given makes one load, or `LoadError` says what is missing
    (the CLI asks before the server starts)."""
    if fasta is not None and not gaf:
        # reference proteins come from the GAF: a FASTA alone would be read and then ignored
        raise LoadError(
            f"{fasta}: loading --fasta needs --gaf (reference proteins are the GAF's annotated "
            "proteins with a FASTA sequence) and --obo; to embed proteins already loaded, add "
            "--embed-with MODEL"
        )
    if gaf and (fasta is None or obo is None):
        raise LoadError("loading GAF annotations needs --fasta (sequences) and --obo (GO terms)")
    if embeddings and not model:
        raise LoadError("loading embeddings needs --model NAME")
    if not gaf and not embeddings and obo is None:
        raise LoadError(
            "nothing to load: give --gaf with --fasta and --obo, --obo alone, and/or --embeddings"
        )


@translate_errors
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
    check_load_arguments(fasta, gaf, obo, embeddings is not None, model)
    evidence = evidence_codes(evidence)

    ontology = annotations = catalogue = None
    if gaf:
        ontology, annotations = _prepare_annotations(Path(fasta), gaf, Path(obo), evidence, report)
    elif obo is not None:
        with timed(report.timings, "parse OBO"):
            ontology = read_obo(obo)
    if embeddings is not None:
        with timed(report.timings, "scan HDF5"):
            try:
                catalogue = scan(embeddings)
            except EmbeddingFileError as exc:
                raise InputFileError(str(exc)) from exc
        _check_has_vectors(catalogue)
        for _group, reason in catalogue.skipped:
            report.skipped[f"HDF5 groups: {reason}"] += 1

    schema_ready(engine)
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()
        _take_load_lock(cursor, report)
        if ontology is not None:
            with timed(report.timings, "write GO terms"):
                merge.write_ontology(cursor, ontology, report)
        if annotations is not None:
            with timed(report.timings, "write proteins+annotations"):
                merge.write_annotations(cursor, annotations, report)
        if catalogue is not None:
            with timed(report.timings, "write embeddings"):
                merge.write_embeddings(cursor, catalogue, model, type_id, report, progress)
        if annotations is not None:
            check_changed_proteins(cursor, report)
    return report
