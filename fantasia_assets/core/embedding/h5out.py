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
    buffer = io.BytesIO()
    text = h5py.string_dtype("utf-8")
    skipped = dict(embedded.skipped)
    with h5py.File(buffer, "w") as h5:
        groups = []
        for accession, sequence in zip(embedded.accessions, embedded.sequences, strict=True):
            group = h5.create_group(f"accession_{accession}")
            group.create_dataset("sequence", data=sequence, dtype=text)
            if accession in skipped:
                group.attrs["embedding_skipped"] = skipped[accession]
            groups.append(group)
        layers = sorted(embedded.vectors)
        for row, index in enumerate(embedded.rows):
            model_group = groups[int(index)].create_group(f"type_{type_id}")
            for layer in layers:
                model_group.create_dataset(
                    f"layer_{layer}/embedding", data=embedded.vectors[layer][row], dtype=np.float32
                )
        h5.attrs["embedding_type_id"] = type_id
        h5.attrs["pooling"] = "mean"
        h5.attrs["layer_indices"] = np.array(layers, dtype=np.int64)
        h5.attrs["n_proteins"] = len(embedded.accessions)
        for name, values in (
            ("truncated_accessions", embedded.truncated),
            ("chunked_accessions", embedded.chunked),
            ("skipped_accessions", [accession for accession, _ in embedded.skipped]),
        ):
            h5.attrs.create(name, np.array(values, dtype=object), dtype=text)
        for name, value in attrs.items():
            h5.attrs[name] = value
    return buffer.getvalue()


def write_hdf5(path: str | Path, embedded: EmbeddedSet, type_id: int, attrs: dict) -> None:
    """Write the file atomically (a temporary sibling renamed over `path`)."""
    write_bytes_atomic(Path(path), hdf5_bytes(embedded, type_id, attrs))
