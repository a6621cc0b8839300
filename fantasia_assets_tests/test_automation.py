"""The sensor's decisions (`evaluate_changes`) over sequences of ticks: every real change of the
references, the query file or the configuration re-runs what it affects, once, even when a state
comes back; a dropped partition or a setting of the run-wide outputs alone rebuilds only the
outputs, a setting of speed alone nothing; and the instance's configuration frees the pool slot
of a killed run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
import yaml

from fantasia_assets.config import LookupConfig, ModelConfig, RedundancyConfig
from fantasia_assets.core.scoring import ScoringSettings
from fantasia_assets.defs.automation import evaluate_changes, outputs_job, partition_job
from fantasia_assets_tests.conftest import PROJECT


def _config(**changes) -> LookupConfig:
    base = LookupConfig(Path("experiment"), Path("queries.h5"), (ModelConfig("NEAR"),))
    return dataclasses.replace(base, **changes)


@dataclass
class _Queries:
    content_hash: str = "q1"


@dataclass
class _State:
    """What `evaluate_changes` reads of a `LookupState`."""

    partitions: dict[str, str] = field(default_factory=lambda: {"NEAR|layer_0": "v1", "NEAR|layer_1": "w1"})
    config: LookupConfig = field(default_factory=_config)
    queries: _Queries = field(default_factory=_Queries)

    def versions(self) -> dict[str, str]:
        return dict(self.partitions)


def _ticks(states: list[_State]) -> list[dg.SensorResult]:
    """Each state evaluated after the previous one's cursor, as the daemon's ticks are."""
    cursor, results = None, []
    for state in states:
        result = evaluate_changes(state, cursor, set(states[0].partitions))
        cursor = result.cursor
        results.append(result)
    return results


def _partition_runs(result: dg.SensorResult) -> list[tuple[str, str]]:
    return [(r.partition_key, r.run_key) for r in result.run_requests if r.job_name == partition_job.name]


def test_references_that_come_back_to_an_earlier_fingerprint__re_run_with_a_new_run_key():
    deleted = {"NEAR|layer_0": "v2", "NEAR|layer_1": "w1"}  # annotations deleted
    restored = {"NEAR|layer_0": "v3", "NEAR|layer_1": "w1"}  # loaded again: new row versions
    first, delete, restore, delete_again = _ticks(
        [_State(), _State(partitions=deleted), _State(partitions=restored), _State(partitions=deleted)]
    )
    assert not first.run_requests
    runs = [_partition_runs(result) for result in (delete, restore, delete_again)]
    assert [[key for key, _ in run] for run in runs] == [["NEAR|layer_0"]] * 3
    keys = [run[0][1] for run in runs]
    assert len(set(keys)) == 3  # the same fingerprint as the first deletion, still a new run key


def test_configuration_changed__every_partition_re_runs():
    _, quiet, changed = _ticks([_State(), _State(), _State(config=_config(limit_per_entry=3))])
    assert not quiet.run_requests and "no reference, query or configuration change" in quiet.skip_reason
    assert sorted(key for key, _ in _partition_runs(changed)) == ["NEAR|layer_0", "NEAR|layer_1"]


def test_query_file_switched_back_and_forth__each_switch_re_runs():
    results = _ticks([_State(), *[_State(queries=_Queries(q)) for q in ("q2", "q1", "q2", "q1")]])
    keys = [run_key for result in results[1:] for _, run_key in _partition_runs(result)]
    assert len(keys) == 8 and len(set(keys)) == 8


def test_cursor_of_an_earlier_version_without_the_configuration__recorded_not_a_change():
    first = evaluate_changes(_State(), None, {"NEAR|layer_0", "NEAR|layer_1"})
    old = yaml.safe_load(first.cursor)  # JSON is YAML
    for key in ("search_config", "outputs_config", "generation"):
        old.pop(key)
    result = evaluate_changes(_State(), json.dumps(old), {"NEAR|layer_0", "NEAR|layer_1"})
    assert not result.run_requests
    assert json.loads(result.cursor)["search_config"] == _config().results_fingerprint(partition=True)


def test_cursor_of_an_earlier_version_with_every_setting_hashed__compared_on_every_setting():
    first = json.loads(evaluate_changes(_State(), None, {"NEAR|layer_0", "NEAR|layer_1"}).cursor)
    for key in ("search_config", "outputs_config"):
        first.pop(key)
    first["config"] = _config().fingerprint()  # what the earlier version kept
    same = evaluate_changes(_State(), json.dumps(first), {"NEAR|layer_0", "NEAR|layer_1"})
    assert not same.run_requests
    changed = evaluate_changes(
        _State(config=_config(limit_per_entry=3)), json.dumps(first), {"NEAR|layer_0", "NEAR|layer_1"}
    )
    assert len(_partition_runs(changed)) == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"backend": "numpy"},
        {"screening": "fp32"},
        {"use_gpu": False},
        {"batch_size": 7},
        {"lookup_cache_max": 0},
        {"alignment_threads": 1},
        {"models": (ModelConfig("NEAR", batch_size=3),)},
        {"redundancy": RedundancyConfig(identity=0.0, coverage=0.5, threads=1)},  # masking off
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_setting_of_speed_alone_changed__nothing_re_runs(changes):
    _, changed = _ticks([_State(), _State(config=_config(**changes))])
    assert not changed.run_requests


def test_setting_of_the_run_wide_outputs_changed__only_the_outputs_are_rebuilt():
    scored = _config(scoring=ScoringSettings(ontology=Path("go-basic.obo")))
    _, changed, again, search = _ticks(
        [
            _State(),
            _State(config=scored),
            _State(config=scored),
            _State(config=dataclasses.replace(scored, precision=2)),
        ]
    )
    assert [r.job_name for r in changed.run_requests] == [outputs_job.name]
    assert "settings of the run-wide outputs changed" in changed.run_requests[0].tags["fantasia/trigger"]
    assert not again.run_requests
    assert len(_partition_runs(search)) == 2  # precision is written in the raw rows


def test_partition_dropped_without_any_other_change__the_outputs_are_rebuilt_once():
    state = _State()
    first = evaluate_changes(state, None, set(state.partitions))
    dropped = _State(partitions={"NEAR|layer_0": "v1"})
    result = evaluate_changes(dropped, first.cursor, set(state.partitions))
    assert [r.job_name for r in result.run_requests] == [outputs_job.name]
    assert result.dynamic_partitions_requests[0].partition_keys == ["NEAR|layer_1"]
    again = evaluate_changes(dropped, result.cursor, {"NEAR|layer_0"})
    assert not again.run_requests


def test_instance_configuration_of_the_project__frees_a_killed_runs_pool_slot():
    config = yaml.safe_load((PROJECT / "dagster.yaml").read_text())
    with dg.instance_for_test(overrides=config) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30


def test_cursor_cleared_then_the_same_change_again__a_new_run_key_never_skipped_as_run():
    scored = _config(scoring=ScoringSettings(ontology=Path("go-basic.obo")))
    _, first = _ticks([_State(), _State(config=scored)])
    # the cursor cleared in the UI: the next tick records, and the same change comes again
    _, again = _ticks([_State(), _State(config=scored)])
    keys = [r.run_key for r in (*first.run_requests, *again.run_requests)]
    assert len(keys) == 2 and keys[0] != keys[1]


def test_daily_backstop_with_an_unreadable_configuration__skips_naming_the_problem(tmp_path, monkeypatch):
    from fantasia_assets.defs.automation import daily_backstop
    from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase

    broken = tmp_path / "config.yaml"
    broken.write_text("experiment_path: [oops\n")
    monkeypatch.setenv("FANTASIA_CONFIG", str(broken))
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance,
            resources={"settings": LookupSettings(config_path=str(broken)), "database": ReferenceDatabase()},
        )
        result = daily_backstop.evaluate_tick(context)
    assert not result.run_requests
    assert "inputs not readable now" in result.skip_message and str(broken) in result.skip_message


def test_scorer_trained_again_at_the_same_path__only_the_outputs_are_rebuilt(tmp_path):
    import os

    model = tmp_path / "model.pkl"  # missing at first: the run of that change failed
    scored = _config(scoring=ScoringSettings(ontology=Path("go-basic.obo"), model=model))
    _, set_, quiet = _ticks([_State(), _State(config=scored), _State(config=scored)])
    assert [r.job_name for r in set_.run_requests] == [outputs_job.name] and not quiet.run_requests
    cursor = quiet.cursor
    for content in (b"trained", b"trained again"):  # written where it was missing, then replaced
        model.write_bytes(content)
        os.utime(model, ns=(len(content), len(content)))
        result = evaluate_changes(_State(config=scored), cursor, {"NEAR|layer_0", "NEAR|layer_1"})
        assert [r.job_name for r in result.run_requests] == [outputs_job.name], content
        cursor = result.cursor


def test_outputs_last_made_with_other_settings__the_outputs_backstop_rebuilds_them(tmp_path):
    from fantasia_assets.defs.automation import daily_outputs_backstop, stale_outputs
    from fantasia_assets.defs.outputs import lookup_summary
    from fantasia_assets.defs.partitions import outputs_fingerprint
    from fantasia_assets.defs.science import predictions

    now = outputs_fingerprint(_config())
    with dg.instance_for_test() as instance:
        assert stale_outputs(instance, now) == []  # never made: their eager condition makes them
        for asset, version in ((lookup_summary, now), (predictions, "made-before")):  # its run failed since
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset.key, metadata={"outputs_config_version": version})
            )
        assert stale_outputs(instance, now) == ["predictions"]
        assert daily_outputs_backstop.job_name == outputs_job.name
        instance.report_runless_asset_event(
            dg.AssetMaterialization(predictions.key, metadata={"outputs_config_version": now})
        )
        assert stale_outputs(instance, now) == []
