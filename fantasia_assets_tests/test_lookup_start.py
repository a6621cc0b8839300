"""When the lookup reads the annotation table: at once beside the query scan, or, for a query file
big enough that its search hides the read and a table that would pass through the interpreter
(a client COPY), once the search's products start (or the run has searched or failed: the run
sets the event in any case)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from fantasia_assets import lookup_start
from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.lookup_start import DEFER_ANNOTATIONS_BYTES, read_annotations

SCOPE = ReferenceScope(0, None)


def _started(
    tmp_path, size: int | None, searching: threading.Event | None, through_client: bool = True
) -> tuple[Future, threading.Event]:
    """The table's read started for a query file of `size` bytes (None: no file), read through a
    client COPY or not; the event is set when `get` runs, and it returns the scope it was given."""
    path = tmp_path / "queries.h5"
    if size is not None:
        with open(path, "wb") as handle:
            handle.truncate(size)
    called = threading.Event()

    def get(scope):
        called.set()
        return scope

    executor = ThreadPoolExecutor(1)
    config = SimpleNamespace(embeddings_path=path)
    pending = read_annotations(executor, get, SCOPE, searching, config, lambda: through_client)
    executor.shutdown(wait=False)
    return pending, called


@pytest.mark.parametrize(
    "size, with_event",
    [(DEFER_ANNOTATIONS_BYTES - 1, True), (DEFER_ANNOTATIONS_BYTES, False), (None, True)],
)
def test_read_at_once_for_a_small_file_a_per_aspect_search_or_no_file(tmp_path, size, with_event):
    searching = threading.Event() if with_event else None  # never set
    pending, _ = _started(tmp_path, size, searching)
    assert pending.result(timeout=10) == SCOPE


def test_a_big_file_reads_a_table_the_server_writes_at_once(tmp_path):
    searching = threading.Event()  # never set
    pending, _ = _started(tmp_path, DEFER_ANNOTATIONS_BYTES, searching, through_client=False)
    assert pending.result(timeout=10) == SCOPE


def test_a_big_file_reads_the_table_once_the_products_start(tmp_path):
    searching = threading.Event()
    pending, called = _started(tmp_path, DEFER_ANNOTATIONS_BYTES, searching)
    assert not called.wait(0.2) and not pending.done()
    searching.set()
    assert pending.result(timeout=10) == SCOPE


def test_a_deferred_table_is_read_once_the_engine_is_built_with_the_same_outputs(
    sample_loaded, tmp_path, monkeypatch
):
    """The whole lookup with every query file deferred (as a client COPY's table): the table's read
    and the stamp's sequence files start after the engine is built, the run ends (nothing waits
    for ever), and its outputs equal an undeferred run's."""
    from fantasia_assets.config import parse_config
    from fantasia_assets.core import stages
    from fantasia_assets.db import snapshot, stores
    from fantasia_assets.runner import run_lookup
    from fantasia_assets_tests.hardening.helpers import config_dict, near_only, tree

    run_lookup(parse_config(config_dict(tmp_path / "at-once", **near_only())), sample_loaded)
    events: list[str] = []
    real_engine_for, real_get = stages.engine_for, stores.AnnotationStore.get

    def engine_for(*args, **kwargs):
        engine = real_engine_for(*args, **kwargs)
        build = engine.build
        engine.build = lambda vectors, kept=None: (build(vectors, kept), events.append("built"))[0]
        return engine

    def get(self, scope=None):
        events.append("annotations")
        return real_get(self, scope)

    real_prepare = snapshot.LiveReads.prepare_finish

    def prepare(self, executor):
        events.append("sequence files")
        real_prepare(self, executor)

    monkeypatch.setattr(lookup_start, "DEFER_ANNOTATIONS_BYTES", 0)
    monkeypatch.setattr(snapshot.LiveReads, "copies_through_client", lambda self: True)
    monkeypatch.setattr(stages, "engine_for", engine_for)
    monkeypatch.setattr(snapshot.LiveReads, "prepare_finish", prepare)
    monkeypatch.setattr(stores.AnnotationStore, "get", get)
    run_lookup(parse_config(config_dict(tmp_path / "deferred", **near_only())), sample_loaded)
    # two partitions (layers 0 and 1): the table once the first builds, the files once the last does
    assert events[:2] == ["built", "annotations"] and events.count("built") == 2
    assert events.index("sequence files") > len(events) - 1 - events[::-1].index("built")
    assert tree(tmp_path / "deferred") == tree(tmp_path / "at-once")


def test_a_run_that_fails_before_its_search_leaves_no_read_waiting(sample_loaded, tmp_path, monkeypatch):
    from fantasia_assets.config import parse_config
    from fantasia_assets.db import snapshot
    from fantasia_assets.runner import run_lookup
    from fantasia_assets_tests.hardening.helpers import config_dict, near_only

    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an HDF5 file")
    monkeypatch.setattr(lookup_start, "DEFER_ANNOTATIONS_BYTES", 0)
    monkeypatch.setattr(snapshot.LiveReads, "copies_through_client", lambda self: True)
    config = parse_config(config_dict(tmp_path / "out", broken, **near_only()))
    outcome: list[BaseException] = []

    def run():
        try:
            run_lookup(config, sample_loaded)
        except Exception as error:
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the run hung on the deferred read"
    assert outcome and "broken.h5" in str(outcome[0])


_AHEAD = """
import sys
from types import SimpleNamespace
from fantasia_assets import lookup_start
from fantasia_assets.core import device, timing
device.torch_has_gpu_libraries = lambda: {card}
timing.TIMELINE = []
config = SimpleNamespace(backend=sys.argv[1], use_gpu={use_gpu})
before = "torch" in sys.modules
thread = lookup_start.torch_ahead(config, searched_here=sys.argv[2] == "here")
if thread is not None:
    thread.join()
ahead = [span for span in timing.TIMELINE if span[:2] == (timing.PART + "torch import, CUDA asked (ahead)", "torch-ahead")]
print(before, thread is not None, "torch" in sys.modules and hasattr(sys.modules["torch"], "matmul"), len(ahead))
"""


@pytest.mark.parametrize(
    ("backend", "use_gpu", "card", "where", "started"),
    [
        ("torch", True, True, "here", True),  # a search on the card: torch and CUDA ahead
        ("torch", True, False, "here", False),  # a CPU build of torch: no card to ask for
        ("torch", False, True, "here", False),  # the card not wanted
        ("numpy", True, True, "here", False),  # another backend: never
        ("torch", True, True, "cluster", False),  # the workers import it
    ],
)
def test_torch_ahead__imported_in_a_thread_only_for_a_search_on_a_card(
    backend, use_gpu, card, where, started
):
    """In a fresh interpreter (this one has torch already): the module alone does not import
    torch, and `torch_ahead` imports it, whole, exactly when the search will run on a card (here
    the check for a GPU runtime in the torch build is answered by the test); a cold run's
    timeline (`bench/lookup.py --timeline`) shows that import, in its thread."""
    import subprocess
    import sys

    script = _AHEAD.format(card=card, use_gpu=use_gpu)
    done = subprocess.run(
        [sys.executable, "-c", script, backend, where],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["False", str(started), str(started), str(int(started))]
