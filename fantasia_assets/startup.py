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

`quiet_blas_workers` tells OpenBLAS (numpy's matrix products, the search's) to put its worker
threads to sleep right after each product: by default they spin for about 2^28 cycles (≈ 0.1 s)
waiting for the next one, a core taken from the run's other threads (the shard files made
ahead, the annotation read, polars) on a two-core machine: ≈ 0.1 s of CPU a small lookup. The
results are the same; a later product wakes them (tens of microseconds). Set before numpy is
imported, and only where the environment does not set it already.

`pydantic_plugins_skipped` spares the configuration's import pydantic's search for plugins: each
model class asks for them once per process, and the first ask reads the entry points of every
installed distribution (≈ 30 ms in this project's environment, which has no pydantic plugin). The
configuration's models are a lookup's only pydantic models, internal to it, and no plugin
(observability hooks on validation) changes what they parse.

`import_in_background` imports what a command needs only later (for a lookup: DuckDB's engine
for the lineage record at its end, `core.lineage.engine`, and its in-memory instance,
`core.lineage.warm_up`; numpy.ma, which numpy imports at the first `np.unique`; the output
writers) in a thread, while the command's main thread waits on files, subprocesses and BLAS,
which release the interpreter: ≈ 0.1 s off a small lookup's wall time. The later import finds
the module loaded, or waits for its loading to end.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import threading
from collections.abc import Callable, Iterator

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


def import_in_background(*names: str, then: Callable[[], object] | None = None) -> None:
    """Import `names` in a thread, then call `then` there; an import or call that fails there is
    left to the later import or use, which raises its error where it is needed.

    Not a daemon thread: the process's exit waits for it (a fraction of a second, and only when
    the command ends first, on an early error or Ctrl-C). A daemon thread still inside DuckDB's
    C++ start-up when the interpreter exits is unwound by force, which that code does not allow:
    the process aborted ("terminate called after throwing an instance of ''", exit 134) after the
    error had been printed."""

    def load() -> None:
        for name in names:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if then is not None:
            with contextlib.suppress(Exception):
                then()

    threading.Thread(target=load, name="imports").start()


@contextlib.contextmanager
def pydantic_plugins_skipped() -> Iterator[None]:
    """Pydantic classes made inside the block use no plugin (`PYDANTIC_DISABLE_PLUGINS`), unless
    the environment sets that variable itself; it is unset again after the block."""
    if "PYDANTIC_DISABLE_PLUGINS" in os.environ:
        yield
        return
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    try:
        yield
    finally:
        os.environ.pop("PYDANTIC_DISABLE_PLUGINS", None)


def quiet_blas_workers() -> None:
    """OpenBLAS's workers sleep at once after a product (the least timeout, 2^4 cycles), unless
    the environment sets `OPENBLAS_THREAD_TIMEOUT` itself; before numpy is imported."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
