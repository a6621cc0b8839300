"""What people look at in the UI: previews and histograms rendered as markdown metadata, and the
fingerprints that show what one asset handed to the next."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

from ..core.digest import file_digest


def clusters_version(clusters: dict[str, str] | None) -> str:
    """Fingerprint of an id → representative map ("off" without masking), in id order."""
    if clusters is None:
        return "off"
    digest = hashlib.sha256()
    for member, representative in sorted(clusters.items()):
        digest.update(f"{member}\t{representative}\n".encode())
    return digest.hexdigest()[:16]


def files_version(paths: list[Path]) -> str:
    """One fingerprint of several written files (their contents, in the given order)."""
    return hashlib.sha256("".join(file_digest(p) for p in paths).encode()).hexdigest()[:16]


def distance_histogram(distances: np.ndarray, bins: int = 10) -> str:
    """A markdown bar chart of neighbour distances."""
    if len(distances) == 0:
        return "_no neighbours_"
    counts, edges = np.histogram(distances, bins=bins)
    peak = max(int(counts.max()), 1)
    lines = ["| distance | neighbours | |", "|---|---:|---|"]
    for count, low, high in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "█" * round(float(30 * count / peak))
        lines.append(f"| {low:.3f}–{high:.3f} | {int(count)} | {bar} |")
    return "\n".join(lines)


def best_predictions(raw: pl.DataFrame, limit: int = 15) -> str:
    """The `limit` highest-RI predictions as a markdown table."""
    if raw.height == 0:
        return "_no predictions_"
    top = (
        raw.group_by("accession", "go_id", "category", "go_description")
        .agg(pl.col("reliability_index").max(), pl.col("protein_id").first())
        .sort(["reliability_index", "accession", "go_id"], descending=[True, False, False])
        .head(limit)
    )
    lines = ["| accession | GO | aspect | term | RI | from |", "|---|---|---|---|---:|---|"]
    for row in top.iter_rows(named=True):
        lines.append(
            f"| {row['accession']} | {row['go_id']} | {row['category']} | {row['go_description']} "
            f"| {row['reliability_index']:.4f} | {row['protein_id']} |"
        )
    return "\n".join(lines)


def timings_table(timings: dict[str, float]) -> str:
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.3f} |" for stage, seconds in timings.items()]
    return "\n".join(lines)
