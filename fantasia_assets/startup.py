"""The cyclic garbage collector of a command run as a program: paused while it imports, skipped at exit.

A small lookup spends a fifth of its wall time importing numpy, polars, DuckDB, pydantic and this
package, and stopping. Two costs there are the collector's, not the work's:

* While modules are imported, the collector runs every 700 new objects and walks a heap that
  keeps growing (≈ 300,000 objects for a lookup): ≈ 0.1 s, more on a loaded machine. Imports make
  next to no garbage, so `pause_for_imports` stops the collector, and `imports_done` freezes what
  was created (`gc.freeze`: out of the collector's sight for good; it is the modules' content,
  alive until the exit) and starts it again for the command's own work.
* At the exit, Python's finalisation collects that heap once more, to free memory the process is
  about to hand back: ≈ 0.1–0.2 s. `skip_teardown_collection` freezes the heap at the exit
  instead; the rest of the exit runs as usual (atexit handlers, threads joined, standard streams
  flushed). Nothing is left unwritten: the commands write, close and sync every output before
  they return, and nothing they write relies on a finaliser.

Only for a process's own command (`cli.main()` without arguments): a caller that runs commands in
its own process (the tests) keeps its collector as it was.
"""

from __future__ import annotations

import atexit
import gc

_paused = []  # [True] while `pause_for_imports` holds the collector


def pause_for_imports() -> None:
    """Stop the collector until `imports_done` (when it runs now)."""
    if gc.isenabled() and not _paused:
        gc.disable()
        _paused.append(True)


def imports_done() -> None:
    """Freeze what the imports created and start the collector again; nothing when not paused."""
    if _paused:
        _paused.clear()
        gc.freeze()
        gc.enable()


def skip_teardown_collection() -> None:
    """Leave the heap alive at the process's exit to the operating system (see the module's note)."""
    atexit.register(gc.freeze)
