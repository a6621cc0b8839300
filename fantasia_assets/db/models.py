"""SQLAlchemy models of the reference database, column-compatible with FANTASIA reference dumps.

FANTASIA's dumps (protein-information-system 3.x) carry more columns than these; the platform
reads and writes only the columns below, so it works on such a dump as it is.
"""

from __future__ import annotations

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    ARRAY,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Sequence(Base):
    """A unique amino-acid sequence; several proteins may share one."""

    __tablename__ = "sequence"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence: Mapped[str] = mapped_column(Text, nullable=False)
    sequence_hash: Mapped[str] = mapped_column(String, unique=True, nullable=False)


class Protein(Base):
    """A UniProt entry with its sequence and taxon."""

    __tablename__ = "protein"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    sequence_id: Mapped[int | None] = mapped_column(ForeignKey("sequence.id"), index=True)
    gene_name: Mapped[str | None] = mapped_column(String)
    organism: Mapped[str | None] = mapped_column(String)
    taxonomy_id: Mapped[str | None] = mapped_column(String, index=True)
    description: Mapped[str | None] = mapped_column(Text)


class Accession(Base):
    """An accession code of a protein (the primary one and secondary ones)."""

    __tablename__ = "accession"
    code: Mapped[str] = mapped_column(String, primary_key=True)
    primary: Mapped[bool] = mapped_column(Boolean, default=True)
    protein_id: Mapped[str] = mapped_column(ForeignKey("protein.id"), index=True)


class GOTerm(Base):
    """A Gene Ontology term; `category` is normalised to P, F or C by the loader."""

    __tablename__ = "go_terms"
    go_id: Mapped[str] = mapped_column(String, primary_key=True)
    category: Mapped[str | None] = mapped_column(String)
    description: Mapped[str | None] = mapped_column(Text)


class ProteinGOTermAnnotation(Base):
    """One GO annotation of a protein, with the evidence code that supports it."""

    __tablename__ = "protein_go_term_annotation"
    __table_args__ = (UniqueConstraint("protein_id", "go_id", name="uq_protein_go_term"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protein_id: Mapped[str] = mapped_column(ForeignKey("protein.id"), index=True, nullable=False)
    go_id: Mapped[str] = mapped_column(ForeignKey("go_terms.go_id"), nullable=False)
    evidence_code: Mapped[str | None] = mapped_column(String)


class SequenceEmbeddingType(Base):
    """An embedding model; its `id` is the `type_<id>` used in query HDF5 files."""

    __tablename__ = "sequence_embedding_type"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String, unique=True, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    task_name: Mapped[str | None] = mapped_column(String)
    model_name: Mapped[str | None] = mapped_column(String)


class SequenceEmbedding(Base):
    """One fp16 embedding of a sequence by a model at a layer (0 = last hidden layer)."""

    __tablename__ = "sequence_embeddings"
    __table_args__ = (
        UniqueConstraint(
            "sequence_id",
            "embedding_type_id",
            "layer_index",
            name="uq_sequence_embedding_layer",
            # legacy embeddings have no layer; they must still be unique per sequence and model
            postgresql_nulls_not_distinct=True,
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence_id: Mapped[int] = mapped_column(ForeignKey("sequence.id"), nullable=False)
    embedding_type_id: Mapped[int] = mapped_column(ForeignKey("sequence_embedding_type.id"), nullable=False)
    layer_index: Mapped[int | None] = mapped_column(Integer)
    embedding = mapped_column(HALFVEC(), nullable=False)
    shape = mapped_column(ARRAY(Integer))
