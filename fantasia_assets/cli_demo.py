"""`fantasia-assets demo`: the sample loaded, the asset graph materialised, from any folder."""

from __future__ import annotations

import os
from pathlib import Path

from . import cli_science
from .errors import FantasiaError


def absolute_dagster_home(given: str) -> Path:
    """`$DAGSTER_HOME` as given, refused in one line when relative: Dagster refuses it too, but
    with a traceback, and (in `demo`) only after the reference loads."""
    if not Path(given).is_absolute():
        raise FantasiaError(f"DAGSTER_HOME={given!r} must be an absolute path, e.g. {Path(given).resolve()}")
    return Path(given)


def demo_environment() -> None:
    """What `make demo` sets, for a `demo` run by hand from any folder.

    Without DAGSTER_HOME, the instance is `.dagster_home` in the working directory (the
    Makefile's), with the repository's dagster.yaml when it has none. Without FANTASIA_CONFIG,
    the sample configuration is read from the package (not from a relative data/ path), its
    query file and GO graph made absolute; outputs still go under the working directory.
    """
    import shutil

    import yaml

    from .core.exports import write_bytes_atomic
    from .paths import fantasia_home, state_folder
    from .sample import DATA_DIR, SAMPLE_FASTA_CONFIG

    given = os.environ.get("DAGSTER_HOME")
    home = state_folder(
        absolute_dagster_home(given) if given else Path(".dagster_home").resolve(), "DAGSTER_HOME"
    )
    instance_yaml = DATA_DIR.parent / "dagster.yaml"
    # the Makefile's instance, or one made now: the project's settings (a user's own is left alone)
    if (
        instance_yaml.is_file()
        and not (home / "dagster.yaml").exists()
        and not (given and any(home.iterdir()))
    ):
        shutil.copyfile(instance_yaml, home / "dagster.yaml")
    if not given:
        os.environ["DAGSTER_HOME"] = str(home)
        print(f"DAGSTER_HOME is not set: using {home}")
    if not os.environ.get("FANTASIA_CONFIG"):
        raw = yaml.safe_load(SAMPLE_FASTA_CONFIG.read_text(encoding="utf-8"))
        raw["embeddings_path"] = str((DATA_DIR.parent / raw["embeddings_path"]).resolve())
        scoring = raw.get("scoring") or {}
        if scoring.get("ontology"):  # the GO graph predictions.tsv needs, from the package too
            scoring["ontology"] = str((DATA_DIR.parent / scoring["ontology"]).resolve())
        config = state_folder(fantasia_home() / "demo", "the demo folder") / "config.yaml"
        write_bytes_atomic(config, yaml.safe_dump(raw, sort_keys=False).encode())
        os.environ["FANTASIA_CONFIG"] = str(config)


def run_demo(args, progress) -> int:
    import dagster as dg

    from .config import load_config
    from .db import get_engine, redacted
    from .defs.demo import materialize_everything
    from .sample import load_sample

    # the demo starts from the sample proteome FASTA; the resources read the variable when defined
    demo_environment()
    config = load_config(os.environ["FANTASIA_CONFIG"])
    if config.query_fasta is not None:
        for line in demo_embedding_lines(config):
            print(line)
    engine = get_engine()
    print(f"reference database: {redacted(engine.url)}")
    for model, report in load_sample(engine, progress):
        print(f"--- sample references, {model}")
        for line in report.lines():
            print(line)
    with dg.DagsterInstance.get() as instance:
        print(f"--- materialising the asset graph (Dagster instance {instance.root_directory})")
        materialize_everything(instance)
    print(f"outputs under {config.experiment_path}:")
    if config.query_fasta is not None:
        print(f"  {config.embeddings_path}  (the queries embedded from {config.query_fasta.name})")
    for name in (
        "summary.csv",
        "raw_results",
        "topgo",
        "sequences.fasta",
        "query_index_mapping.csv",
        "skipped_queries.csv",
        "output_names.csv",
        "lineage.duckdb",
        "predictions.tsv",
    ):
        print(f"  {config.experiment_path / name}")
    print(f"browse them in the Dagster UI: {_ui_command(config)}, then http://127.0.0.1:3000")
    cli_science.demo_evaluation(config)
    return 0


def demo_embedding_lines(config) -> list[str]:
    """What the demo embeds its FASTA queries with, and which models it cannot embed and why."""
    import importlib.util

    lines = [f"--- queries: {config.query_fasta} (FASTA), embedded before the lookup"]
    for model in config.enabled_models():
        if model.embed_with:
            lines.append(f"  {model.name}: embedded with {model.embed_with}")
        elif model.name.lower() == "antiberty" and importlib.util.find_spec("antiberty") is None:
            lines.append(
                f"  {model.name}: not embedded, so not looked up: the antiberty package is not installed "
                "here (the sample's HDF5, data/config.yaml, holds AntiBERTy vectors made elsewhere)"
            )
        else:
            lines.append(f"  {model.name}: not embedded (no embed_with), so not looked up")
    return lines


def _ui_command(config) -> str:
    """`make ui` in the project's folder (the Makefile's instance is the demo's); elsewhere the
    `dagster dev` command over this demo's instance and configuration."""
    import sys

    from .sample import DATA_DIR

    project = DATA_DIR.parent
    if Path.cwd() == project and (project / "Makefile").is_file():
        return "make ui"
    dagster = Path(sys.executable).with_name("dagster")
    return (
        f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} FANTASIA_CONFIG={os.environ['FANTASIA_CONFIG']} "
        f"{dagster} dev -w {project / 'workspace.yaml'} -h 127.0.0.1 -p 3000"
    )
