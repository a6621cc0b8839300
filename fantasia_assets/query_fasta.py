"""A FASTA query file of the configuration → the query HDF5 the lookup reads, embedded once.

When `embeddings_path` names a FASTA file, every enabled model with an `embed_with` embeds it
(vectors cached under `$FANTASIA_HOME/cache/embeddings`) into one HDF5 in FANTASIA's layout,
`{experiment_path}/query_embeddings.h5`, with each model's `type_<id>` taken from the
reference database. The file records the key of what it was made from (the FASTA's bytes,
the embedders, layers and type ids): while that key is current the file is reused as it is,
so a re-run embeds nothing and writes nothing, and the lookup's query version stays the same.
Used by the CLI `lookup` and by the Dagster asset `query_embeddings`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from .config import LookupConfig, ModelConfig
from .core.digest import file_digest
from .core.embedding import EmbeddingError, SequenceRecord, check_records, embed_records, load_encoder
from .core.embedding.h5out import models_hdf5_bytes
from .core.embedding.run import DEFAULT_TOKEN_BUDGET, cache_for
from .core.exports import write_bytes_atomic
from .core.progress import Progress, no_progress
from .db.models_lookup import embedding_type_id
from .db.sources import fasta_records
from .paths import cache_dir

SOURCE_ATTR = "query_source"  # root attribute of the HDF5: the key of what it was embedded from
DEFAULT_LAYERS = (0, 1, 4)  # a model whose layer_index is null (every layer) is embedded at these


@dataclass
class QueryEmbedding:
    """The outcome: the HDF5, its source key, whether it was (re)written, and lines to show."""

    path: Path
    source_key: str
    fasta_version: str
    written: bool
    lines: list[str] = field(default_factory=list)
    skipped_models: list[str] = field(default_factory=list)


def fasta_version(config: LookupConfig) -> str:
    """SHA-256 (16 hex digits) of the FASTA query file's bytes; a missing file is an error naming it."""
    fasta = _fasta(config)
    try:
        return file_digest(fasta)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise EmbeddingError(
            f"{fasta}: cannot read the FASTA query file named by embeddings_path ({exc.strerror})"
        ) from None


def embedders(config: LookupConfig) -> tuple[list[ModelConfig], list[str]]:
    """(enabled models that embed the FASTA, names of enabled models without an `embed_with`)."""
    enabled = config.enabled_models()
    return [m for m in enabled if m.embed_with], [m.name for m in enabled if not m.embed_with]


def _fasta(config: LookupConfig) -> Path:
    if config.query_fasta is None:
        raise EmbeddingError("the configuration's embeddings_path is an HDF5 file, not a FASTA file")
    return config.query_fasta


def _layers(model: ModelConfig) -> list[int]:
    return list(model.layer_index) if model.layer_index is not None else list(DEFAULT_LAYERS)


def _plan(config: LookupConfig, engine: Engine) -> list[tuple[ModelConfig, int]]:
    """(model, type id) per embedder: the model's id in the reference database, or a free one.

    Models absent from the database would all be offered the same next free id; each takes
    the next one not already taken, so their `type_<id>` groups stay apart.
    """
    found = [(model, *embedding_type_id(engine, model.name)) for model in embedders(config)[0]]
    taken = {type_id for _, type_id, name in found if name is not None}
    plan = []
    for model, type_id, name in found:
        if name is None:
            while type_id in taken:
                type_id += 1
            taken.add(type_id)
        plan.append((model, type_id))
    return plan


def source_key(config: LookupConfig, engine: Engine, version: str | None = None) -> str:
    """What the HDF5 is made from: FASTA bytes, and per model its embedder, layers and type id."""
    payload = {
        "fasta": version or fasta_version(config),
        "models": [[m.name, m.embed_with, _layers(m), type_id] for m, type_id in _plan(config, engine)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def embedded_source(path: Path) -> str | None:
    """The source key recorded in an existing query HDF5, or None (absent, unreadable, no key;
    attributes that the HDF5 library would read without end, `core.h5heaps`: embedded again)."""
    import h5py

    from .core.h5fast import FastLayout
    from .core.h5heaps import endless_attributes

    layout = FastLayout.open(path)
    try:
        with h5py.File(path, "r") as handle:
            if layout is not None and endless_attributes(layout, h5py.h5o.get_info(handle.id).addr):
                return None
            value = handle.attrs.get(SOURCE_ATTR)
    except (OSError, ValueError):
        return None
    finally:
        if layout is not None:
            layout.close()
    return value.decode() if isinstance(value, bytes) else (str(value) if value is not None else None)


def is_current(config: LookupConfig, engine: Engine) -> bool:
    """Whether the query HDF5 exists and was embedded from the current FASTA and embedders."""
    return embedded_source(config.embeddings_path) == source_key(config, engine)


def read_query_records(fasta: Path) -> list[SequenceRecord]:
    """The checked records of the FASTA query file; any problem is one error naming file and record."""
    return check_records(
        (SequenceRecord(acc, seq, f"{fasta}:{line}") for acc, seq, line in fasta_records(fasta)),
        source=str(fasta),
    )


def ensure_query_embeddings(
    config: LookupConfig, engine: Engine, progress: Progress = no_progress, device: str | None = None
) -> QueryEmbedding:
    """Embed the configuration's FASTA into `config.embeddings_path`, unless it is current already."""
    fasta = _fasta(config)
    version = fasta_version(config)
    _, without = embedders(config)
    notes = [
        f"warning: model {name!r} has no embed_with: the FASTA is not embedded with it, so it is not looked up"
        for name in without
    ]
    plan = _plan(config, engine)
    key = source_key(config, engine, version)
    out = config.embeddings_path
    if embedded_source(out) == key:
        return QueryEmbedding(
            out,
            key,
            version,
            False,
            [*notes, f"query embeddings current: {out} (from {fasta.name})"],
            without,
        )
    records = read_query_records(fasta)
    parts, lines = [], []
    device = device or (None if config.use_gpu else "cpu")
    for model, type_id in plan:
        encoder = load_encoder(model.embed_with, device)
        on = str(getattr(encoder, "device", "cpu"))
        budget = DEFAULT_TOKEN_BUDGET * (4 if on.startswith("cuda") else 1)
        cache = cache_for(encoder, cache_dir("embeddings"))
        embedded = embed_records(
            records, encoder, _layers(model), token_budget=budget, cache=cache, progress=progress
        )
        parts.append((type_id, embedded))
        lines.append(
            f"{model.name}: {len(records)} proteins embedded with {encoder.spec.name} on {on} as type_{type_id}, "
            f"layers {', '.join(map(str, _layers(model)))} ({embedded.from_cache} of {embedded.pieces} "
            f"distinct sequences from the cache)"
        )
        lines += [f"{model.name}: skipped {accession}: {reason}" for accession, reason in embedded.skipped]
        if embedded.truncated:
            lines.append(
                f"{model.name}: {len(embedded.truncated)} proteins embedded on their first "
                f"{encoder.spec.max_residues} residues ({encoder.spec.name}'s limit): "
                f"{embedded.truncated_sample()}"
            )
        mapped = embedded.mapped_line(encoder.spec.name, "proteins")
        if mapped:
            lines.append(f"{model.name}: {mapped}")
    attrs = {
        SOURCE_ATTR: key,
        "source_fasta": str(fasta),
        "source_fasta_sha256": version,
        "models": json.dumps({m.name: m.embed_with for m, _ in plan}, sort_keys=True),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, models_hdf5_bytes(parts, attrs))
    return QueryEmbedding(
        out, key, version, True, [*notes, *lines, f"query embeddings written: {out}"], without
    )
