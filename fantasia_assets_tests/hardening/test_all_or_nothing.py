"""A lookup that fails part-way leaves the previous complete output set, byte for byte."""

from __future__ import annotations

import pytest

from fantasia_assets.config import parse_config
from fantasia_assets.core import exports, writers
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.hardening.helpers import config_dict, hidden, near_only, tree


def _fail_after(monkeypatch, module, name: str, calls_before_failure: int) -> None:
    """Let `module.name` run `calls_before_failure` times, then raise on the next call."""
    real = getattr(module, name)
    seen = {"calls": 0}

    def failing(*args, **kwargs):
        if seen["calls"] == calls_before_failure:
            raise RuntimeError(f"injected fault in {name}")
        seen["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize(
    ("module", "name", "calls"),
    [
        (exports, "write_raw_shards", 1),  # second partition: its Parquet written, its shards not
        (writers, "write_ensemble", 0),  # run-wide: summary written, ensemble not
        (exports, "write_parquet_atomic", 2),  # first partition: one Parquet file of three written
    ],
)
def test_fault_between_two_writes__leaves_the_previous_run_in_place(
    sample_loaded, tmp_path, monkeypatch, module, name, calls
):
    experiment = tmp_path / "experiment"
    # the previous run differs in every output file
    run_lookup(
        parse_config(config_dict(experiment, **{"lookup.limit_per_entry": 3}, **near_only())), sample_loaded
    )
    before = tree(experiment)
    _fail_after(monkeypatch, module, name, calls)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_lookup(parse_config(config_dict(experiment, **near_only())), sample_loaded)
    assert tree(experiment) == before  # hidden files included: no staging folder is left
    assert hidden(experiment) == []
