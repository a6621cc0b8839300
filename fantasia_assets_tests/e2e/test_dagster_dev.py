"""End to end with real processes: `dagster dev` (webserver + daemon), GraphQL, a browser.

One `dagster dev` serves the module: a backfill of two partitions launched through GraphQL,
then an updated reference set loaded by the CLI must be re-materialised by the daemon alone,
and headless Chromium must render the asset graph.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import duckdb
import h5py
import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from fantasia_assets.db.engine import normalise_url
from fantasia_assets_tests.conftest import PROJECT, SAMPLE

pytestmark = pytest.mark.e2e

BACKFILLED = ["NEAR|layer_0", "AntiBERTy|layer_3"]
PARTITIONED = ["reference_embeddings", "neighbour_hits", "raw_result_shards", "topgo_exports"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dagster:
    """A running `dagster dev` and a tiny GraphQL client for it."""

    def __init__(self, url: str, process: subprocess.Popen, env: dict, experiment: Path, log: Path):
        self.url, self.process, self.env, self.experiment, self.log = url, process, env, experiment, log

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        assert "errors" not in body, body
        return body["data"]

    def wait(self, what: str, predicate, timeout: float, every: float = 2.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"dagster dev exited while waiting for {what}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                value = predicate()
            except (OSError, AssertionError, KeyError, TypeError):
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{self.log.read_text()[-3000:]}"
        )

    def partition_keys(self) -> list[str]:
        data = self.graphql('query { assetNodes(assetKeys: [{path: ["neighbour_hits"]}]) { partitionKeys } }')
        return data["assetNodes"][0]["partitionKeys"]

    def runs(self) -> list[dict]:
        data = self.graphql(
            "query { runsOrError(limit: 100) { ... on Runs { results { runId status tags { key value } } } } }"
        )
        return data["runsOrError"]["results"]


@pytest.fixture(scope="module")
def dagster_dev(pg_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    name = f"e2e_{uuid.uuid4().hex[:10]}"
    base = normalise_url(pg_server.get_uri())
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    config = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    config["experiment_path"] = str(work / "experiment")
    config["embeddings_path"] = str(SAMPLE / "queries.h5")
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        FANTASIA_DATABASE_URL=url,
        FANTASIA_CONFIG=str(work / "config.yaml"),
        PYTHONUNBUFFERED="1",
    )
    cli = [sys.executable, "-m", "fantasia_assets.cli"]
    for model, h5 in (("NEAR", "references_near.h5"), ("AntiBERTy", "references_antiberty.h5")):
        subprocess.run(
            [*cli, "load-references", "--fasta", str(SAMPLE / "references.fasta.gz"),
             "--gaf", str(SAMPLE / "references.gaf.gz"), "--obo", str(SAMPLE / "go-basic.obo.gz"),
             "--embeddings", str(SAMPLE / h5), "--model", model],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
    port = _free_port()
    log = work / "dagster_dev.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT, env=env, stdout=open(log, "wb"),  # noqa: SIM115 -- the server writes it until it is stopped
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = Dagster(f"http://127.0.0.1:{port}", process, env, work / "experiment", log)
    try:
        server.wait("the webserver", lambda: server.graphql("query { version }")["version"], timeout=180)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _lineage_rows(experiment: Path) -> list[tuple]:
    for _ in range(30):
        try:
            with duckdb.connect(str(experiment / "lineage.duckdb"), read_only=True) as conn:
                return conn.execute(
                    "SELECT asset, partition, run_id, reference_version FROM lineage"
                ).fetchall()
        except duckdb.IOException:  # a run is writing
            time.sleep(1)
    raise AssertionError("lineage.duckdb stayed locked")


def test_backfill_then_automation(dagster_dev):
    server = dagster_dev
    # the sensor's first tick registers the (model, layer) partitions
    keys = server.wait(
        "dynamic partitions", lambda: len(server.partition_keys()) == 4 and server.partition_keys(), 120
    )
    assert sorted(keys) == ["AntiBERTy|layer_0", "AntiBERTy|layer_3", "NEAR|layer_0", "NEAR|layer_1"]

    launched = server.graphql(
        """
        mutation($params: LaunchBackfillParams!) {
          launchPartitionBackfill(backfillParams: $params) {
            __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
          }
        }
        """,
        {"params": {"partitionNames": BACKFILLED, "assetSelection": [{"path": [a]} for a in PARTITIONED]}},
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill = launched["backfillId"]

    def status():
        data = server.graphql(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }",
            {"id": backfill},
        )
        value = data["partitionBackfillOrError"]["status"]
        assert value not in ("FAILED", "COMPLETED_FAILED", "CANCELED"), value
        return value in ("COMPLETED", "COMPLETED_SUCCESS") and value

    server.wait("the backfill", status, timeout=420, every=3)
    for key in BACKFILLED:
        model, layer = key.split("|")
        shards = list((server.experiment / "raw_results" / model / layer).glob("*.csv"))
        assert len(shards) == 50
        assert (server.experiment / "topgo" / model / layer / "P.topgo").exists()
    assert not (server.experiment / "raw_results" / "NEAR" / "layer_1").exists()
    rows = _lineage_rows(server.experiment)
    assert {(a, p) for a, p, *_ in rows} >= {(a, k) for a in PARTITIONED for k in BACKFILLED}
    first_versions = {(a, p): v for a, p, _, v in rows}

    # the two other partitions by the command line the README documents
    others = sorted(set(keys) - set(BACKFILLED))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "job", "backfill", "-w", "workspace.yaml",
         "-j", "lookup_partition_job", "--partitions", ",".join(others), "--noprompt"],
        cwd=PROJECT, env=server.env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr

    def cli_backfill_done():
        runs = [r for r in server.runs() if any(t["key"] == "dagster/backfill" for t in r["tags"])]
        mine = {
            t["value"]: r["status"]
            for r in runs
            for t in r["tags"]
            if t["key"] == "dagster/partition" and t["value"] in others
        }
        assert "FAILURE" not in mine.values(), mine
        return sorted(mine) == others and set(mine.values()) == {"SUCCESS"}

    server.wait("the command-line backfill", cli_backfill_done, timeout=420, every=3)
    # every partition is materialised: the eager outputs follow without a request
    server.wait("summary.csv by automation", lambda: (server.experiment / "summary.csv").exists(), 240, 3)
    server.wait(
        "the TopGO ensemble by automation",
        lambda: (server.experiment / "topgo" / "ensemble" / "F.topgo").exists(),
        120,
        3,
    )

    # an updated NEAR reference set, loaded by the CLI: the daemon alone must re-run NEAR|layer_0
    changed = server.experiment.parent / "near_updated.h5"
    shutil.copy(SAMPLE / "references_near.h5", changed)
    with h5py.File(changed, "r+") as handle:
        for name in sorted(handle)[:5]:
            vector = handle[f"{name}/type_1/layer_0/embedding"]
            vector[...] = np.asarray(vector)[::-1].copy()
    before = {r["runId"] for r in server.runs()}
    subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "load-references", "--embeddings", str(changed), "--model", "NEAR"],
        env=server.env, check=True, capture_output=True,
    )  # fmt: skip

    def automated_runs():
        runs = [r for r in server.runs() if r["runId"] not in before]
        tagged = [
            r
            for r in runs
            if {"key": "fantasia/trigger", "value": "reference, query or configuration change"} in r["tags"]
        ]
        for run in tagged:
            assert run["status"] not in ("FAILURE", "CANCELED"), run
        done = [r for r in tagged if r["status"] == "SUCCESS"]
        return len(done) == len(tagged) and tagged and tagged

    runs = server.wait("the automated re-materialisation", automated_runs, timeout=300, every=3)
    partitions = sorted(t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition")
    assert partitions == ["NEAR|layer_0"]
    rows = _lineage_rows(server.experiment)
    new_versions = {(a, p): v for a, p, _, v in rows if (a, p) == ("raw_result_shards", "NEAR|layer_0")}
    assert (
        new_versions[("raw_result_shards", "NEAR|layer_0")]
        != first_versions[("raw_result_shards", "NEAR|layer_0")]
    )


def test_browser_renders_asset_graph(dagster_dev):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "chromium/chromedriver missing: run scripts/ensure_chromium.sh (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=2560,1600",
    ):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={dagster_dev.experiment.parent / 'chromium-profile'}")
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        # the lineage graph around neighbour_hits, six levels both ways: the whole graph, expanded (the
        # window is wide enough for the UI to draw full nodes, whose labels are not truncated)
        browser.get(
            f"{dagster_dev.url}/assets/neighbour_hits?view=lineage&lineageScope=neighbors&lineageDepth=6"
        )
        names = ["reference_set", "query_embeddings", "reference_embeddings", "mmseqs_clusters", "neighbour_hits",
                 "raw_result_shards", "topgo_exports", "lookup_summary", "topgo_ensemble"]  # fmt: skip
        WebDriverWait(browser, 90).until(lambda b: all(n in b.page_source for n in names))
        browser.save_screenshot(str(dagster_dev.experiment.parent / "asset_graph.png"))
    finally:
        browser.quit()
