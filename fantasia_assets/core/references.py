"""Reference data as the lookup uses it: which rows (scope) and the (model, layer) matrix.

Reading them from PostgreSQL, fingerprinting and caching them is `fantasia_assets.db`'s
(`db.reads`, `db.stores`); core code receives the plain arrays and frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fantasia_assets.errors import FantasiaError


class ReferenceSetError(FantasiaError, LookupError):
    """The reference database lacks what the lookup needs (model, layer, rows)."""


# one row per (protein, GO term) of the annotation table the GO transfer reads
ANNOTATION_COLUMNS = [
    "sequence_id", "protein_id", "organism", "gene_name", "go_id", "category", "go_description",
    "evidence_code",
]  # fmt: skip


@dataclass(frozen=True)
class ReferenceScope:
    """Which reference rows a lookup uses: one model and layer, filtered by taxonomy."""

    type_id: int
    layer: int | None
    include_taxa: frozenset[str] | None = None  # None: every taxon
    exclude_taxa: frozenset[str] = frozenset()
    limit: int | None = None  # SPEC `limit_execution`: first N rows by sequence id

    def key(self) -> dict:
        return {
            "type_id": self.type_id,
            "layer": self.layer,
            "include": sorted(self.include_taxa) if self.include_taxa is not None else None,
            "exclude": sorted(self.exclude_taxa),
            "limit": self.limit,
        }


@dataclass
class ReferenceMatrix:
    """Embeddings of one scope: row i is sequence `sequence_ids[i]`; ids ascend."""

    scope: ReferenceScope
    sequence_ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float16 (n, dim), C-contiguous
    fingerprint: str
    # where the search engine may keep its prepared operands of these rows (`knn_reference`):
    # set by the reference cache for a matrix it maps from its own file, else None
    kept_operands: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.sequence_ids)
