"""SQLAlchemy models of the reference database: the seven tables we share with FANTASIA.

Every column, type, default, NOT NULL, unique constraint and index is that of
protein-information-system (PIS) 3.1.2, the schema of FANTASIA 4.1.1's databases, so each tool
reads and writes the other's database (`fantasia_assets_tests/db/test_pis_schema.py` compares
the two). Indexes prefixed `ix_fa_` are ours alone: they serve our own queries. The migrations
under `migrations/` build this schema; `fantasia-assets db check` compares a database with it.
"""

from __future__ import annotations

import datetime

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    ARRAY,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# a legacy entry (`type_<id>/embedding`, no layer groups) is stored under this layer index
from ..core.queries import LEGACY_LAYER_INDEX

# What PIS puts in `go_terms.category` when a term has no aspect (its column default).
UNDEFINED_CATEGORY = "undefined"

__all__ = ["LEGACY_LAYER_INDEX", "SHARED_TABLES", "UNDEFINED_CATEGORY", "Base"]

SHARED_TABLES = (
    "sequence",
    "protein",
    "accession",
    "go_terms",
    "protein_go_term_annotation",
    "sequence_embedding_type",
    "sequence_embeddings",
)


class Base(DeclarativeBase):
    pass


class Sequence(Base):
    """A unique amino-acid sequence; several proteins may share one."""

    __tablename__ = "sequence"
    __table_args__ = (Index("idx_sequence_hash", "sequence_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sequence: Mapped[str] = mapped_column(String, nullable=False)
    # md5 of the sequence: the key the loaders merge on
    sequence_hash: Mapped[str | None] = mapped_column(String, unique=True, index=True)


class Protein(Base):
    """A UniProt entry with its sequence and taxon; the UniProt flat-file fields PIS keeps too."""

    __tablename__ = "protein"
    __table_args__ = (
        Index("ix_fa_protein_sequence_id", "sequence_id"),
        Index("ix_fa_protein_taxonomy_id", "taxonomy_id"),
    )
    id: Mapped[str] = mapped_column(String, primary_key=True)
    sequence_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("sequence.id"))
    data_class: Mapped[str | None] = mapped_column(String)
    molecule_type: Mapped[str | None] = mapped_column(String)
    created_date: Mapped[datetime.date | None] = mapped_column(Date)
    sequence_update_date: Mapped[datetime.date | None] = mapped_column(Date)
    annotation_update_date: Mapped[datetime.date | None] = mapped_column(Date)
    description: Mapped[str | None] = mapped_column(String)
    gene_name: Mapped[str | None] = mapped_column(String)
    organism: Mapped[str | None] = mapped_column(String)
    organelle: Mapped[str | None] = mapped_column(String)
    taxonomy_id: Mapped[str | None] = mapped_column(String)
    comments: Mapped[str | None] = mapped_column(String)
    protein_existence: Mapped[int | None] = mapped_column(Integer)
    seqinfo: Mapped[str | None] = mapped_column(String)
    disappeared: Mapped[bool | None] = mapped_column(Boolean)
    # PIS sets both client-side (no server default); the loader does the same in its SQL
    created_at: Mapped[datetime.datetime | None] = mapped_column(DateTime, default=func.now())
    updated_at: Mapped[datetime.datetime | None] = mapped_column(DateTime, onupdate=func.now())


class Accession(Base):
    """An accession code of a protein (the primary one and secondary ones)."""

    __tablename__ = "accession"
    __table_args__ = (Index("ix_fa_accession_protein_id", "protein_id"),)
    code: Mapped[str] = mapped_column(String, primary_key=True)
    primary: Mapped[bool | None] = mapped_column(Boolean, default=True)
    tag: Mapped[str | None] = mapped_column(String)
    protein_id: Mapped[str | None] = mapped_column(String, ForeignKey("protein.id"))
    created_at: Mapped[datetime.datetime | None] = mapped_column(DateTime, default=func.now())
    updated_at: Mapped[datetime.datetime | None] = mapped_column(DateTime, onupdate=func.now())


class GOTerm(Base):
    """A Gene Ontology term; `category` is P, F or C (the loader normalises it)."""

    __tablename__ = "go_terms"
    go_id: Mapped[str] = mapped_column(String, primary_key=True)
    category: Mapped[str] = mapped_column(String, nullable=False, default=UNDEFINED_CATEGORY)
    description: Mapped[str | None] = mapped_column(String)


class ProteinGOTermAnnotation(Base):
    """One GO annotation of a protein, with the evidence code that supports it.

    PIS's primary key is (id, protein_id, go_id), `id` a serial; (protein_id, go_id) is unique.
    """

    __tablename__ = "protein_go_term_annotation"
    __table_args__ = (UniqueConstraint("protein_id", "go_id", name="uq_pga_protein_go"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    protein_id: Mapped[str] = mapped_column(String, ForeignKey("protein.id"), primary_key=True)
    go_id: Mapped[str] = mapped_column(String, ForeignKey("go_terms.go_id"), primary_key=True)
    evidence_code: Mapped[str] = mapped_column(String, nullable=False)


class SequenceEmbeddingType(Base):
    """An embedding model; its `id` is the `type_<id>` used in query HDF5 files.

    `id` is a serial: PIS inserts its standard models without one. Our loader inserts the id
    of the HDF5 file and then moves the sequence past it (`setval`), so the two never collide.
    """

    __tablename__ = "sequence_embedding_type"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True, nullable=False)
    description: Mapped[str | None] = mapped_column(String)
    task_name: Mapped[str | None] = mapped_column(String)
    model_name: Mapped[str | None] = mapped_column(String)


class SequenceEmbedding(Base):
    """One fp16 embedding of a sequence by a model at a layer (0 = last hidden layer)."""

    __tablename__ = "sequence_embeddings"
    __table_args__ = (
        UniqueConstraint("sequence_id", "embedding_type_id", "layer_index", name="uq_seqemb_seq_type_layer"),
        Index("ix_seqemb_seq", "sequence_id"),
        Index("ix_seqemb_type", "embedding_type_id"),
        # our reference fetch reads one (model, layer) at a time
        Index("ix_fa_seqemb_type_layer", "embedding_type_id", "layer_index"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence_id: Mapped[int] = mapped_column(Integer, ForeignKey("sequence.id"), nullable=False)
    embedding_type_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("sequence_embedding_type.id"), nullable=False
    )
    layer_index: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding = mapped_column(HALFVEC(), nullable=False)
    shape = mapped_column(ARRAY(Integer))
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime, server_default=func.now(), nullable=False)
    updated_at: Mapped[datetime.datetime] = mapped_column(
        DateTime, server_default=func.now(), onupdate=func.now(), nullable=False
    )
