"""Partition outputs that a run no longer produces, found and removed after a whole-run lookup.

A rerun in the same `experiment_path` with fewer models or layers used to leave the old
`raw_results/{model}/layer_{k}`, `topgo/…` and `parquet/…` folders behind: files that look
current but that summary.csv no longer covers. `run_lookup` writes every partition of the
configuration, so after it any other partition folder is stale, and is removed (and named).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# the per-partition output trees (SPEC §4); topgo/ensemble is run-wide, not a model
PARTITION_ROOTS = ("raw_results", "topgo", "parquet", "state")
_RUN_WIDE = {("topgo", "ensemble")}


def stale_partition_dirs(experiment_path: Path, current: Iterable[Path]) -> list[Path]:
    """`{root}/{model}/{layer}` folders under `experiment_path` of partitions not in `current`.

    `current` holds the partitions' relative `{model}/{layer}` folders. Only folders named like
    a partition's (`layer_*`) are considered; hidden ones are writers' temporaries.
    """
    wanted = {Path(p) for p in current}
    found = []
    for root in PARTITION_ROOTS:
        base = experiment_path / root
        if not base.is_dir():
            continue
        for model in sorted(base.iterdir()):
            if not model.is_dir() or model.name.startswith(".") or (root, model.name) in _RUN_WIDE:
                continue
            for layer in sorted(model.iterdir()):
                if (
                    layer.is_dir()
                    and layer.name.startswith("layer_")
                    and layer.relative_to(base) not in wanted
                ):
                    found.append(layer)
    return found


def remove_stale_partitions(
    experiment_path: Path, current: Iterable[Path], predictions_written: bool = True, topgo: bool = True
) -> list[Path]:
    """Remove the stale partition folders (and model folders left empty), predictions.tsv when
    the run wrote none (it would not match the summary beside it), and the whole `topgo` folder
    when the run writes no TopGO files (`lookup.topgo: false`); returns what was removed."""
    folder = Path(experiment_path) / "topgo"
    removed_topgo = [folder] if not topgo and folder.is_dir() else []
    for folder in removed_topgo:
        shutil.rmtree(folder)
        log.warning("removed %s: this run writes no TopGO files (lookup.topgo is false)", folder)
    removed = stale_partition_dirs(experiment_path, current)
    predictions = Path(experiment_path) / "predictions.tsv"
    if not predictions_written and predictions.is_file():
        predictions.unlink()
        log.warning("removed %s: this run writes no predictions (scoring.ontology is not set)", predictions)
        removed_file = [predictions]
    else:
        removed_file = []
    for folder in removed:
        shutil.rmtree(folder)
        log.warning("removed %s: its partition is not part of this run any more", folder)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()
    return removed_topgo + removed + removed_file
