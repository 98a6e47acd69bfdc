"""Inline-or-executor placement: the pure hysteresis, the served shapes it is timed at, and the batcher using it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from modelfleet_runtime.backends.base import TensorSpec
from modelfleet_runtime.batcher import Batcher, BatcherConfig, BatchObserver
from modelfleet_runtime.loader import build_model_source, shapes_known, with_served_shapes
from modelfleet_runtime.placement import Placement
from modelfleet_runtime.settings import ServeSettings

MS = 1e-3
US = 1e-6


def test_unknown_shapes_start_on_the_executor_and_go_inline_only_after_n_cheap_batches_in_a_row() -> None:
    placement = Placement(threshold_s=1 * MS, promote_after=3)
    assert not placement.inline and not placement.runs_inline(1)
    assert placement.observe(10, 10 * US) is None
    assert placement.observe(10, 10 * US) is None
    assert placement.observe(10, 5 * MS) is None  # an expensive one breaks the streak
    assert placement.observe(10, 10 * US) is None
    assert placement.observe(10, 10 * US) is None
    change = placement.observe(10, 10 * US)
    assert change is not None and change.inline and "3 batches in a row" in change.reason
    assert placement.inline and placement.runs_inline(10)
    assert placement.observe(10, 10 * US) is None  # no change, nothing to log


def test_two_expensive_batches_in_a_row_send_batches_back_to_the_executor() -> None:
    placement = Placement(threshold_s=1 * MS, promote_after=2)
    placement.observe(10, 10 * US)
    placement.observe(10, 10 * US)
    assert placement.inline
    assert placement.observe(10, 30 * MS) is None
    assert placement.inline, "one slow batch is not evidence: preempted, or the host stole its time"
    placement.observe(10, 10 * US)
    assert placement.observe(10, 30 * MS) is None
    assert placement.inline, "a cheap batch in between starts the count again"
    change = placement.observe(10, 30 * MS)
    assert change is not None and not change.inline and "30000 us" in change.reason
    assert not placement.runs_inline(1)
    assert placement.observe(10, 30 * MS) is None  # already there: logged once
    placement.observe(10, 10 * US)
    assert not placement.inline, "one cheap batch after expensive ones is not enough"
    placement.observe(10, 10 * US)
    assert placement.inline


def test_wall_time_is_the_cost_unless_the_threads_cpu_time_is_the_whole_compute() -> None:
    """In an executor thread, wall time includes the wait for the GIL the busy loop holds."""
    by_wall = Placement(threshold_s=1 * MS, promote_after=2)
    for _ in range(5):
        by_wall.observe(10, 5 * MS, cpu_seconds=10 * US)
    assert not by_wall.inline, "a GPU or multi-threaded model's thread CPU time says nothing of its compute"
    by_cpu = Placement(threshold_s=1 * MS, promote_after=2, cpu_is_cost=True)
    by_cpu.observe(10, 5 * MS, cpu_seconds=10 * US)
    change = by_cpu.observe(10, 5 * MS, cpu_seconds=10 * US)
    assert change is not None and change.inline, "cheap in CPU time: only the GIL wait was slow"
    assert by_cpu.observe(10, 5 * MS, cpu_seconds=4 * MS) is None
    change = by_cpu.observe(10, 5 * MS, cpu_seconds=4 * MS)
    assert change is not None and not change.inline and "4000 us" in change.reason
    assert not by_cpu.inline


def test_inline_never_takes_a_batch_larger_than_any_measured_under_the_threshold() -> None:
    placement = Placement(threshold_s=1 * MS, promote_after=1)
    placement.observe(100, 10 * US)
    assert placement.runs_inline(100)
    assert not placement.runs_inline(101), "a larger batch goes to the executor and is measured there"
    placement.observe(1000, 20 * US)
    assert placement.runs_inline(1000)


def test_a_trusted_measurement_at_the_max_shapes_starts_inline_and_a_slow_one_forbids_it() -> None:
    trusted = Placement(threshold_s=1 * MS, promote_after=5, trusted_elements=4096)
    assert trusted.inline and trusted.runs_inline(4096) and not trusted.runs_inline(4097)
    slow = Placement(threshold_s=1 * MS, promote_after=1, allowed=False)
    for _ in range(5):
        assert slow.observe(10, 10 * US) is None
    assert not slow.inline
    never = Placement(threshold_s=0, promote_after=1, trusted_elements=10)
    assert not never.inline
    never.observe(1, 0.0)
    assert not never.inline, "a threshold of 0 means always the executor"
    with pytest.raises(ValueError, match="promote_after"):
        Placement(threshold_s=1 * MS, promote_after=0)


X = TensorSpec("x", "FP32", (-1, -1, -1))
FIXED = TensorSpec("f", "FP32", (-1, 16))


def test_shapes_are_known_when_every_dynamic_non_batch_axis_has_a_max() -> None:
    assert shapes_known([FIXED], {})
    assert not shapes_known([X], {})
    assert not shapes_known([X, FIXED], {"x": [4]})
    assert shapes_known([X, FIXED], {"x": [4, 4]})


def test_max_shapes_come_from_the_store_manifest_or_the_setting_for_a_bare_onnx(tmp_path: Path) -> None:
    manifest = {
        "key": "k",
        "backend": "onnxruntime",
        "artifact": "model.onnx",
        "options": {"shapes": {"x": {"min": [1, 1], "opt": [8, 8], "max": [64, 64]}}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    settings = ServeSettings(
        model=tmp_path,
        name="m",
        shapes={"x": {"opt": [2, 2], "max": [3, 3]}},
    )
    store = with_served_shapes(build_model_source(tmp_path), settings)
    assert (store.opt_shapes, store.max_shapes) == ({"x": [8, 8]}, {"x": [64, 64]}), "the manifest wins"
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"")
    served = with_served_shapes(build_model_source(bare), settings)
    assert (served.opt_shapes, served.max_shapes) == ({"x": [2, 2]}, {"x": [3, 3]})


def test_the_shapes_setting_reads_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_SHAPES", '{"x": {"opt": [32], "max": [512]}}')
    settings = ServeSettings(model=Path("m.onnx"), name="m")
    assert settings.shapes["x"].max == [512]
    monkeypatch.setenv("MODELFLEET_SHAPES", '{"x": {"opt": [0], "max": [512]}}')
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ServeSettings(model=Path("m.onnx"), name="m")


class Placements(BatchObserver):
    def __init__(self) -> None:
        self.inline: list[bool] = []

    def placed(self, inline: bool) -> None:
        self.inline.append(inline)


def test_the_batcher_moves_a_slow_batch_off_the_loop_and_cheap_ones_onto_it() -> None:
    """Slow batches burn 50 ms of CPU against a 10 ms threshold; cheap ones do nothing (far on either side)."""
    on_loop: list[bool] = []

    def infer(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        if inputs["x"].size > 1:
            began = time.thread_time()
            while time.thread_time() - began < 0.05:
                pass
        return {"y": inputs["x"]}

    async def scenario(observer: Placements) -> None:
        config = BatcherConfig(
            max_batch_size=8,
            preferred_batch_sizes=frozenset(),
            max_queue_delay_s=0.0,
            max_queue_size=0,
            instances=1,
            batched=True,
        )
        placement = Placement(threshold_s=10 * MS, promote_after=3)
        batcher = Batcher(infer=infer, input_names=("x",), config=config, observer=observer, placement=placement)

        async def one(shape: tuple[int, ...]) -> None:
            await asyncio.wait_for(batcher.submit({"x": np.zeros(shape, np.float32)}, 1, shape, None), 60)

        for _ in range(200):  # a hang guard: on an idle machine three cheap batches suffice
            await one((1, 1))
            if placement.inline:
                break
        assert placement.inline
        await one((1, 1))  # computed on the loop
        await one((1, 64))  # larger than any measured: the executor, where it proves slow
        assert placement.inline, "one slow batch is not evidence"
        await one((1, 64))
        assert not placement.inline
        await one((1, 1))
        await batcher.close()

    observer = Placements()
    asyncio.run(scenario(observer))
    assert observer.inline == on_loop, "every batch computed where the placement said"
    assert observer.inline[:3] == [False, False, False]
    assert observer.inline[-4:] == [True, False, False, False]
