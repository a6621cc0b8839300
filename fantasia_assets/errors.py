"""The one base of every error the platform reports to a user as a clear line, not a traceback.

`cli.main` and the Dagster sensor catch `FantasiaError` in one place each. A subclass keeps its
builtin base too (ValueError, OSError, ...) so code that catches those still does. Errors of the
database drivers are translated into `DatabaseError` at the `db/` boundary.
"""

from __future__ import annotations


class FantasiaError(Exception):
    """An input, configuration, state or environment problem the user can act on.

    `exit_code` is what the CLI exits with: 2 for every user-facing error today.
    """

    exit_code = 2
