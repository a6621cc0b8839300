"""Write an `EmbeddedSet` as an HDF5 file in FANTASIA's query layout, whole or not at all.

Layout (SPEC §2.1): `/accession_<ID>/sequence` (the full sequence, UTF-8) and
`/accession_<ID>/type_<id>/layer_<k>/embedding` (float32). A record left out keeps its
`sequence` and gets no `type_<id>` group; its reason is the group's `embedding_skipped`
attribute, and the lookup reports it as a query without embedding. The file is built in
memory and written by `write_bytes_atomic`: a failure leaves the previous file or none.
"""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np

from fantasia_assets.core.exports import write_bytes_atomic

from .run import EmbeddedSet


def hdf5_bytes(embedded: EmbeddedSet, type_id: int, attrs: dict) -> bytes:
    """The whole file's bytes; `attrs` become root attributes (model_name, provenance…)."""
    return models_hdf5_bytes([(type_id, embedded)], attrs)


def models_hdf5_bytes(parts: list[tuple[int, EmbeddedSet]], attrs: dict) -> bytes:
    """One file holding several models' vectors of the same records, as `(type_id, set)` pairs.

    Every set must be of the same records in the same order (one FASTA embedded by each
    model). With one model the root attributes are that model's; with several,
    `embedding_type_id` lists the ids and the accession lists are unions.
    """
    first = parts[0][1]
    if any(embedded.accessions != first.accessions for _, embedded in parts[1:]):
        raise ValueError("every embedded set of one file must hold the same records")
    buffer = io.BytesIO()
    text = h5py.string_dtype("utf-8")
    skipped: dict[str, list[str]] = {}
    for type_id, embedded in parts:
        for accession, reason in embedded.skipped:
            skipped.setdefault(accession, []).append(
                reason if len(parts) == 1 else f"type_{type_id}: {reason}"
            )
    with h5py.File(buffer, "w") as h5:
        groups = []
        for accession, sequence in zip(first.accessions, first.sequences, strict=True):
            group = h5.create_group(f"accession_{accession}")
            group.create_dataset("sequence", data=sequence, dtype=text)
            if accession in skipped:
                group.attrs["embedding_skipped"] = "; ".join(skipped[accession])
            groups.append(group)
        for type_id, embedded in parts:
            layers = sorted(embedded.vectors)
            for row, index in enumerate(embedded.rows):
                model_group = groups[int(index)].create_group(f"type_{type_id}")
                for layer in layers:
                    model_group.create_dataset(
                        f"layer_{layer}/embedding", data=embedded.vectors[layer][row], dtype=np.float32
                    )
        ids = [type_id for type_id, _ in parts]
        h5.attrs["embedding_type_id"] = ids[0] if len(ids) == 1 else np.array(ids, dtype=np.int64)
        h5.attrs["pooling"] = "mean"
        all_layers = sorted({layer for _, embedded in parts for layer in embedded.vectors})
        h5.attrs["layer_indices"] = np.array(all_layers, dtype=np.int64)
        h5.attrs["n_proteins"] = len(first.accessions)
        for name, pick in (
            ("truncated_accessions", lambda e: e.truncated),
            ("chunked_accessions", lambda e: e.chunked),
            ("skipped_accessions", lambda e: [accession for accession, _ in e.skipped]),
        ):
            values = list(dict.fromkeys(a for _, embedded in parts for a in pick(embedded)))
            h5.attrs.create(name, np.array(values, dtype=object), dtype=text)
        for name, value in attrs.items():
            h5.attrs[name] = value
    return buffer.getvalue()


def write_hdf5(path: str | Path, embedded: EmbeddedSet, type_id: int, attrs: dict) -> None:
    """Write the file atomically (a temporary sibling renamed over `path`)."""
    write_bytes_atomic(Path(path), hdf5_bytes(embedded, type_id, attrs))
