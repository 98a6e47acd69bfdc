"""The pure parts of the runtime: batch planning, merge/split, validation, wire format, settings, loader."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from modelfleet_runtime.backends.base import TensorSpec, build_warmup_inputs
from modelfleet_runtime.backends.onnxruntime import (
    MESSAGE_LIMIT,
    clean_ort_message,
    input_error,
    is_input_error,
    to_ort_strings,
)
from modelfleet_runtime.batcher import Batcher, BatcherConfig, BatchObserver, InferFn
from modelfleet_runtime.batching import (
    BatchMismatch,
    ModelSignature,
    batch_key,
    merge,
    plan_batch,
    split,
    supports_batching,
    validate_inputs,
)
from modelfleet_runtime.loader import ModelLoadError, build_model_source, build_warmup_batch_sizes
from modelfleet_runtime.metrics import DURATION_BUCKETS, Metrics
from modelfleet_runtime.protocol import (
    DATATYPES,
    BackendError,
    InferRequest,
    InvalidInput,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
)
from modelfleet_runtime.settings import ServeSettings
from tests.modelzoo import VOCAB, lookup_model, two_io_model, unshared_add_model

CLASSIFIER = ModelSignature(
    inputs=(TensorSpec("input", "FP32", (-1, 16)),),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),),
    max_batch_size=8,
)
TWO_IO = ModelSignature(
    inputs=(TensorSpec("a", "FP32", (-1, -1)), TensorSpec("b", "FP32", (-1, -1))),
    outputs=(TensorSpec("sum", "FP32", (-1, -1)), TensorSpec("dot", "FP32", (-1, 1))),
    max_batch_size=32,
)


# --- plan_batch: Triton's dynamic batcher rules ------------------------------------------------------------


def plan(
    sizes: list[int],
    *,
    max_batch: int = 8,
    preferred: tuple[int, ...] = (),
    expired: bool = False,
    keys: list[int] | None = None,
) -> int:
    queued = list(zip(sizes, keys or [0] * len(sizes), strict=True))
    return plan_batch(queued, max_batch_size=max_batch, preferred=frozenset(preferred), delay_expired=expired)


def test_an_empty_queue_dispatches_nothing() -> None:
    assert plan([], expired=True) == 0


def test_a_partial_batch_waits_for_the_queue_delay() -> None:
    assert plan([1, 1, 1]) == 0
    assert plan([1, 1, 1], expired=True) == 3


def test_a_full_batch_goes_at_once() -> None:
    assert plan([1] * 8) == 8
    assert plan([1] * 12) == 8


def test_the_largest_preferred_size_goes_at_once() -> None:
    assert plan([1] * 5, preferred=(2, 4)) == 4
    assert plan([1] * 3, preferred=(2, 4)) == 2
    assert plan([1] * 12, preferred=(4,)) == 4  # Triton: a preferred size beats a larger non-preferred one


def test_multi_row_requests_count_by_rows() -> None:
    assert plan([3, 3], preferred=(6,)) == 2
    assert plan([3, 2], preferred=(4,)) == 0  # prefix sums 3, 5 never hit 4
    assert plan([5, 4]) == 1  # 9 rows would not fit: the batch cannot grow, so it goes


def test_a_request_of_another_shape_cuts_the_batch() -> None:
    assert plan([1, 1, 1], keys=[0, 0, 1]) == 2
    assert plan([1], keys=[0]) == 0


@given(st.lists(st.integers(1, 8), min_size=1, max_size=40), st.booleans(), st.sets(st.integers(1, 16)))
def test_a_planned_batch_never_exceeds_the_max(sizes: list[int], expired: bool, preferred: set[int]) -> None:
    count = plan(sizes, max_batch=16, preferred=tuple(preferred), expired=expired)
    assert 0 <= count <= len(sizes)
    assert sum(sizes[:count]) <= 16
    if expired:
        assert count >= 1


# --- merge and split ---------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=20), st.integers(1, 7))
def test_split_gives_every_request_exactly_its_own_rows(sizes: list[int], width: int) -> None:
    rng = np.random.default_rng(len(sizes) * 31 + width)
    requests = [{"x": rng.normal(size=(n, width)).astype(np.float32)} for n in sizes]
    merged = merge(requests, ["x"])
    assert merged["x"].shape == (sum(sizes), width)
    outputs = {"y": merged["x"] * 2.0, "z": merged["x"][:, :1]}
    parts = split(outputs, sizes)
    assert len(parts) == len(requests)
    for request, part in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(part["y"], request["x"] * 2.0)
        np.testing.assert_array_equal(part["z"], request["x"][:, :1])


def test_a_single_request_passes_through_without_a_copy() -> None:
    x = np.ones((2, 16), np.float32)
    assert merge([{"input": x}], ["input"])["input"] is x


def test_split_refuses_outputs_whose_rows_do_not_match_the_batch() -> None:
    with pytest.raises(BatchMismatch, match="'y'"):
        split({"y": np.zeros((3, 2))}, [2, 2])


# --- validation names the tensor ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ({"input": np.zeros((1, 16), np.float32), "extra": np.zeros(1)}, "unknown input 'extra'"),
        ({}, "missing input 'input'"),
        ({"input": np.zeros((1, 16), np.float64)}, "input 'input' has datatype FP64, the model expects FP32"),
        (
            {"input": np.zeros((1, 15), np.float32)},
            "input 'input' has shape [1, 15], the model expects [-1, 16]",
        ),
        ({"input": np.zeros((16,), np.float32)}, "input 'input' has shape [16]"),
        ({"input": np.zeros((9, 16), np.float32)}, "batch size 9, above the maximum 8"),
        ({"input": np.zeros((0, 16), np.float32)}, "empty batch"),
    ],
)
def test_validation_errors_name_the_tensor(inputs: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_inputs(inputs, CLASSIFIER)
    assert needle in info.value.message


def test_inputs_must_agree_on_the_batch_size() -> None:
    with pytest.raises(InvalidInput, match="input 'b' has batch size 3 but input 'a' has 2"):
        validate_inputs({"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)}, TWO_IO)


def test_requests_with_different_sequence_lengths_get_different_keys() -> None:
    short = {"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 4), np.float32)}
    long = {"a": np.zeros((2, 9), np.float32), "b": np.zeros((2, 9), np.float32)}
    assert validate_inputs(long, TWO_IO) == 2
    assert batch_key(short, TWO_IO) != batch_key(long, TWO_IO)
    assert batch_key(short, TWO_IO) == batch_key({k: v[:1] for k, v in short.items()}, TWO_IO)


def test_only_models_with_a_dynamic_leading_axis_batch() -> None:
    assert supports_batching(CLASSIFIER.inputs, CLASSIFIER.outputs)
    assert not supports_batching((TensorSpec("x", "FP32", (3, 4)),), CLASSIFIER.outputs)


# --- the wire format ---------------------------------------------------------------------------------------


def binary_request(arrays: dict[str, np.ndarray], **extra: object) -> tuple[bytes, int]:
    header = {
        "inputs": [
            {
                "name": n,
                "shape": list(a.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": a.nbytes},
            }
            for n, a in arrays.items()
        ],
        **extra,
    }
    raw = json.dumps(header).encode()
    return raw + b"".join(a.tobytes() for a in arrays.values()), len(raw)


def test_binary_inputs_decode_to_the_same_arrays() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = -a
    body, length = binary_request({"a": a, "b": b}, parameters={"timeout": 500, "binary_data_output": True})
    request = decode_infer_request(body, length)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.timeout_us == 500
    assert request.binary_output is True


def test_json_inputs_may_be_nested_or_flat() -> None:
    flat = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
    nested = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]}
    for doc in (flat, nested):
        x = decode_infer_request(json.dumps(doc).encode(), None).inputs["x"]
        assert x.dtype == np.int64
        np.testing.assert_array_equal(x, [[1, 2], [3, 4]])


def test_bytes_tensors_round_trip_in_binary_and_json() -> None:
    words = np.array([b"alpha", b"", b"\xce\xbb"], dtype=np.object_)
    body, length = encode_infer_response(
        model_name="m", model_version="1", request_id="r1", outputs=[("w", "BYTES", words, True)]
    )
    assert length is not None
    header = json.loads(body[:length])
    blob = body[length:]
    raw = json.dumps(
        {
            "inputs": [
                {
                    "name": "w",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": header["outputs"][0]["parameters"]["binary_data_size"]},
                }
            ]
        }
    ).encode()
    decoded = decode_infer_request(raw + blob, len(raw)).inputs["w"]
    assert list(decoded) == list(words)
    doc = json.dumps({"inputs": [{"name": "w", "shape": [2], "datatype": "BYTES", "data": ["a", "λ"]}]}).encode()
    assert list(decode_infer_request(doc, None).inputs["w"]) == [b"a", "λ".encode()]


@pytest.mark.parametrize(
    ("header", "binary", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", None, "no 'inputs'"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}', None, "input 'x' has neither"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BF16", "data": [1, 2]}]}',
            None,
            "input 'x': unsupported datatype 'BF16'",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}',
            None,
            "input 'x': 2 elements",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}',
            None,
            """input 'x': FP32 data must be JSON numbers, found a string ("a")""",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}',
            None,
            "input 'x': shape [-1] has a negative",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}',
            None,
            "input 'x': a value in 'data' is out of range for UINT8",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}, '
            b'{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}',
            None,
            "input 'x' appears twice",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}',
            b"\0" * 8,
            "input 'x': binary_data_size 16 runs past",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}',
            b"\0" * 8,
            "input 'x': 8 bytes of binary data, but shape [4] of FP32 needs 16",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1000000000], "datatype": "BYTES", "parameters": '
            b'{"binary_data_size": 4}}]}',
            b"\0" * 4,
            "cannot hold 1000000000 BYTES",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": '
            b'[{"name": "y", "parameters": {"classification": 3}}]}',
            None,
            "classification extension",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": '
            b'{"timeout": -5}}',
            None,
            "'timeout' must be a non-negative integer",
        ),
    ],
)
def test_malformed_requests_fail_with_a_clear_message(header: bytes, binary: bytes | None, needle: str) -> None:
    body = header + (binary or b"")
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(body, None if binary is None else len(header))
    assert needle in info.value.message


def test_trailing_binary_bytes_are_refused() -> None:
    body, length = binary_request({"x": np.zeros(2, np.float32)})
    with pytest.raises(InvalidInput, match="4 bytes of binary data after the last binary input"):
        decode_infer_request(body + b"\0" * 4, length)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "9999"])
def test_a_bad_header_length_is_refused(value: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        parse_header_length(value, 100)


def test_json_and_binary_outputs_can_be_mixed() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = np.array([[7]], dtype=np.int64)
    body, length = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id=None,
        outputs=[("y", "FP32", y, False), ("z", "INT64", z, True)],
    )
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0]["data"] == [0, 1, 2, 3, 4, 5]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[length:], np.int64).tolist() == [7]
    assert "id" not in header


# --- settings, loader, warm-up, metrics --------------------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_PREFERRED_BATCH_SIZES", "16, 8")
    monkeypatch.setenv("MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS", "1500")
    monkeypatch.setenv("MODELFLEET_PROVIDERS", '["CPUExecutionProvider"]')
    s = ServeSettings(model=Path("m.onnx"), name="m")
    assert s.preferred_batch_sizes == [8, 16]
    assert s.max_queue_delay_microseconds == 1500
    assert s.providers == ["CPUExecutionProvider"]


def test_preferred_sizes_above_the_max_are_refused() -> None:
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        ServeSettings(model=Path("m.onnx"), name="m", max_batch_size=8, preferred_batch_sizes=[16])


def test_every_settings_field_is_documented() -> None:
    missing = [name for name, field in ServeSettings.model_fields.items() if not field.description]
    assert missing == []


def test_a_store_directory_needs_a_manifest_naming_a_file_inside_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"without manifest\.json"):
        build_model_source(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"backend": "onnxruntime", "artifact": "../x.onnx"}))
    with pytest.raises(ModelLoadError, match="artifact must be a file name"):
        build_model_source(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"backend": "tvm", "artifact": "m.onnx"}))
    with pytest.raises(ModelLoadError, match="backend must be one of"):
        build_model_source(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model_source(tmp_path / "nothing")


def test_a_store_manifest_gives_backend_profile_and_warmup_shapes(tmp_path: Path) -> None:
    manifest = {
        "key": "k1",
        "backend": "tensorrt",
        "artifact": "engine.plan",
        "artifact_sha256": "ab" * 32,
        "options": {
            "batch": {"min": 1, "opt": 4, "max": 16},
            "shapes": {"a": {"min": [1], "opt": [64], "max": [128]}},
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    source = build_model_source(tmp_path)
    assert source.backend == "tensorrt"
    assert source.artifact == tmp_path / "engine.plan"
    assert source.batch is not None
    assert (source.batch.min, source.batch.opt, source.batch.max) == (1, 4, 16)
    assert source.opt_shapes == {"a": [64]}
    feeds = build_warmup_inputs(TWO_IO.inputs, 3, source.opt_shapes)
    assert feeds["a"].shape == (3, 64)
    assert feeds["b"].shape == (3, 1)


def test_warmup_covers_the_profile_preferred_sizes_and_the_max() -> None:
    sizes = build_warmup_batch_sizes(max_batch_size=24, preferred=[12], profile=None, mode="profile")
    assert sizes == [1, 2, 4, 8, 12, 16, 24]
    assert build_warmup_batch_sizes(max_batch_size=5, preferred=[], profile=None, mode="all") == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_duration_buckets_resolve_a_p99_between_1ms_and_2s() -> None:
    assert 20 <= len(DURATION_BUCKETS) <= 30
    assert DURATION_BUCKETS[0] <= 0.001
    assert DURATION_BUCKETS[-1] >= 2.0
    ratios = [b / a for a, b in itertools.pairwise(DURATION_BUCKETS)]
    assert max(ratios) < 1.4


def test_metrics_render_the_names_the_autoscaler_reads() -> None:
    metrics = Metrics("m")
    metrics.request_done("success", 0.004)
    metrics.request_done("rejected_queue_full", None)
    metrics.computed(8, 0.002)
    metrics.queued(0.0005)
    text = metrics.render().decode()
    assert 'modelfleet_requests_total{model="m",outcome="success"} 1.0' in text
    assert 'modelfleet_requests_total{model="m",outcome="rejected_queue_full"} 1.0' in text
    assert 'modelfleet_request_duration_seconds_bucket{le="0.00524",model="m"} 1.0' in text
    assert 'modelfleet_request_duration_seconds_count{model="m"} 1.0' in text
    assert 'modelfleet_batch_size_sum{model="m"} 8.0' in text
    assert 'modelfleet_compute_duration_seconds_count{model="m"} 1.0' in text
    assert 'modelfleet_queue_depth{model="m"} 0.0' in text
    assert 'modelfleet_inflight_requests{model="m"} 0.0' in text


# --- the batcher's event loop, in process ------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
def test_thousands_of_queued_requests_all_get_their_own_answer(inline: bool) -> None:
    gate = threading.Event()

    def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not inline:
            gate.wait(timeout=120)  # hold the first batch so the rest pile up behind it
        return {"y": inputs["x"] * 2}

    async def scenario() -> None:
        config = BatcherConfig(
            max_batch_size=3,
            preferred_batch_sizes=frozenset(),
            max_queue_delay_s=3600.0,
            max_queue_size=0,
            instances=1,
            batched=True,
            inline=inline,
        )
        batcher = Batcher(infer=double, input_names=("x",), config=config)
        futures = [batcher.submit({"x": np.full((1, 1), i, np.float32)}, 1, (i % 2,), None) for i in range(3000)]
        if not inline:
            assert batcher.queue_depth > 2900
        gate.set()
        batcher.flush()
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=120)
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(3000)]
        assert batcher.queue_depth == 0
        await batcher.close()

    asyncio.run(scenario())


def _tuned_batcher(infer: InferFn, *, per_batch_ms: float, inline: bool) -> Batcher:
    """A batcher on 2 instances whose tuner has measured batches of `per_batch_ms` per batch, 8 ms per item."""
    from modelfleet_runtime.adaptive import Tuner

    config = BatcherConfig(
        max_batch_size=16, preferred_batch_sizes=frozenset(), max_queue_delay_s=0.0, max_queue_size=0,
        instances=2, batched=True, inline=inline,
    )  # fmt: skip
    tuner = Tuner(max_batch_size=16, instances=2, target_s=1.0, max_delay_s=0.0)
    for b in (1, 2, 4, 8):
        tuner.computed(b, (per_batch_ms + 8 * b) / 1000)
    return Batcher(infer=infer, input_names=("x",), config=config, tuner=tuner)


@pytest.mark.parametrize(("per_batch_ms", "second"), [(2.0, 4), (30.0, 8)], ids=["little gain", "large gain"])
def test_a_tuned_batcher_shares_the_queue_between_instances_only_where_batching_gains_little(
    per_batch_ms: float, second: int
) -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(inputs["x"]))
        gate.wait(timeout=120)  # both instances stay busy until every request is queued
        return {"y": inputs["x"] * 2}

    async def scenario() -> None:
        batcher = _tuned_batcher(double, per_batch_ms=per_batch_ms, inline=False)
        first = batcher.submit({"x": np.zeros((1, 1), np.float32)}, 1, (), None)
        await asyncio.sleep(0)  # the arrival's pump runs at the end of the loop iteration
        assert batcher.busy == 1
        rest = [batcher.submit({"x": np.full((1, 1), i, np.float32)}, 1, (), None) for i in range(1, 9)]
        await asyncio.sleep(0)
        assert (batcher.busy, batcher.queue_depth) == (2, 8 - second)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=120)
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(9)]
        await batcher.close()

    asyncio.run(scenario())
    # The second instance takes its half of the 8 queued (the first's next batch takes the others) where a
    # batch costs less than an item; where it costs more, one batch takes all 8.
    assert sizes[:2] == [1, second]
    assert sum(sizes) == 9


def test_an_inline_batcher_never_shares_the_queue() -> None:
    """Inline, every batch runs on the one loop thread in turn: splitting the queue would only add batches."""
    sizes: list[int] = []

    def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(inputs["x"]))
        return {"y": inputs["x"] * 2}

    async def scenario() -> None:
        batcher = _tuned_batcher(double, per_batch_ms=2.0, inline=True)  # the executor would share
        assert batcher._tuner is not None and batcher._tuner.current(0.0).split == 2
        futures = [batcher.submit({"x": np.full((1, 1), i, np.float32)}, 1, (), None) for i in range(8)]
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(8)]
        await batcher.close()

    asyncio.run(scenario())
    assert sizes == [8]


# --- strict wire format: every mistake is InvalidInput, nothing is coerced ----------------------------------

STRICT = settings(derandomize=True, max_examples=300, deadline=None)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=5)
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
FIELDS = {
    "name": st.one_of(st.text(max_size=3), JSON_VALUES),
    "datatype": st.one_of(st.sampled_from([*DATATYPES, "BF16", "fp32"]), JSON_VALUES),
    "shape": st.one_of(st.lists(st.integers(-2, 2**63), max_size=70), JSON_VALUES),
    "data": JSON_VALUES,
    "parameters": st.one_of(st.none(), st.fixed_dictionaries({"binary_data_size": JSON_VALUES})),
}


def json_request(**tensor: object) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


@STRICT
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_decoding_any_json_tensor_raises_only_invalid_input(tensor: dict[str, object]) -> None:
    outcome = decode_or_error(json_request(**tensor))
    if isinstance(outcome, InvalidInput):
        assert len(outcome.message) < 1500  # bounded whatever the client sent
        return
    (arr,) = outcome.inputs.values()
    assert list(arr.shape) == tensor["shape"]
    assert arr.dtype == DATATYPES[str(tensor["datatype"])]


def decode_or_error(body: bytes) -> InferRequest | InvalidInput:
    try:
        return decode_infer_request(body, None)
    except InvalidInput as exc:
        return exc


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("FP32", ["1.5"], 'FP32 data must be JSON numbers, found a string ("1.5")'),
        ("FP64", [None], "FP64 data must be JSON numbers, found null (null)"),
        ("FP16", [True], "FP16 data must be JSON numbers, found true/false (true)"),
        ("FP16", [70000.0], "a value in 'data' is out of range for FP16"),
        ("INT32", [1.9], "INT32 data must be JSON integers, found a floating-point number (1.9)"),
        ("INT64", [1.0], "INT64 data must be JSON integers, found a floating-point number (1.0)"),
        ("INT8", [False], "INT8 data must be JSON integers, found true/false (false)"),
        ("UINT32", [-1], "a value in 'data' is out of range for UINT32"),
        ("UINT64", [2**64], "UINT64 data must be JSON integers, found a floating-point number"),  # orjson: a float
        ("BOOL", [1], "BOOL data must be true or false, found an integer (1)"),
        ("BYTES", [{"b64": "AA=="}], 'BYTES data must be strings, found an object ({"b64":"AA=="})'),
        ("INT64", [[1, 2], [3]], "'data' is a ragged nested list"),
        ("INT64", 7, "'data' must be a list, got an integer"),
    ],
)
def test_json_data_is_never_coerced(datatype: str, data: object, needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(json_request(name="x", datatype=datatype, shape=[1], data=data), None)
    assert f"input 'x': {needle}" in info.value.message


@pytest.mark.parametrize(
    ("datatype", "data", "want"),
    [
        ("FP32", [1, 2.5], np.array([1.0, 2.5], np.float32)),  # a JSON integer is a number
        ("UINT64", [2**64 - 1, 0], np.array([2**64 - 1, 0], np.uint64)),
        ("INT8", [-128, 127], np.array([-128, 127], np.int8)),
        ("BOOL", [True, False], np.array([True, False])),
    ],
)
def test_json_data_of_the_right_type_decodes_exactly(datatype: str, data: list[object], want: np.ndarray) -> None:
    got = decode_infer_request(json_request(name="x", datatype=datatype, shape=[2], data=data), None).inputs["x"]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("datatype", ["FP32"], "input 'x': unsupported datatype ['FP32']"),
        ("datatype", "x" * 1000, "unsupported datatype 'xxxxxxxx"),
        ("shape", [1] * 65, "shape has 65 dimensions, above the limit of 64"),
        ("shape", [0, 2**41], "has a dimension too large to represent"),
        ("shape", [0, 2**20, 2**20, 2**20], "has a dimension too large to represent"),
        ("name", "n" * 1025, "above the limit of 1024 characters"),
    ],
)
def test_fields_out_of_bounds_are_refused_with_a_bounded_message(field: str, value: object, needle: str) -> None:
    tensor: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": [0], "data": [], field: value}
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(json_request(**tensor), None)
    assert needle in info.value.message
    assert len(info.value.message) < 300


@pytest.mark.parametrize(("shape", "data"), [([1] * 64, [0.5]), ([0, 2**40], [])])
def test_the_largest_shapes_allowed_still_decode(shape: list[int], data: list[float]) -> None:
    decoded = decode_infer_request(json_request(name="x", datatype="FP32", shape=shape, data=data), None)
    assert list(decoded.inputs["x"].shape) == shape


def binary_bytes_request(name: str, elements: list[bytes]) -> tuple[bytes, int]:
    blob = b"".join(len(e).to_bytes(4, "little") + e for e in elements)
    tensor = {
        "name": name,
        "datatype": "BYTES",
        "shape": [len(elements)],
        "parameters": {"binary_data_size": len(blob)},
    }
    header = json_request(**tensor)
    return header + blob, len(header)


@STRICT
@given(st.lists(st.binary(max_size=20), max_size=8))
def test_binary_bytes_round_trip_exactly(elements: list[bytes]) -> None:
    body, length = binary_bytes_request("w", elements)
    decoded = decode_infer_request(body, length).inputs["w"]
    assert decoded.dtype == np.object_ and decoded.tolist() == elements
    encoded, header = encode_infer_response(
        model_name="m", model_version="1", request_id=None, outputs=[("w", "BYTES", decoded, True)]
    )
    assert header is not None and encoded[header:] == body[length:]


@STRICT
@given(st.lists(st.text(max_size=10), max_size=8))
def test_json_strings_reach_onnx_runtime_as_the_same_text(words: list[str]) -> None:
    raw = json_request(name="w", datatype="BYTES", shape=[len(words)], data=words)
    decoded = decode_infer_request(raw, None).inputs["w"]
    assert decoded.tolist() == [w.encode() for w in words]
    assert to_ort_strings("w", decoded).tolist() == words
    body, _ = encode_infer_response(
        model_name="m", model_version="1", request_id=None, outputs=[("w", "BYTES", np.array(words, np.object_), False)]
    )
    assert json.loads(body)["outputs"][0]["data"] == words


def test_bytes_that_are_not_utf8_are_refused_naming_the_element() -> None:
    with pytest.raises(InvalidInput, match=r"input 'w': element 2 is not valid UTF-8"):
        to_ort_strings("w", np.array([b"ok", "λ".encode(), b"\xc3"], np.object_))


@STRICT
@given(st.lists(st.floats(width=32), min_size=1, max_size=12), st.sampled_from(["FP16", "FP32", "FP64"]))
def test_json_float_outputs_keep_nan_and_infinities(values: list[float], datatype: str) -> None:
    with np.errstate(over="ignore"):  # float32 values beyond FP16 become infinities, which is fine here
        arr = np.array(values, DATATYPES[datatype])
    body, _ = encode_infer_response(
        model_name="m", model_version="1", request_id=None, outputs=[("y", datatype, arr, False)]
    )
    assert b"null" not in body
    got = np.array(json.loads(body)["outputs"][0]["data"], DATATYPES[datatype])  # Python reads NaN, Infinity
    np.testing.assert_array_equal(got, arr)


# --- ONNX Runtime's errors, as it really raises them -------------------------------------------------------


@pytest.fixture(scope="module")
def ort_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseException]:
    """The exceptions ONNX Runtime raises for bad values, collected by running it."""
    root = tmp_path_factory.mktemp("ort")
    runs = {
        "gather": (lookup_model(root / "l.onnx"), {"idx": np.array([[VOCAB]], np.int64)}),
        "broadcast": (
            unshared_add_model(root / "u.onnx"),
            {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 4), np.float32)},
        ),
        "rank": (
            two_io_model(root / "t.onnx"),
            {"a": np.ones((1, 3, 1), np.float32), "b": np.ones((1, 3), np.float32)},
        ),
    }
    errors: dict[str, BaseException] = {}
    for key, (path, feeds) in runs.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with pytest.raises((ort_state.InvalidArgument, ort_state.Fail)) as info:
            session.run(None, feeds)
        errors[key] = info.value
    return errors


@pytest.mark.parametrize(
    ("key", "kind", "message"),
    [
        (
            "gather",
            "InvalidArgument",
            "input 'idx' was rejected by the model: Gather node: indices element out of data bounds, idx=10 must be "
            "within the inclusive range [-10,9]",
        ),
        (
            "broadcast",
            "Fail",
            "inputs 'a', 'b' were rejected by the model: Add node: Attempting to broadcast an axis by a dimension "
            "other than 1. 3 by 4",
        ),
        (
            "rank",
            "InvalidArgument",
            "input 'a' was rejected by the model: Invalid rank for input: a Got: 3 Expected: 2 Please fix either "
            "the inputs/outputs or the model.",
        ),
    ],
)
def test_onnx_runtime_value_errors_become_clean_400s(
    ort_errors: dict[str, BaseException], key: str, kind: str, message: str
) -> None:
    exc = ort_errors[key]
    assert type(exc).__name__ == kind
    assert is_input_error(exc)
    assert input_error(exc, ["a", "b"] if key != "gather" else ["idx"]).message == message


def test_other_failures_stay_server_faults() -> None:
    fail = type("Fail", (Exception,), {"__module__": "onnxruntime.capi.onnxruntime_pybind11_state"})
    runtime = type("RuntimeException", (Exception,), {"__module__": "onnxruntime.capi.onnxruntime_pybind11_state"})
    assert not is_input_error(
        fail("Non-zero status code returned while running MatMul node. Failed to allocate memory")
    )
    assert not is_input_error(runtime("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory"))
    assert not is_input_error(fail("[ONNXRuntimeError] : 1 : FAIL : Load model from x failed"))
    assert not is_input_error(ValueError("Non-zero status code returned while running Gather node"))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape node. Name:'r1' "
            "Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/reshape_helper.h:47 "
            "onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::TensorShape&, "
            "onnxruntime::TensorShapeVector&, bool) input_shape_size == size was false. "
            "The input tensor cannot be reshaped to the requested shape. Input shape:{1,3}, requested shape:{4}\n",
            "Reshape node 'r1': The input tensor cannot be reshaped to the requested shape. Input shape:{1,3}, "
            "requested shape:{4}",
        ),
        ("loading /home/user/models/secret/model.onnx failed", "loading <path> failed"),
        ("x" * 1000, "x" * MESSAGE_LIMIT + "..."),
    ],
)
def test_onnx_runtime_messages_lose_paths_and_signatures(raw: str, clean: str) -> None:
    assert clean_ort_message(raw) == clean


# --- a bad request in a batch fails alone ------------------------------------------------------------------


def run_batcher(
    infer: InferFn, rows: list[float], *, inline: bool, delay_s: float = 3600.0, max_batch: int | None = None
) -> list[dict[str, np.ndarray] | BaseException]:
    async def scenario() -> list[dict[str, np.ndarray] | BaseException]:
        config = BatcherConfig(
            max_batch_size=max_batch or len(rows),
            preferred_batch_sizes=frozenset(),
            max_queue_delay_s=delay_s,
            max_queue_size=0,
            instances=1,
            batched=True,
            inline=inline,
        )
        batcher = Batcher(infer=infer, input_names=("x",), config=config, observer=observer)
        futures = [batcher.submit({"x": np.full((1, 1), r, np.float32)}, 1, (), None) for r in rows]
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=60)
        await batcher.close()
        return results

    observer = RecordingObserver()
    results = asyncio.run(scenario())
    run_batcher.observed = observer.batches  # type: ignore[attr-defined]
    return results


class RecordingObserver(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[int] = []

    def computed(self, batch_size: int, seconds: float) -> None:
        self.batches.append(batch_size)


def no_negatives(calls: list[int]) -> InferFn:
    def infer(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise InvalidInput("input 'x' was rejected by the model: negative")
        return {"y": inputs["x"] * 2}

    return infer


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
def test_a_value_error_retries_the_batch_one_request_at_a_time(inline: bool) -> None:
    calls: list[int] = []
    rows = [1.0, 2.0, -3.0, 4.0, -5.0, 6.0]
    results = run_batcher(no_negatives(calls), rows, inline=inline)
    for row, result in zip(rows, results, strict=True):
        if row < 0:
            assert isinstance(result, InvalidInput) and "input 'x'" in result.message
        else:
            assert isinstance(result, dict)
            assert result["y"].tolist() == [[row * 2]]
    assert calls == [6, 1, 1, 1, 1, 1, 1]
    assert run_batcher.observed == [1, 1, 1, 1]  # type: ignore[attr-defined]


def test_a_valid_batch_is_computed_once() -> None:
    calls: list[int] = []
    results = run_batcher(no_negatives(calls), [1.0, 2.0, 3.0], inline=True)
    assert [r["y"].tolist() for r in results if isinstance(r, dict)] == [[[2.0]], [[4.0]], [[6.0]]]
    assert calls == [3]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
def test_without_a_queue_delay_requests_that_arrive_together_share_a_batch(inline: bool) -> None:
    # Handlers that run in the same loop iteration (requests read together) submit one after another; a
    # batch computed at the first submit would leave each overhead-bound request to compute alone.
    calls: list[int] = []
    results = run_batcher(no_negatives(calls), [1.0, 2.0, 3.0], inline=inline, delay_s=0.0, max_batch=8)
    assert [r["y"].tolist() for r in results if isinstance(r, dict)] == [[[2.0]], [[4.0]], [[6.0]]]
    assert calls == [3]


def test_a_server_fault_fails_the_whole_batch_without_a_retry() -> None:
    calls: list[int] = []

    def broken(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        raise RuntimeError("device lost")

    results = run_batcher(broken, [1.0, 2.0, 3.0], inline=False)
    assert all(isinstance(r, BackendError) and "batch of 3 requests (3 items) failed" in r.message for r in results)
    assert calls == [3]


def test_named_dimensions_must_agree_across_inputs() -> None:
    sig = ModelSignature(
        inputs=(
            TensorSpec("ids", "INT64", (-1, -1), ("batch", "seq")),
            TensorSpec("mask", "INT64", (-1, -1), ("batch", "seq")),
            TensorSpec("extra", "INT64", (-1, -1), ("batch", None)),
        ),
        outputs=(),
        max_batch_size=8,
    )
    ok = {"ids": np.zeros((2, 5), np.int64), "mask": np.zeros((2, 5), np.int64), "extra": np.zeros((2, 9), np.int64)}
    assert validate_inputs(ok, sig) == 2
    with pytest.raises(InvalidInput) as info:
        validate_inputs({**ok, "mask": np.zeros((2, 4), np.int64)}, sig)
    assert info.value.message == (
        "input 'mask' has 4 along axis 1 but input 'ids' has 5 along axis 1; the model names both 'seq', "
        "so they must be equal"
    )


# --- the queue bounded in time ----------------------------------------------------------------------------


def test_the_queue_is_bounded_by_the_time_its_work_takes_but_always_holds_two_full_batches() -> None:
    from modelfleet_runtime.dataplane import DataPlane

    gate = threading.Event()
    held = threading.Event()

    def slow(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if held.is_set():
            gate.wait(timeout=120)  # hold the running batch so the rest queue behind it
        else:
            threading.Event().wait(0.02)  # the first batch: at least 10 ms per item
        return {"y": inputs["x"]}

    async def scenario() -> None:
        config = BatcherConfig(
            max_batch_size=2,
            preferred_batch_sizes=frozenset(),
            max_queue_delay_s=3600.0,
            max_queue_size=0,
            instances=1,
            batched=True,
        )
        batcher = Batcher(infer=slow, input_names=("x",), config=config)
        settings = ServeSettings(model=Path("m.onnx"), name="m", max_queue_wait_microseconds=40_000)
        dp = DataPlane(settings=settings, metrics=Metrics("m"))
        dp._batcher = batcher

        def one() -> asyncio.Future[dict[str, np.ndarray]]:
            return batcher.submit({"x": np.zeros((1, 1), np.float32)}, 1, (), None)

        assert batcher.queued_seconds() == 0.0  # no batch has run: no estimate yet
        await asyncio.wait_for(asyncio.gather(one(), one()), timeout=60)
        held.set()
        running = [one(), one()]  # a full batch: dispatched at the end of this loop iteration, held by the gate
        await asyncio.sleep(0)
        queued = [one() for _ in range(3)]
        assert batcher.queue_depth == 3
        assert batcher.queued_seconds() >= 0.03  # 3 items at >= 10 ms: over the 40 ms bound...
        assert dp.queue_refusal() is None  # ...but fewer than two full batches (4 items) are queued
        queued.append(one())
        refusal = dp.queue_refusal()
        assert refusal is not None
        assert "the 4 requests waiting take about" in refusal
        assert "(maxQueueWait 40 ms)" in refusal
        gate.set()
        await asyncio.wait_for(asyncio.gather(*running, *queued), timeout=60)
        assert dp.queue_refusal() is None
        await batcher.close()

    asyncio.run(scenario())
