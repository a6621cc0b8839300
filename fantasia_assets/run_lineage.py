"""The lineage rows of a whole lookup run in one process (the CLI's `runner.run_lookup`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .core import aggregate, exports, lineage

if TYPE_CHECKING:
    from .config import LookupConfig
    from .core.plan import Partition, QuerySet
    from .runner import PartitionReport


def record_run_lineage(
    config: LookupConfig,
    queries: QuerySet,
    partitions: list[Partition],
    reports: list[PartitionReport],
    fingerprints: list[str],
    annotation_version: str,
    summary: aggregate.SummaryFile,
    timings: dict[str, float],
) -> None:
    """The lineage rows the assets would write, under a generated run id: one per partition's
    raw rows, one for the summary."""
    run_id, config_hash = lineage.new_run_id(), config.fingerprint()
    rows = [
        lineage.LineageRow(
            run_id,
            "raw_result_shards",
            f"{exports.model_dir_name(r.partition.model.name)}|{exports.layer_dir_name(r.partition.layer)}",
            f"{fingerprint}-{annotation_version}",
            queries.content_hash,
            config_hash,
            {"queries": r.n_queries, "neighbours": r.n_hits, "rows": r.n_rows},
            r.timings,
            origin="cli",
        )
        for r, fingerprint in zip(reports, fingerprints, strict=True)
    ]
    counts = {"rows": summary.rows, "partitions": len(partitions)}
    summary_row = [run_id, "lookup_summary", None, annotation_version, queries.content_hash, config_hash]
    rows.append(lineage.LineageRow(*summary_row, counts, {"summary": timings["summary"]}, origin="cli"))
    lineage.record(config.experiment_path / "lineage.duckdb", rows)
