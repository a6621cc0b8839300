"""Dagster's own storage on the embedded PostgreSQL (dagster-postgres), as README documents it."""

from __future__ import annotations

import uuid

import dagster as dg
import sqlalchemy as sa
import yaml

from fantasia_assets.db.embedded import socket_dir
from fantasia_assets.db.engine import normalise_url
from fantasia_assets.defs import inputs, lookup
from fantasia_assets.defs.partitions import MODEL_LAYER
from fantasia_assets.defs.resources import default_resources
from fantasia_assets_tests.test_definitions import settings  # noqa: F401  (fixture)


def test_dagster_storage_on_embedded_postgres(pg_server, sample_loaded, settings, tmp_path):  # noqa: F811
    name = f"dagster_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(
        normalise_url(pg_server.get_uri()).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    home = tmp_path / "dagster_home"
    home.mkdir()
    storage = {
        "postgres": {"postgres_url": f"postgresql+psycopg2://postgres:@/{name}?host={socket_dir(pg_server)}"}
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            instance.add_dynamic_partitions(MODEL_LAYER.name, ["NEAR|layer_0"])
            result = dg.materialize(
                [inputs.reference_set, inputs.go_ontology, lookup.go_annotation_cache],
                selection=[lookup.go_annotation_cache],
                resources=default_resources(),
                instance=instance,
            )
            assert result.success
            event = instance.get_latest_materialization_event(dg.AssetKey("go_annotation_cache"))
            assert event.asset_materialization.metadata["annotations"].value > 0
            assert instance.get_dynamic_partitions(MODEL_LAYER.name) == ["NEAR|layer_0"]
        engine = sa.create_engine(normalise_url(pg_server.get_uri()).set(database=name))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM event_logs")).scalar() > 0
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
