"""Block plans of the Dask search (pure): sized to the smallest worker, whole batches, clear refusals."""

from __future__ import annotations

import re

import pytest

from fantasia_assets.core.distributed import (
    ClusterError,
    WorkerFacts,
    code_version,
    minimum_memory_limit,
    plan_blocks,
    slice_exclusions,
)

GIB = 2**30


def _workers(*limits: int, threads: int = 1) -> list[WorkerFacts]:
    return [WorkerFacts(f"tcp://w{i}:1", code_version(), limit, threads) for i, limit in enumerate(limits)]


def test_roomy_workers_get_balanced_blocks_of_whole_batches():
    plan = plan_blocks(20_000, 516, 1024, 124_000, _workers(8 * GIB, 8 * GIB), "M|layer_0")
    assert plan.block_queries % 516 == 0
    # four blocks per worker thread, rounded up to whole batches
    assert plan.block_queries == 2580 and plan.n_blocks == 8


def test_block_is_resized_to_the_smallest_worker():
    tight = minimum_memory_limit(124_000, 1024, 2 * 516)
    plan = plan_blocks(20_000, 516, 1024, 124_000, _workers(8 * GIB, tight), "M|layer_0")
    assert plan.block_queries == 2 * 516
    assert plan.n_blocks == 20  # ceil(20,000 / 1,032)


def test_a_limit_just_below_one_batch_is_refused_naming_the_worker_and_the_fix():
    limit = minimum_memory_limit(124_000, 1024, 516) - 2**20
    with pytest.raises(ClusterError, match=r"one search batch of 516 queries of M\|layer_0") as err:
        plan_blocks(20_000, 516, 1024, 124_000, _workers(8 * GIB, limit), "M|layer_0")
    assert "tcp://w1:1" in str(err.value) and "lookup.batch_size" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_matrix_larger_than_the_worker_is_refused():
    with pytest.raises(
        ClusterError, match=r"reference matrix of M\|layer_0 \(1000000 × 1024\) needs 5.72 GiB"
    ):
        plan_blocks(1000, 516, 1024, 1_000_000, _workers(4 * GIB), "M|layer_0")


def test_minimum_memory_limit_is_the_threshold_of_the_plan():
    for n_references, dim, block, threads in [
        (300, 512, 8, 1),
        (124_000, 1024, 516, 2),
        (10**6, 1024, 4128, 1),
    ]:
        limit = minimum_memory_limit(n_references, dim, block, threads)
        fits = plan_blocks(10 * block, block, dim, n_references, _workers(limit, threads=threads))
        assert fits.block_queries == block
        with pytest.raises(ClusterError):
            plan_blocks(10 * block, block, dim, n_references, _workers(limit - 2 * 2**10, threads=threads))


def test_no_workers_is_refused():
    with pytest.raises(ClusterError, match="no workers"):
        plan_blocks(10, 5, 8, 10, [], "M|layer_0")


def test_code_version_is_the_package_version_and_a_digest():
    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{16}", code_version())


def test_slice_exclusions_renumbers_rows():
    import numpy as np

    indptr, indices = np.array([0, 1, 3, 3, 4]), np.array([7, 1, 2, 9])
    part = slice_exclusions((indptr, indices), 1, 3)
    assert part[0].tolist() == [0, 2, 2] and part[1].tolist() == [1, 2]
    assert slice_exclusions(None, 0, 2) is None
