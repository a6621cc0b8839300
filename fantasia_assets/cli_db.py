"""`fantasia-assets db upgrade|current|check|stop`: the reference database's schema revision, and
stopping the embedded server."""

from __future__ import annotations

_WHICH = (
    "The reference database is FANTASIA_DATABASE_URL, or the embedded server under "
    "$FANTASIA_HOME/pg. Every command that uses the database upgrades it on first use as well; "
    "these commands do it, or look, on their own."
)


def add_db_parser(commands) -> None:
    parser = commands.add_parser(
        "db",
        help="the reference database's schema: upgrade it, show its revision, check it",
        description="Schema migrations of the reference database (Alembic). " + _WHICH,
    )
    actions = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    actions.add_parser(
        "upgrade",
        help="apply every pending migration (safe to run at any time, and concurrently)",
        description="Bring the schema to this version's revision, in one transaction, keeping every "
        "row. A database made before migrations existed, or a FANTASIA (PIS 3.1.2) database, is "
        "recognised and upgraded in place. " + _WHICH,
    )
    actions.add_parser(
        "current",
        help="print the database's schema revision and this version's",
        description="Print the revision the database is at and the one this version expects. " + _WHICH,
    )
    actions.add_parser(
        "stop",
        help="stop the embedded server now, unless a running command or Dagster process uses it",
        description="Stop the embedded server under $FANTASIA_HOME/pg. Every command starts it when "
        "it needs it and stops it when it exits as its last user; a command killed (kill -9) "
        "leaves it running until the next command, or until this one. Refused, with the process "
        "ids, while a live process (a lookup, the Dagster webserver or daemon) still uses it "
        "(exit 1). An external database (FANTASIA_DATABASE_URL) is not ours to stop (exit 2).",
    )
    actions.add_parser(
        "check",
        help="compare the database's tables with the models; exit 1 when they differ",
        description="Compare every column, type, default, NOT NULL, constraint and index of the "
        "shared tables with the models (which are PIS 3.1.2's), and the revision with this "
        "version's. Prints each difference; exits 1 when there is one. " + _WHICH,
    )


def run_db(args, progress) -> int:
    if args.db_command == "stop":
        return _stop()
    from .db import get_engine, migrate, redacted

    engine = get_engine()
    print(f"reference database: {redacted(engine.url)}")
    head = migrate.head_revision()
    if args.db_command == "upgrade":
        before, after = migrate.upgrade(engine)
        if before == after:
            print(f"schema already at revision {after} (current)")
        else:
            print(f"schema upgraded: {before or 'unversioned'} -> {after}")
        return 0
    if args.db_command == "current":
        current = migrate.revision(engine)
        if current == head:
            state = "current"
        elif not migrate.known(current):
            state = f"newer than this version's {head}, which cannot use it: upgrade fantasia-assets"
        elif current is None:
            state = f"never migrated; this version expects {head}: run `fantasia-assets db upgrade`"
        else:
            state = f"this version expects {head}: run `fantasia-assets db upgrade`"
        print(f"revision: {current or 'none'} ({state})")
        return 0
    problems = migrate.check(engine)
    if not problems:
        print(f"schema matches the models (revision {head})")
        return 0
    print(f"schema differs from the models ({len(problems)}):")
    for problem in problems:
        print(f"  {problem}")
    return 1


def _stop() -> int:
    import os

    import psutil

    from .db.embedded import orphaned_postmasters, stop_embedded
    from .errors import FantasiaError
    from .paths import fantasia_home

    if os.environ.get("FANTASIA_DATABASE_URL"):
        raise FantasiaError(
            "FANTASIA_DATABASE_URL names an external database: `db stop` stops only the embedded "
            "server (unset the variable to stop the one under $FANTASIA_HOME/pg)"
        )
    pgdata = fantasia_home() / "pg"
    state, users = stop_embedded(pgdata)
    if state == "not running":
        orphans = orphaned_postmasters(pgdata)
        if orphans:
            pids = " ".join(str(process.pid) for process in orphans)
            raise FantasiaError(
                f"a server (process {pids}) still serves {pgdata}, but its postmaster.pid was "
                f"removed, so it cannot be stopped as usual: stop it with `kill -INT {pids}` (a "
                "fast shutdown: the database stays consistent)"
            )
        print(f"the embedded server under {pgdata} is not running")
        return 0
    if state == "stopped":
        print(f"stopped the embedded server under {pgdata}")
        return 0
    if state == "failed":
        raise FantasiaError(
            f"the embedded server under {pgdata} did not stop; its log is in {pgdata / 'log'}"
        )
    names = []
    for pid in users:
        try:
            names.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline()[:3])[:80]})")
        except psutil.Error:
            names.append(str(pid))
    print(f"left running: the embedded server under {pgdata} is in use by process {', '.join(names)}")
    return 1
