"""Materialise one (model, layer) partition and record every path it writes (test_concurrency).

    python -m fantasia_assets_tests.hardening.partition_driver KEY EXPERIMENT RECORD GO

Waits until the file GO exists (so that two drivers start their work together), materialises
the partition's assets on an ephemeral instance, and writes to RECORD one line per path under
EXPERIMENT that was opened for writing, renamed or removed, seen by an audit hook (folders
made with `exist_ok` are not writes: two partitions may both make their common parent).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main(key: str, experiment: str, record: str, go: str) -> None:
    import dagster as dg

    from fantasia_assets.definitions import defs
    from fantasia_assets.defs import lookup
    from fantasia_assets.defs.partitions import MODEL_LAYER

    root = os.path.realpath(experiment)
    touched: set[str] = set()

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.path.realpath(os.fsdecode(path))
            if text.startswith(root + os.sep):
                touched.add(os.path.relpath(text, root))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing:
                note(path)
        elif event == "os.rename":
            note(args[0])
            note(args[1])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):  # shared parents are made with exist_ok
            note(args[0])

    while not Path(go).exists():
        time.sleep(0.05)
    sys.addaudithook(hook)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, [key])
        result = dg.materialize(
            [
                lookup.reference_embeddings,
                lookup.neighbour_hits,
                lookup.raw_result_shards,
                lookup.topgo_exports,
            ],
            resources=defs.resources,
            instance=instance,
            partition_key=key,
        )
    Path(record).write_text("\n".join(sorted(touched)) + "\n")
    raise SystemExit(0 if result.success else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
