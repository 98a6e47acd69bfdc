"""Warm-up and the inline decision at the shapes served, through a real server and a model whose cost grows
with a dynamic axis (n = 2 computes in microseconds; n = 1024 in ~70 ms even on AVX-512 cores, where n = 512
took 7 ms, under the 10 ms threshold)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.modelzoo import growing_model, growing_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

THRESHOLD_US = "10000"
PLACED = "modelfleet_batch_placements_total"
GAUGE = "modelfleet_inline_compute"


def infer(server: ServerProcess, batch: int, n: int) -> None:
    """One request of `batch` items at n x n, its answer checked against NumPy."""
    x = np.random.default_rng(n).normal(scale=0.1, size=(batch, n, n)).astype(np.float32)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    client = httpclient.InferenceServerClient(url=server.host, network_timeout=120)
    result = client.infer("growing", [inp])
    np.testing.assert_allclose(result.as_numpy("y"), growing_reference(x), atol=1e-3)


def placements(server: ServerProcess) -> tuple[float, float]:
    return server.metric(PLACED, placement="inline"), server.metric(PLACED, placement="executor")


@pytest.mark.timeout(300)
def test_a_bare_onnx_with_unknown_axes_starts_on_the_executor_and_a_large_batch_sends_it_back(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = start_server(
        growing_model(tmp_path / "growing.onnx"),
        "growing",
        max_batch_size="8",
        inline_compute_microseconds=THRESHOLD_US,
        inline_after_batches="3",
        intra_op_threads="2",
    )
    assert "dynamic axes have no max" in server.log() and "batches start in executor threads" in server.log()
    # Two intra-op threads: the calling thread's CPU time is not the whole compute, so wall time decides.
    assert "(a batch's cost: its wall time)" in server.log()
    assert server.metric(GAUGE) == 0
    # Warm-up at n = 1 costs microseconds; this costs tens of milliseconds, and must not run on the loop.
    infer(server, 2, 1024)
    assert placements(server) == (0, 1) and server.metric(GAUGE) == 0

    small = 0
    while server.metric(GAUGE) == 0 and small < 200:  # a hang guard: three cheap batches in a row suffice
        infer(server, 1, 2)
        small += 1
    assert server.metric(GAUGE) == 1, server.log()
    assert small >= 3
    assert "batches now run inline on the event loop: 3 batches in a row" in server.log()
    infer(server, 1, 2)
    inline, executor = placements(server)
    assert inline >= 1

    infer(server, 2, 1024)
    assert server.metric(GAUGE) == 1, "one slow batch (a shape larger than any measured) is not evidence"
    infer(server, 2, 1024)
    assert server.metric(GAUGE) == 0, "two batches in a row that cost milliseconds left batches inline"
    assert placements(server) == (inline, executor + 2), "a large batch computed on the event loop"
    assert (
        "batches now run in executor threads: two batches in a row cost over 10000 us, the last 2097152 input "
        "elements in" in server.log()
    )


def store_entry(root: Path, max_n: int) -> Path:
    """An engine-store entry (as `modelfleet build` writes it) for the growing model, with a shapes profile."""
    entry = root / f"entry-{max_n}"
    growing_model(entry / "model.onnx")
    options = {
        "batch": {"min": 1, "opt": 4, "max": 8},
        "shapes": {"x": {"min": [1, 1], "opt": [4, 4], "max": [max_n, max_n]}},
    }
    manifest = {"key": f"k{max_n}", "backend": "onnxruntime", "artifact": "model.onnx", "options": options}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


@pytest.mark.timeout(300)
@pytest.mark.parametrize("served_from", ["store", "setting"])
@pytest.mark.parametrize(("max_n", "inline"), [(384, False), (4, True)], ids=["max-slow", "max-cheap"])
def test_known_shapes_warm_up_at_opt_and_max_and_decide_from_the_max(
    start_server: ServerFactory, tmp_path: Path, served_from: str, max_n: int, inline: bool
) -> None:
    entry = store_entry(tmp_path, max_n)
    if served_from == "setting":  # a bare .onnx: the shapes come from MODELFLEET_SHAPES
        model, setting = entry / "model.onnx", [max_n, max_n]
    else:  # a store entry: its manifest's shapes win over the setting
        model, setting = entry, [2, 2]
    shapes = json.dumps({"x": {"opt": [4, 4], "max": setting}})
    server = start_server(model, "growing", max_batch_size="8", inline_compute_microseconds=THRESHOLD_US, shapes=shapes)
    log = server.log()
    print(next(line for line in log.splitlines() if "ready in" in line))
    warmed = "warmed batch sizes [1, 2, 4, 8] at the opt shapes {'x': [4, 4]} and batch 8 at the max shapes"
    timed = f"a full batch at the max shapes {{'x': [8, {max_n}, {max_n}]}} computes in"
    assert f"{warmed} {{'x': [{max_n}, {max_n}]}}; {timed}" in log
    where = "inline on the event loop" if inline else "in executor threads"
    assert f"so batches run {where} (a batch's cost: its thread's CPU time)" in log  # 1 intra-op thread
    assert server.metric(GAUGE) == (1 if inline else 0)
    infer(server, 8, max_n)
    assert placements(server) == ((1, 0) if inline else (0, 1))
