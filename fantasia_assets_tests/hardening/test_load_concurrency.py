"""Two `load-references` at once: they take turns on the load lock, never interleave.

Every load runs as a real `fantasia-assets load-references` subprocess against a fresh database
of the session's embedded server, with the bundled sample. The expected state is that of the
same files loaded one after the other in-process into another fresh database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from fantasia_assets.db import schema_ready
from fantasia_assets.db.engine import normalise_url
from fantasia_assets.db.loader import LOAD_LOCK, load_references
from fantasia_assets.sample import SAMPLE_DIR, SAMPLE_MODELS

FILES = {
    "fasta": SAMPLE_DIR / "references.fasta.gz",
    "gaf": [SAMPLE_DIR / "references.gaf.gz"],
    "obo": SAMPLE_DIR / "go-basic.obo.gz",
}
H5 = dict(SAMPLE_MODELS)  # model → file name
TABLES = (
    "go_terms", "sequence", "protein", "accession", "protein_go_term_annotation",
    "sequence_embedding_type", "sequence_embeddings",
)  # fmt: skip
WAITING = "another load-references is writing to this database"
TIMEOUT = 180  # seconds for one subprocess load (a few seconds on an idle machine)


def _counts(engine) -> dict:
    """Rows per table, embeddings per (model, layer), and duplicated natural keys (must be 0)."""
    with engine.connect() as conn:
        counts = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in TABLES}
        counts["embeddings"] = {
            (model, layer): n
            for model, layer, n in conn.execute(
                sa.text(
                    "SELECT t.name, e.layer_index, count(*) FROM sequence_embeddings e "
                    "JOIN sequence_embedding_type t ON t.id = e.embedding_type_id GROUP BY 1, 2"
                )
            )
        }
        counts["duplicates"] = conn.execute(
            sa.text(
                """
                SELECT (SELECT count(*) FROM (SELECT sequence_hash FROM sequence
                                              GROUP BY 1 HAVING count(*) > 1) d)
                     + (SELECT count(*) FROM (SELECT protein_id, go_id FROM protein_go_term_annotation
                                              GROUP BY 1, 2 HAVING count(*) > 1) d)
                     + (SELECT count(*) FROM (SELECT sequence_id, embedding_type_id, layer_index
                                              FROM sequence_embeddings GROUP BY 1, 2, 3
                                              HAVING count(*) > 1) d)
                """
            )
        ).scalar()
    return counts


def _writers(engine, table: str, where: str = "true") -> int:
    """How many transactions wrote the current rows of `table` (xmin of each row)."""
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(DISTINCT xmin::text) FROM {table} WHERE {where}")).scalar()


@pytest.fixture(scope="module")
def serial_counts(pg_server):
    """Counts after loading NEAR alone, then after loading AntiBERTy too, one after the other."""
    base = normalise_url(pg_server.get_uri())
    name = f"t_serial_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(base.set(database=name))
    try:
        schema_ready(engine)
        out = {}
        for model in ("NEAR", "AntiBERTy"):
            load_references(engine, **FILES, embeddings=SAMPLE_DIR / H5[model], model=model)
            out[model] = _counts(engine)
        return {"NEAR": out["NEAR"], "both": out["AntiBERTy"]}
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class _Load:
    """One `fantasia-assets load-references` subprocess, its output in files under tmp_path."""

    def __init__(self, database_url, fantasia_home: Path, tmp_path: Path, model: str, tag: str):
        self.stdout_path = tmp_path / f"{tag}.out"
        self.stderr_path = tmp_path / f"{tag}.err"
        env = {
            **os.environ,
            "FANTASIA_DATABASE_URL": database_url.render_as_string(hide_password=False),
            "FANTASIA_HOME": str(fantasia_home),
        }
        command = [
            sys.executable, "-m", "fantasia_assets.cli", "load-references",
            "--fasta", str(FILES["fasta"]), "--gaf", str(FILES["gaf"][0]), "--obo", str(FILES["obo"]),
            "--embeddings", str(SAMPLE_DIR / H5[model]), "--model", model,
        ]  # fmt: skip
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"load-references did not finish in {TIMEOUT} s:\n{self.stderr}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _wait_for_lock_waiters(engine, loads: list[_Load], count: int) -> None:
    """Until `count` sessions of this database wait on an advisory lock (loads parse first)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for load in loads:
            if load.process.poll() is not None:
                pytest.fail(f"load-references ended early (rc {load.process.returncode}):\n{load.stderr}")
        with engine.connect() as conn:
            waiting = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
            ).scalar()
        if waiting >= count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{count} load(s) never waited on the load lock")
        time.sleep(0.2)


def _hold_load_lock(engine):
    """A connection holding the load lock in an open transaction, and its server pid."""
    holder = engine.connect()
    holder.begin()
    holder.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": LOAD_LOCK})
    return holder, holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()


def _inserted(stdout: str, table: str) -> int:
    """The 'N new' count of a table's line in a load's report."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"{table}:"))
    return int(line.split(":", 1)[1].split(" new")[0].strip().replace(",", ""))


def test_load_while_another_holds_the_lock__it_says_it_waits_and_writes_only_after_release(
    engine, database_url, fantasia_home, tmp_path, serial_counts
):
    empty = _counts(engine)
    holder, holder_pid = _hold_load_lock(engine)
    load = _Load(database_url, fantasia_home, tmp_path, "NEAR", "waiting")
    try:
        _wait_for_lock_waiters(engine, [load], 1)
        time.sleep(2.0)  # a few seconds more: still waiting, still nothing written
        assert load.process.poll() is None, load.stderr
        assert _counts(engine) == empty
        assert all(v == 0 for k, v in empty.items() if k in TABLES)
        message = next((line for line in load.stderr.splitlines() if WAITING in line), None)
        assert message is not None, load.stderr
        assert message.endswith("waiting for it to finish")
        assert f"server process {holder_pid}" in message
    finally:
        holder.rollback()
        holder.close()
    try:
        assert load.finish() == 0, load.stderr
    finally:
        load.kill()
    assert _counts(engine) == serial_counts["NEAR"]
    assert "wait for other load" in load.stdout  # the wait is part of the timings shown


def test_two_loads_of_the_same_files_at_once__both_succeed_one_after_the_other(
    engine, database_url, fantasia_home, tmp_path, serial_counts
):
    # both are let go at the same instant: they queue on a lock the test holds until then
    holder, _ = _hold_load_lock(engine)
    loads = [_Load(database_url, fantasia_home, tmp_path, "NEAR", f"same_{i}") for i in (1, 2)]
    try:
        _wait_for_lock_waiters(engine, loads, 2)
        holder.rollback()
        holder.close()
        codes = [load.finish() for load in loads]
    finally:
        for load in loads:
            load.kill()
    assert codes == [0, 0], [load.stderr for load in loads]
    assert _counts(engine) == serial_counts["NEAR"]
    # one load wrote everything; the other found it all in place and changed nothing
    for table in ("proteins", "annotations", "GO terms"):
        inserted = sorted(_inserted(load.stdout, table) for load in loads)
        assert inserted[0] == 0 and inserted[1] > 0, (table, inserted)
    for table in TABLES:
        assert _writers(engine, table) == 1, table


def test_two_loads_of_different_models_at_once__both_models_land_completely(
    engine, database_url, fantasia_home, tmp_path, serial_counts
):
    holder, _ = _hold_load_lock(engine)
    loads = [
        _Load(database_url, fantasia_home, tmp_path, model, f"model_{model}")
        for model in ("NEAR", "AntiBERTy")
    ]
    try:
        _wait_for_lock_waiters(engine, loads, 2)
        holder.rollback()
        holder.close()
        codes = [load.finish() for load in loads]
    finally:
        for load in loads:
            load.kill()
    assert codes == [0, 0], [load.stderr for load in loads]
    assert _counts(engine) == serial_counts["both"]
    assert {model for model, _ in serial_counts["both"]["embeddings"]} == {"NEAR", "AntiBERTy"}
    # each model's vectors came from one transaction, the two models' from two different ones
    for table in ("sequence", "protein", "protein_go_term_annotation"):
        assert _writers(engine, table) == 1, table
    for model in ("NEAR", "AntiBERTy"):
        where = f"embedding_type_id = (SELECT id FROM sequence_embedding_type WHERE name = '{model}')"
        assert _writers(engine, "sequence_embeddings", where) == 1, model
    assert _writers(engine, "sequence_embeddings") == 2
