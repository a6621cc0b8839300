"""Inputs: the reference set per (model, layer), the query FASTA and embeddings, the GO ontology.

Their data versions are fingerprints of what downstream assets read, so a changed input
marks exactly the dependent partitions stale.
"""

import warnings

import dagster as dg

from ..core.digest import file_digest
from ..db.reads import table_version
from ..query_fasta import ensure_query_embeddings, fasta_version
from .partitions import MODEL_LAYER, LookupState
from .resources import LookupSettings, ReferenceDatabase

# observable source assets are "beta" in Dagster 1.13; the warning would repeat in every process
warnings.filterwarnings("ignore", message=".*observable_source_asset.*", category=dg.BetaWarning)


@dg.observable_source_asset(
    partitions_def=MODEL_LAYER,
    group_name="inputs",
    description="Reference embeddings of one (model, layer) and the GO annotations they carry, in "
    "PostgreSQL. Data version: fingerprint of those rows (ids, counts, row versions).",
)
def reference_set(settings: LookupSettings, database: ReferenceDatabase) -> dg.DataVersionsByPartition:
    state = LookupState.open(settings, database)
    return dg.DataVersionsByPartition(state.versions())


NO_FASTA = "no FASTA: embeddings_path names an HDF5 file"


@dg.observable_source_asset(
    group_name="inputs",
    description="The FASTA query file, when the configuration's embeddings_path names one "
    "(.fa/.fasta/.faa/.fas, gzipped or not). Data version: SHA-256 of its bytes.",
)
def query_sequences(settings: LookupSettings) -> dg.DataVersion:
    config = settings.load()
    return dg.DataVersion(fasta_version(config) if config.query_fasta is not None else NO_FASTA)


@dg.asset(
    deps=[query_sequences],
    group_name="inputs",
    description="The query embeddings HDF5 the lookup reads. When the configuration names a FASTA "
    "file, it is embedded here with each enabled model's embed_with (cached under "
    "$FANTASIA_HOME/cache/embeddings) into {experiment_path}/query_embeddings.h5, and left as it "
    "is while FASTA, embedders and type ids are unchanged; an HDF5 named by the configuration is "
    "recorded as it is. Data version: SHA-256 of the HDF5's bytes.",
)
def query_embeddings(
    context: dg.AssetExecutionContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.MaterializeResult:
    config = settings.load()
    metadata: dict = {"path": dg.MetadataValue.path(str(config.embeddings_path))}
    if config.query_fasta is not None:
        embedded = ensure_query_embeddings(config, database.engine())
        for line in embedded.lines:
            (context.log.warning if line.startswith("warning:") else context.log.info)(line)
        metadata |= {
            "fasta": dg.MetadataValue.path(str(config.query_fasta)),
            "fasta_version": embedded.fasta_version,
            "source_key": embedded.source_key,
            "embedded_now": embedded.written,
            "models_not_embedded": ", ".join(embedded.skipped_models) or "none",
        }
    else:
        metadata["fasta"] = NO_FASTA
    return dg.MaterializeResult(
        data_version=dg.DataVersion(file_digest(config.embeddings_path)), metadata=metadata
    )


def ontology_version(engine) -> str:
    return table_version(engine, "go_terms")


@dg.observable_source_asset(
    group_name="inputs",
    description="GO terms (category, name) in the reference database, loaded from the OBO by "
    "`fantasia-assets load-references --obo`. Data version: their row versions.",
)
def go_ontology(database: ReferenceDatabase) -> dg.DataVersion:
    return dg.DataVersion(ontology_version(database.engine()))
