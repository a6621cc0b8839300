"""Shared by the hardening tests: configs on the sample, query files with edits, tree digests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import yaml

from fantasia_assets_tests.conftest import PROJECT, SAMPLE

SAMPLE_QUERIES = SAMPLE / "queries.h5"


def config_dict(experiment: Path, queries: Path | None = None, **overrides) -> dict:
    """data/config.yaml with experiment_path, embeddings_path and dotted-key overrides."""
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(experiment)
    raw["embeddings_path"] = str(queries or SAMPLE_QUERIES)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def near_only(layers: list[int] | None = None) -> dict:
    """Overrides that keep the lookup to NEAR (small and quick)."""
    return {
        "embedding.models.AntiBERTy.enabled": False,
        "embedding.models.NEAR.layer_index": layers or [0, 1],
    }


def tree(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every output file under `root` (hidden temporaries included).

    lineage.duckdb is left out: it is the log every successful run appends its rows to, not
    part of an output set; so are the incremental state's records of other files' size, mtime
    and inode (`state/run.json`, `state/sequences.json`, `state/.../shards.parquet`), which
    differ between any two runs.
    """
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lineage.duckdb" and not _signatures(p.relative_to(root))
    }


def _signatures(relative: Path) -> bool:
    return relative.parts[:1] == ("state",) and (
        relative.name == "shards.parquet"
        or relative in (Path("state/run.json"), Path("state/sequences.json"))
    )


def hidden(root: Path) -> list[str]:
    """Leftover temporaries: anything under `root` whose name starts with a dot."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


Edit = Callable[[str, dict], dict | None]


def sample_groups(limit: int | None = None) -> list[tuple[str, dict]]:
    """(group name, {"sequence": str, "type_1/layer_0/embedding": array, …}) of the sample queries."""
    groups = []
    with h5py.File(SAMPLE_QUERIES) as source:
        for name in sorted(source)[:limit]:
            content = {"sequence": source[name]["sequence"][()].decode()}

            def collect(path, obj, content=content):
                if isinstance(obj, h5py.Dataset) and path != "sequence":
                    content[path] = np.asarray(obj[()])

            source[name].visititems(collect)
            groups.append((name, content))
    return groups


def write_queries(path: Path, groups: list[tuple[str, dict]]) -> Path:
    """An HDF5 query file in the SPEC §2.1 layout from (group name, content) pairs."""
    with h5py.File(path, "w") as out:
        for name, content in groups:
            group = out.create_group(name)
            for key, value in content.items():
                if key == "sequence":
                    group.create_dataset("sequence", data=value, dtype=h5py.string_dtype())
                else:
                    group.create_dataset(key, data=value)
    return path
