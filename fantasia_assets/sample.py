"""The bundled sample (data/sample): 300 human references with two models, 50 mouse queries."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from .progress import Progress, no_progress

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_DIR = DATA_DIR / "sample"
SAMPLE_CONFIG = DATA_DIR / "config.yaml"
SAMPLE_FASTA_CONFIG = DATA_DIR / "config_fasta.yaml"  # the demo's: the queries as FASTA, embedded first
SAMPLE_MODELS = (("NEAR", "references_near.h5"), ("AntiBERTy", "references_antiberty.h5"))


def load_sample(engine: Engine, progress: Progress = no_progress) -> list:
    """Load the sample references of both models; returns (model, LoadReport) pairs."""
    from .db.loader import load_references

    reports = []
    for model, h5 in SAMPLE_MODELS:
        report = load_references(
            engine,
            fasta=SAMPLE_DIR / "references.fasta.gz",
            gaf=[SAMPLE_DIR / "references.gaf.gz"],
            obo=SAMPLE_DIR / "go-basic.obo.gz",
            embeddings=SAMPLE_DIR / h5,
            model=model,
            progress=progress,
        )
        reports.append((model, report))
    return reports
