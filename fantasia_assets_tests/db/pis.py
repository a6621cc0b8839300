"""PIS 3.1.2's own model definitions and its embedding-type inserts, from the installed wheel.

protein-information-system is installed without its dependencies (`make install` runs
`pip install --no-deps protein-information-system==3.1.2`): its package `__init__` imports
torch, esm, Bio…, so the package is registered here as a bare namespace and only its SQL
modules (which need SQLAlchemy and pgvector alone) are imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
import types
from pathlib import Path

import pytest
import yaml

PIS = "protein_information_system"
VERSION = "3.1.2"
INSTALL = f"pip install --no-deps protein-information-system=={VERSION} (make install does)"


@functools.cache
def pis() -> types.SimpleNamespace:
    """Base, the shared entity classes, `handle_sequence_embedding_types` and its constants."""
    spec = importlib.util.find_spec(PIS)
    if spec is None or importlib.metadata.version("protein-information-system") != VERSION:
        pytest.fail(f"protein-information-system {VERSION} is not installed: {INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations)))
    if PIS not in sys.modules:
        package = types.ModuleType(PIS)
        package.__path__ = [str(root)]
        sys.modules[PIS] = package
    # every entity and operational module, so that the mappers' relationships all resolve;
    # sql.model.model (an aggregate that needs Bio) is left out
    for sub in ("entities", "operational"):
        parent = importlib.import_module(f"{PIS}.sql.model.{sub}")
        for info in pkgutil.walk_packages(parent.__path__, parent.__name__ + "."):
            importlib.import_module(info.name)
    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    base = importlib.import_module(f"{PIS}.sql.model.core.base")
    embedding = importlib.import_module(f"{PIS}.sql.model.entities.embedding.sequence_embedding")
    protein = importlib.import_module(f"{PIS}.sql.model.entities.protein.protein")
    accession = importlib.import_module(f"{PIS}.sql.model.entities.protein.accesion")
    sequence = importlib.import_module(f"{PIS}.sql.model.entities.sequence.sequence")
    go_term = importlib.import_module(f"{PIS}.sql.model.entities.go_annotation.go_term")
    annotation = importlib.import_module(f"{PIS}.sql.model.entities.go_annotation.go_annotation")
    constants = importlib.import_module(f"{PIS}.sql.constants")
    return types.SimpleNamespace(
        Base=base.Base,
        Sequence=sequence.Sequence,
        Protein=protein.Protein,
        Accession=accession.Accession,
        GOTerm=go_term.GOTerm,
        ProteinGOTermAnnotation=annotation.ProteinGOTermAnnotation,
        SequenceEmbeddingType=embedding.SequenceEmbeddingType,
        SequenceEmbedding=embedding.SequenceEmbedding,
        handle_sequence_embedding_types=constants.handle_sequence_embedding_types,
        constants=yaml.safe_load((root / "config" / "constants.yaml").read_text()),
    )


def pis_url(url):
    """The URL as PIS connects: through psycopg2."""
    return url.set(drivername="postgresql+psycopg2")


def create_pis_database(url, *, shared_only: bool = False) -> None:
    """What PIS's DatabaseManager does at start-up: the vector extension, then `create_all`."""
    import sqlalchemy as sa

    from fantasia_assets.db.models import SHARED_TABLES

    models = pis()
    engine = sa.create_engine(pis_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
        tables = [models.Base.metadata.tables[name] for name in SHARED_TABLES] if shared_only else None
        models.Base.metadata.create_all(engine, tables=tables)
    finally:
        engine.dispose()
