"""Observable inputs: the reference set per (model, layer), the query file, the GO ontology.

Their data versions are fingerprints of what downstream assets read, so a changed input
marks exactly the dependent partitions stale.
"""

import warnings

import dagster as dg

from ..core.digest import file_digest
from ..db.reads import table_version
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


@dg.observable_source_asset(
    group_name="inputs",
    description="The query embeddings HDF5 of the configuration. Data version: SHA-256 of its bytes.",
)
def query_embeddings(settings: LookupSettings) -> dg.DataVersion:
    return dg.DataVersion(file_digest(settings.load().embeddings_path))


def ontology_version(engine) -> str:
    return table_version(engine, "go_terms")


@dg.observable_source_asset(
    group_name="inputs",
    description="GO terms (category, name) in the reference database, loaded from the OBO by "
    "`fantasia-assets load-references --obo`. Data version: their row versions.",
)
def go_ontology(database: ReferenceDatabase) -> dg.DataVersion:
    return dg.DataVersion(ontology_version(database.engine()))
