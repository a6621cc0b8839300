"""What a load of references did (changes per table, skips, timings), and its error class."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from fantasia_assets.errors import FantasiaError


class LoadError(FantasiaError, ValueError):
    """The inputs cannot be loaded as asked; nothing was written."""


NAMED = 5  # records a report line names before it says how many more there are


@dataclass
class Change:
    """Rows inserted and updated by one merge, and rows that were already identical."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0

    def __str__(self) -> str:
        text = f"{self.inserted:,} new, {self.updated:,} updated, {self.unchanged:,} unchanged"
        return text + (f", {self.deleted:,} removed" if self.deleted else "")


@dataclass
class LoadReport:
    """What a load did: changes per table, totals, skips with reasons, and stage timings."""

    go_terms: Change = field(default_factory=Change)
    sequences: Change = field(default_factory=Change)
    proteins: Change = field(default_factory=Change)
    annotations: Change = field(default_factory=Change)
    annotations_by_aspect: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    embedding_type_id: int | None = None
    embeddings_by_layer: dict[int | None, Change] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    # proteins whose FASTA sequence differs from the one loaded before, the embeddings of old
    # sequences removed with them, and (protein, model) pairs left without embeddings for now
    changed_sequences: list[str] = field(default_factory=list)
    stale_embeddings: int = 0
    without_embeddings: list[tuple[str, str]] = field(default_factory=list)
    # per skip reason: its first records, how many distinct records in all, and what they are
    # when they are not what the count counts (the GO terms of skipped GAF lines, say)
    skipped_names: dict[str, tuple[list[str], int, str]] = field(default_factory=dict)

    def name_skipped(
        self, reason: str, names: Sequence[str], total: int | None = None, what: str = ""
    ) -> None:
        """Name the records behind `reason` (its count is `skipped[reason]`): the first few are
        printed, then how many more; `total` when `names` holds only the first ones."""
        if len(names) or total:
            self.skipped_names[reason] = (list(names[:NAMED]), len(names) if total is None else total, what)

    @property
    def embedding_rows(self) -> int:
        return sum(c.inserted + c.updated + c.unchanged for c in self.embeddings_by_layer.values())

    def lines(self) -> list[str]:
        """A human-readable account, one line per fact."""
        out = []
        if self.go_terms.inserted + self.go_terms.updated + self.go_terms.unchanged:
            out.append(f"GO terms:     {self.go_terms}")
        if self.proteins.inserted + self.proteins.updated + self.proteins.unchanged:
            out.append(f"sequences:    {self.sequences}")
            out.append(f"proteins:     {self.proteins}")
            out.append(f"annotations:  {self.annotations}")
            aspects = ", ".join(f"{k} {v:,}" for k, v in sorted(self.annotations_by_aspect.items()))
            out.append(f"  kept by aspect: {aspects}")
        for layer, change in self.embeddings_by_layer.items():
            name = f"layer_{layer}" if layer is not None else "legacy (no layer)"
            out.append(f"embeddings:   {self.model} (type_{self.embedding_type_id}) {name}: {change}")
        out.extend(changed_sequence_lines(self))
        for reason, count in sorted(self.skipped.items()):
            if count:
                out.append(f"skipped:      {count:,} {reason}{self._names(reason)}")
        if self.timings:
            out.append("timings (s):  " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        return out

    def _names(self, reason: str) -> str:
        """`: A, B and 3 more`, or ` (4 GO terms: A, B and 2 more)` when they are not what is counted."""
        if reason not in self.skipped_names:
            return ""
        first, total, what = self.skipped_names[reason]
        listed = ", ".join(first) + (f" and {total - len(first):,} more" if total > len(first) else "")
        return f" ({total:,} {what}: {listed})" if what else f": {listed}"


def changed_sequence_lines(report: LoadReport) -> list[str]:
    """Report lines about proteins whose sequence changed (none when none did)."""
    if not report.changed_sequences:
        return []
    named = ", ".join(report.changed_sequences[:10]) + (", …" if len(report.changed_sequences) > 10 else "")
    out = [
        f"changed:      {len(report.changed_sequences):,} proteins have a new sequence ({named}); "
        f"{report.stale_embeddings:,} embeddings of their old sequences removed"
    ]
    if report.without_embeddings:
        missing = ", ".join(f"{p} ({m})" for p, m in report.without_embeddings[:10])
        more = ", …" if len(report.without_embeddings) > 10 else ""
        out.append(
            f"warning:      out of the search until embeddings of their new sequence are loaded "
            f"(--embeddings … --model …): {missing}{more}"
        )
    return out


@dataclass
class Annotations:
    """Proteins and annotations of the GAF files, ready to merge; `covered`: every protein named."""

    proteins: pl.DataFrame
    annotations: pl.DataFrame
    covered: list[str]
