"""Stages run side by side (`core.timing.timed_concurrently`): their results, timings and errors."""

from __future__ import annotations

import threading
import time

import pytest

from fantasia_assets.core import timing
from fantasia_assets.core.timing import OVERLAP, timed_concurrently


def test_stages_run_side_by_side_and_their_timings_add_up_to_the_wall_time():
    # each stage waits for the other two: run one after the other, the barrier would time out
    barrier = threading.Barrier(3, timeout=10)

    def stage(value: int):
        def run() -> int:
            barrier.wait()
            time.sleep(0.05)
            return value

        return run

    timings = {"summary": 1.0}
    started = time.perf_counter()
    results = timed_concurrently(timings, {"summary": stage(1), "ensemble": stage(2), "fasta": stage(3)})
    wall = time.perf_counter() - started
    assert list(results.items()) == [("summary", 1), ("ensemble", 2), ("fasta", 3)]
    assert timings["summary"] >= 1.05 and timings["ensemble"] >= 0.05 and timings["fasta"] >= 0.05
    assert timings[OVERLAP] < -0.09  # three stages of ≥ 0.05 s each in about 0.05 s
    assert wall - 0.05 <= sum(timings.values()) - 1.0 <= wall


def test_every_stage_ends_before_the_first_failure_in_their_order_is_raised():
    ended = []

    def failing(message: str, delay: float):
        def run() -> None:
            time.sleep(delay)
            ended.append(message)
            raise RuntimeError(message)

        return run

    def slow() -> None:
        time.sleep(0.2)
        ended.append("slow")

    timings: dict[str, float] = {}
    stages = {"a": lambda: None, "b": failing("b failed", 0.1), "c": failing("c failed", 0.0), "d": slow}
    with pytest.raises(RuntimeError, match="b failed"):  # not c's, although c failed first
        timed_concurrently(timings, stages)
    assert sorted(ended) == ["b failed", "c failed", "slow"]
    assert set(timings) == {"a", "b", "c", "d", OVERLAP}
    # the first stage runs in the calling thread: its failure is raised the same way
    with pytest.raises(RuntimeError, match="c failed"):
        timed_concurrently({}, {"c": failing("c failed", 0.0), "d": slow})


def test_a_stage_is_timed_into_the_table_it_belongs_to():
    run, partition = {"summary": 0.5}, {"write partition": 1.0}
    timed_concurrently(
        run,
        {"write partition": lambda: time.sleep(0.02), "summary": lambda: None},
        into={"write partition": partition},
    )
    assert set(run) == {"summary", OVERLAP} and run["summary"] >= 0.5
    assert partition["write partition"] >= 1.02


def test_no_stage_no_timing():
    timings: dict[str, float] = {}
    assert timed_concurrently(timings, {}) == {}
    assert timings == {}


def test_a_timeline_records_each_stage_with_its_thread_and_span_only_when_asked(monkeypatch):

    barrier = threading.Barrier(2, timeout=10)

    def stage():
        barrier.wait()  # both stages are running at once
        time.sleep(0.02)

    timings: dict[str, float] = {}
    timed_concurrently(timings, {"a": stage, "b": stage})
    assert timing.TIMELINE is None  # off by default: nothing kept

    monkeypatch.setattr(timing, "TIMELINE", [])
    started = time.perf_counter()
    with timing.timed(timings, "first"):
        pass
    timed_concurrently(timings, {"a": stage, "b": stage})
    spans = {stage: (thread, start, end) for stage, thread, start, end in timing.TIMELINE}
    assert sorted(spans) == ["a", "b", "first"] and len(timing.TIMELINE) == 3
    assert spans["a"][0] == threading.current_thread().name  # the first stage runs in the caller
    assert spans["b"][0].startswith("stage")
    assert started <= spans["first"][1] <= spans["first"][2] <= spans["a"][1]
    assert spans["a"][1] < spans["b"][2] and spans["b"][1] < spans["a"][2]  # they overlapped
    assert min(spans["a"][2] - spans["a"][1], spans["b"][2] - spans["b"][1]) >= 0.02


def test_a_part_is_recorded_in_the_timeline_alone_and_outlives_its_switching_off(monkeypatch):
    timings: dict[str, float] = {}
    with timing.part("import"):  # no timeline: nothing recorded anywhere
        pass
    assert timing.TIMELINE is None

    kept: list = []
    monkeypatch.setattr(timing, "TIMELINE", kept)
    with timing.timed(timings, "search"), timing.part("engine: build"):
        time.sleep(0.01)
    assert list(timings) == ["search"]  # no row of its own in the stage table
    (name, thread, start, end), (stage, _, stage_start, stage_end) = kept
    assert name == timing.PART + "engine: build" and stage == "search"
    assert thread == threading.current_thread().name
    assert stage_start <= start < start + 0.01 <= end <= stage_end

    # a thread still in its part when the benchmark switches the timeline off records it there
    inside, release = threading.Event(), threading.Event()

    def background() -> None:
        with timing.part("torch import (ahead)"):
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=background, name="torch-ahead")
    worker.start()
    assert inside.wait(10)
    monkeypatch.setattr(timing, "TIMELINE", None)
    release.set()
    worker.join(10)
    assert kept[-1][:2] == (timing.PART + "torch import (ahead)", "torch-ahead")


def test_the_question_for_a_card_is_a_part_of_the_timeline(monkeypatch):
    """`resolve_device` on a torch build with a GPU runtime imports torch and asks for a card:
    on a card machine, the wait for `torch_ahead`'s import, which a cold run's timeline shows."""
    from fantasia_assets.core import device

    spans: list = []
    monkeypatch.setattr(timing, "TIMELINE", spans)
    monkeypatch.setattr(device, "torch_has_gpu_libraries", lambda: True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert device.resolve_device("torch", use_gpu=True) == "cpu"
    assert [name for name, *_ in spans] == [timing.PART + "torch import, CUDA asked"]
    spans.clear()
    monkeypatch.setattr(device, "torch_has_gpu_libraries", lambda: False)  # a CPU build: nothing asked
    assert device.resolve_device("torch", use_gpu=True) == "cpu" and spans == []
