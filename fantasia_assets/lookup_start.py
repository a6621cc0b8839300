"""What a lookup settles before its search: the partitions that have references, the first
partition's reference matrix read ahead while the query file is scanned, and when the annotation
table is read (`read_annotations`: at once, or beside the search's products).

The scan of a big query file (20,000 accession groups: ≈ 1 s) holds the interpreter, while a
cold reference matrix (124,000 × 1,024 from the database: ≈ 0.55 s alone) is mostly a wait on
PostgreSQL's COPY with the interpreter released. Each of the stream's socket reads takes the
interpreter back, and beside a thread that runs Python it waits for it (measured: the stream
alone 0.55 s, beside a busy Python loop 2.5 s); side by side, the scan and the stream still end
sooner than one after the other (a cold 20,000 × 124,000 lookup, 3 alternated rounds:
8.6-9.8 s against 9.0-10.4 s). Which partitions a run has is only known after the scan (the layers in the query file),
but the configuration names the first one's model and layer: `first_scope` guesses the scope of
the plan's first partition from the configuration and the database alone, and
`ReferenceStore.prefetch` fetches it. The search's `get` takes the matrix from there when the
guess was right; when it was not (the query file lacks that model or layer), that matrix was
fetched for nothing and stays in the cache, and the search fetches its own as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future
from threading import Event, Thread

from .config import LookupConfig
from .core.plan import ModelSpec, Partition
from .core.references import ReferenceScope, ReferenceSetError
from .core.timing import part
from .db.snapshot import Reads

log = logging.getLogger(__name__)

# A query file this big (4,096 vectors of 1,024 float32) is searched for seconds, even against few
# references: long enough to hide the annotation table's read through a client (`read_annotations`).
DEFER_ANNOTATIONS_BYTES = 16 << 20


def first_scope(config: LookupConfig, models: list[ModelSpec], reads: Reads) -> ReferenceScope | None:
    """The scope of the first partition `plan_partitions` gives when the query file holds the first
    requested layer of the first enabled model known to the database that has reference rows for
    one; None when the layers come from the query file (`layer_index` unset) or nothing matches.
    Reads only the database: nothing is logged or raised here that the plan would say itself."""
    types = reads.model_types()
    for model in models:
        if model.name not in types:
            continue
        if model.layer_index is None:
            return None
        type_id = types[model.name]
        loaded = reads.layers_with_rows([(type_id, layer) for layer in model.layer_index])
        for layer in model.layer_index:
            if (type_id, layer) in loaded:
                include, exclude = config.taxonomy.resolve()
                return ReferenceScope(type_id, layer, include, exclude, config.limit_execution)
    return None


def with_references(partitions: list[Partition], reads: Reads) -> list[Partition]:
    """The partitions whose (model, layer) has reference embeddings; the others skipped, with a warning."""
    loaded = reads.layers_with_rows([(p.type_id, p.layer) for p in partitions])
    for p in partitions:
        if (p.type_id, p.layer) not in loaded:
            log.warning(
                "%s: no reference embeddings are loaded for model %s (type_%d), layer %s; skipped",
                p.key, p.model.name, p.type_id, "legacy" if p.layer is None else p.layer,
            )  # fmt: skip
    return [p for p in partitions if (p.type_id, p.layer) in loaded]


def require_references(reads: Reads) -> dict[str, int]:
    """Model name → type id of the reference database; `ReferenceSetError` when nothing was loaded."""
    types = reads.model_types()
    if not types:  # the tables exist (migrated on first use), but nothing was loaded
        from .db.reads import NEVER_LOADED

        raise ReferenceSetError(NEVER_LOADED)
    return types


def read_annotations(
    executor: Executor,
    get: Callable,
    scope: ReferenceScope,
    searching: Event | None,
    config: LookupConfig,
    through_client: Callable[[], bool],
) -> Future:
    """`get(scope)` (the annotation table) on `executor`: at once, or, when the query file holds at
    least `DEFER_ANNOTATIONS_BYTES` and the table would come through a client COPY
    (`through_client()`, asked on the executor's thread), once `searching` is set: the run sets
    it when the search's products start (its engine built), and in any case once the search is
    over or the run failed.

    The table is needed after the search only (but for a per-aspect search: `searching` None).
    A client COPY passes every row through this process's interpreter (≈ 1.2 CPU-s of 2.4 at
    124,000 references): beside the scan and the matrix it delays the matrix the search waits
    for, on two cores; beside the engine's build it tripled the build (1.1 s alone, 3-3.7 s
    beside it: the build's many short steps wait on the interpreter the COPY loop holds). Beside
    the products, whose calls hold no interpreter for tenths of a second each, it costs them its
    CPU alone. When the server writes the table as a file (`db.copy_file`, the embedded
    server), the read holds the interpreter for moments only, and it is read at once: while the
    matrix streams, this process leaves a core partly idle, which the server's COPY and polars'
    parse fill (scale lookups, 20,000 × 124,000, alternated: median 10.66 s deferred, 9.97 s at
    once; the search stage 4.3-5.3 s → 3.7-3.8 s). A small query file's search would not hide
    the read either: its table is read at once, beside the matrix.
    """
    try:
        big = searching is not None and config.embeddings_path.stat().st_size >= DEFER_ANNOTATIONS_BYTES
    except OSError:  # the scan reports a missing or unreadable query file
        big = False

    def read():
        if big and through_client():
            searching.wait()
        return get(scope)

    return executor.submit(read)


def torch_ahead(config: LookupConfig, searched_here: bool = True) -> Thread | None:
    """Import torch and ask it for the card in a thread when this lookup will search on a card
    (`lookup.use_gpu`, the torch backend, a torch build with a GPU runtime: `core.device`), so
    that the import and CUDA's start run beside the server's start, the query scan and the
    database's reads, not after them, where `runner.device_for` asked for them in the main
    thread. The thread, or None when nothing is started: another backend, a search on a Dask
    cluster (`searched_here` False: the workers import it), torch imported already, no card
    wanted or possible. An import that fails is left to the search, which raises it where it is
    needed. Not a daemon: the exit of a run that fails first waits for the import
    (`startup.import_in_background`).

    Not on the CPU: there the import holds the interpreter for most of its second, and beside
    the scan it only moved time from the search to the scan (a cold 20,001 × 124,001 × 1,024 CLI
    lookup on two cores, alternated, 3 rounds: 16.62 s without, 16.85 s with it)."""
    if not searched_here or config.backend != "torch" or not config.use_gpu or "torch" in sys.modules:
        return None
    from .core.device import torch_has_gpu_libraries

    if not torch_has_gpu_libraries():
        return None

    def load() -> None:
        with contextlib.suppress(Exception), part("torch import, CUDA asked (ahead)"):
            import torch

            torch.cuda.is_available()

    thread = Thread(target=load, name="torch-ahead")
    thread.start()
    return thread
