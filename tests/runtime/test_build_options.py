"""Build options round-trip through `to_args()`, and the cache key moves with every input and only those."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from modelfleet_runtime.build import InvalidOptions
from modelfleet_runtime.build.key import engine_key, key_material, normalize_architecture
from modelfleet_runtime.build.options import (
    AccuracyGate,
    BatchProfile,
    BuildOptions,
    Calibration,
    Evaluation,
    OnnxRuntimeOptions,
    ShapeRange,
    TensorRTOptions,
    parse_options,
)

DIGEST = "a" * 64
OTHER_DIGEST = "b" * 64


def full_options() -> BuildOptions:
    return BuildOptions(
        backend="tensorrt",
        precision="int8",
        batch=BatchProfile(min=2, opt=8, max=64),
        shapes={
            "input_ids": ShapeRange(min=(16,), opt=(128,), max=(256,)),
            "image:0": ShapeRange(min=(3, 224, 224), opt=(3, 256, 256), max=(3, 512, 512)),
            "-odd=name": ShapeRange(min=(1,), opt=(1,), max=(1,)),
        },
        calibration=Calibration(path="-data/calib set.npz", sha256="C" * 64),
        accuracy=AccuracyGate(
            max_abs_error=0.1,
            max_rel_error=1e-7,
            min_top1_agreement=0.995,
            samples=256,
            evaluation=Evaluation(path="-data/eval set.npz", sha256="E" * 64),
            max_accuracy_drop=0.0,
            evaluation_output="-logits:0",
        ),
        tensorrt=TensorRTOptions(builder_optimization_level=5, workspace_mib=4096),
        onnxruntime=OnnxRuntimeOptions(quantization="static"),
    )


@pytest.mark.parametrize(
    "options",
    [
        BuildOptions(),
        full_options(),
        BuildOptions(backend="onnxruntime", precision="fp16"),
        BuildOptions(accuracy=AccuracyGate(evaluation=Evaluation(path="e.npz"), max_accuracy_drop=0.01)),
    ],
    ids=["defaults", "everything", "partial", "evaluation-without-digest"],
)
def test_to_args_parses_back_to_the_same_options(options: BuildOptions) -> None:
    assert parse_options(options.to_args()) == options


@settings(max_examples=60, deadline=None)
@given(
    batch=st.tuples(st.integers(1, 64), st.integers(0, 64), st.integers(0, 64)),
    threshold=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    top1=st.floats(min_value=0, max_value=1),
    dims=st.lists(st.integers(1, 4096), min_size=1, max_size=3),
    name=st.text(st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=12),
)
def test_round_trip_holds_for_any_valid_values(batch, threshold, top1, dims, name) -> None:
    low, extra_opt, extra_max = batch
    options = BuildOptions(
        batch=BatchProfile(min=low, opt=low + extra_opt, max=low + extra_opt + extra_max),
        shapes={name: ShapeRange(min=tuple(dims), opt=tuple(dims), max=tuple(d * 2 for d in dims))},
        accuracy=AccuracyGate(max_abs_error=threshold, min_top1_agreement=top1),
    )
    assert parse_options(options.to_args()) == options


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--batch-min", "8", "--batch-opt", "4"], "min <= opt <= max"),
        (["--shape", "x=16:8:32"], "axis 1"),
        (["--shape", "x=16:8"], "NAME=MIN:OPT:MAX"),
        (["--shape", "x=a:b:c"], "--shape"),
        (["--min-top1-agreement", "1.5"], "min_top1_agreement"),
        (["--max-abs-error", "-1"], "max_abs_error"),
        (["--calibration-sha256", "ab"], "needs --calibration"),
        (["--calibration", "c.npz", "--calibration-sha256", "xyz"], "sha256"),
        (["--precision", "int8", "--ort-quantization", "static"], "calibration"),
        (["--trt-optimization-level", "9"], "builder_optimization_level"),
        (["--shape", "x=1:2:3", "--shape", "x=1:2:3"], "twice"),
        (["--max-accuracy-drop", "2"], "max_accuracy_drop"),
        (["--max-accuracy-drop", "-0.1"], "max_accuracy_drop"),
        (["--evaluation-sha256", "ab"], "needs --evaluation"),
        (["--evaluation", "e.npz", "--evaluation-sha256", "xyz"], "sha256"),
    ],
)
def test_invalid_flags_give_an_error_naming_the_field(argv: list[str], needle: str) -> None:
    with pytest.raises(InvalidOptions, match=None) as info:
        parse_options(argv)
    assert needle in str(info.value)


def key(**changes: object) -> str:
    args: dict[str, object] = {
        "model_digest": DIGEST,
        "options": BuildOptions(backend="onnxruntime"),
        "architecture": "sm80",
        "backend_version": "1.31.1",
    }
    args.update(changes)
    return engine_key(**args)  # type: ignore[arg-type]


def test_key_is_stable_for_the_same_inputs() -> None:
    assert key() == key()
    assert len(key()) == 64
    # A fresh, equal options object and an equivalent digest/architecture spelling give the same key.
    same = key(
        options=BuildOptions.model_validate({"backend": "onnxruntime"}),
        model_digest="sha256:" + DIGEST.upper(),
        architecture="SM_80",
    )
    assert same == key()


@pytest.mark.parametrize(
    "changes",
    [
        {"model_digest": OTHER_DIGEST},
        {"architecture": "sm90"},
        {"architecture": "cpu"},
        {"backend_version": "1.31.2"},
        {"options": BuildOptions(backend="tensorrt")},
        {"options": BuildOptions(backend="onnxruntime", precision="fp16")},
        {"options": BuildOptions(backend="onnxruntime", batch=BatchProfile(min=1, opt=8, max=32))},
        {"options": BuildOptions(backend="onnxruntime", shapes={"x": ShapeRange(min=(1,), opt=(2,), max=(3,))})},
        {"options": BuildOptions(backend="onnxruntime", calibration=Calibration(path="c.npz", sha256=DIGEST))},
        {"options": BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(max_abs_error=0.5))},
        {"options": BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(samples=65))},
    ],
)
def test_each_input_changes_the_key(changes: dict[str, object]) -> None:
    assert key(**changes) != key()


def test_key_ignores_what_does_not_shape_the_artifact() -> None:
    # The calibration path (its digest counts), knobs of the other backend, and a gate spelled with
    # its precision defaults.
    with_path = BuildOptions(backend="onnxruntime", calibration=Calibration(path="/a/c.npz", sha256=DIGEST))
    other_path = BuildOptions(backend="onnxruntime", calibration=Calibration(path="/b/d.npz", sha256=DIGEST))
    assert key(options=with_path) == key(options=other_path)
    assert key(options=BuildOptions(backend="onnxruntime", tensorrt=TensorRTOptions(workspace_mib=64))) == key()
    explicit = BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(max_rel_error=1e-3, min_top1_agreement=0.99))
    assert key(options=explicit) == key()


def test_tensorrt_knobs_change_a_tensorrt_key() -> None:
    base = BuildOptions(backend="tensorrt")
    tuned = BuildOptions(backend="tensorrt", tensorrt=TensorRTOptions(builder_optimization_level=5))
    assert key(options=base) != key(options=tuned)


def test_key_needs_resolved_backend_and_calibration_digest() -> None:
    with pytest.raises(ValueError, match="auto"):
        key(options=BuildOptions())
    with pytest.raises(ValueError, match="calibration"):
        key(options=BuildOptions(backend="onnxruntime", calibration=Calibration(path="c.npz")))
    with pytest.raises(ValueError, match="sha256"):
        key(model_digest="not-a-digest")
    with pytest.raises(ValueError, match="architecture"):
        key(architecture="ampere")


def test_key_material_is_canonical_json() -> None:
    material = key_material(model_digest=DIGEST, options=full_options(), architecture="sm89", backend_version="10.13.0")
    assert '"architecture":"sm89"' in material
    assert "calib set.npz" not in material  # the path is not content
    assert normalize_architecture("8.9") == "sm89"


def test_a_non_ascii_tensor_name_is_escaped_into_the_key() -> None:
    # An ONNX input may be named in any script; the material stays ASCII, so the build Job (any locale) and
    # the operator hash the same bytes.
    options = BuildOptions(backend="onnxruntime", shapes={"größe": ShapeRange(min=(1,), opt=(2,), max=(3,))})
    material = key_material(model_digest=DIGEST, options=options, architecture="sm89", backend_version="1.32.0")
    assert "gr\\u00f6\\u00dfe" in material and material.isascii()
    assert len(key(options=options)) == 64


def test_operator_side_modules_import_without_onnx_numpy_or_tensorrt() -> None:
    code = (
        "import sys\n"
        "import modelfleet_runtime.build, modelfleet_runtime.build.options, modelfleet_runtime.build.key\n"
        "heavy = sorted(m for m in ('onnx', 'onnxruntime', 'numpy', 'tensorrt') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_onnxruntime_int8_settings_are_in_the_key_by_name() -> None:
    # The quantization scheme (weight type, granularity) shapes the int8 artifact: another scheme must be
    # another key, so an artifact quantized with old settings is never served as a hit.
    dynamic = BuildOptions(backend="onnxruntime", precision="int8")
    assert dynamic.normalized()["onnxruntime"] == {"quantization": "dynamic", "scheme": "dynamic-u8u8-per-channel"}
    static = BuildOptions(
        backend="onnxruntime",
        precision="int8",
        calibration=Calibration(path="c.npz", sha256=DIGEST),
        onnxruntime=OnnxRuntimeOptions(quantization="static"),
    )
    assert static.normalized()["onnxruntime"] == {"quantization": "static", "scheme": "static-qdq-u8u8-per-channel"}
    assert key(options=dynamic) != key(options=dynamic.model_copy(update={"onnxruntime": static.onnxruntime}))
    assert BuildOptions(backend="tensorrt", precision="int8").normalized()["onnxruntime"] is None
    assert BuildOptions(backend="onnxruntime", precision="fp32").normalized()["onnxruntime"] is None


def test_a_gate_left_unset_takes_the_precisions_defaults_into_the_key() -> None:
    int8 = BuildOptions(backend="onnxruntime", precision="int8").normalized()["accuracy"]
    assert int8 == {"max_abs_error": None, "max_rel_error": 0.2, "min_top1_agreement": 0.98, "samples": 256}
    fp32 = BuildOptions(backend="onnxruntime").normalized()["accuracy"]
    assert fp32 == {"max_abs_error": None, "max_rel_error": 1e-3, "min_top1_agreement": 0.99, "samples": 64}


# Golden keys of KEY_SCHEMA 2 (precision through the model; before it, at 42f48bf, "defaults" was 7619265...
# and "int8-tensorrt" f533add...). Specs without evaluation data keep them. A change here means every engine
# in every store is rebuilt: make it only with a KEY_SCHEMA bump.
KEYS_BEFORE_THE_LABELED_GATE = {
    "defaults": "95ebe3bbf47d6e343b6ecc4763041089a9226c65e03d262f23513a5784fb1d4c",
    "int8-tensorrt": "b0c27da4684069493812681c1905a8c78e56c5738134cf5a55c28e90be338d8f",
}


def test_specs_without_evaluation_data_keep_their_keys() -> None:
    int8 = BuildOptions(
        backend="tensorrt",
        precision="int8",
        calibration=Calibration(path="c.npz", sha256=DIGEST),
        accuracy=AccuracyGate(max_abs_error=0.5, samples=100),
    )
    assert key() == KEYS_BEFORE_THE_LABELED_GATE["defaults"]
    assert key(options=int8) == KEYS_BEFORE_THE_LABELED_GATE["int8-tensorrt"]
    # The drop alone gates nothing without evaluation data: no new key.
    assert key(options=BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(max_accuracy_drop=0.02))) == key()


def evaluated(path: str = "/a/e.npz", digest: str = DIGEST, **gate: object) -> BuildOptions:
    evaluation = Evaluation(path=path, sha256=digest)
    return BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(evaluation=evaluation, **gate))


def test_the_labeled_gate_enters_the_key_by_digest_drop_and_output() -> None:
    assert key(options=evaluated()) != key()
    assert key(options=evaluated(path="/b/other-name.npz")) == key(options=evaluated())  # the path is not content
    assert key(options=evaluated(digest=OTHER_DIGEST)) != key(options=evaluated())
    assert key(options=evaluated(max_accuracy_drop=0.01)) != key(options=evaluated())
    assert key(options=evaluated(max_accuracy_drop=0.005)) == key(options=evaluated())  # the default, spelled out
    assert key(options=evaluated(evaluation_output="logits")) != key(options=evaluated())
    assert evaluated().normalized()["evaluation"] == {"sha256": DIGEST, "max_accuracy_drop": 0.005, "output": None}


def test_key_needs_the_evaluation_digest() -> None:
    undigested = BuildOptions(backend="onnxruntime", accuracy=AccuracyGate(evaluation=Evaluation(path="e.npz")))
    with pytest.raises(ValueError, match="evaluation"):
        key(options=undigested)
    assert key(options=undigested.with_evaluation_digest("sha256:" + DIGEST.upper())) == key(options=evaluated())


# One golden engine key per backend and precision (model "a"*64, sm80, backend version 1.0). Changing any of
# these means every engine in every store is rebuilt: make it only with a KEY_SCHEMA bump.
CALIBRATED = Calibration(path="c.npz", sha256="c" * 64)
GOLDEN_KEYS: dict[str, tuple[BuildOptions, str]] = {
    "onnxruntime-fp32": (
        BuildOptions(backend="onnxruntime", precision="fp32"),
        "71556d468284cf323e276ffe2aa5bbde65bfee983dcd8114c25827c86ebaace1",
    ),
    "onnxruntime-fp16": (
        BuildOptions(backend="onnxruntime", precision="fp16"),
        "bd2d1b5959376dc9c3b28bae9491246f559d4cb70234185fbc4bbe2fcd398f18",
    ),
    "onnxruntime-int8-dynamic": (
        BuildOptions(backend="onnxruntime", precision="int8"),
        "dc790f938bbe5241802aad2cd6d533a30db3c21e43b7e06a677f71f0ec226f2c",
    ),
    "onnxruntime-int8-static": (
        BuildOptions(
            backend="onnxruntime",
            precision="int8",
            calibration=CALIBRATED,
            onnxruntime=OnnxRuntimeOptions(quantization="static"),
        ),
        "d4e49faa6bd593974c9d85adf75465ce1f97b49d151bcf9ec7482677a0f15c4e",
    ),
    "onnxruntime-int8-qdq": (
        BuildOptions(
            backend="onnxruntime",
            precision="int8",
            calibration=CALIBRATED,
            onnxruntime=OnnxRuntimeOptions(quantization="qdq"),
        ),
        "8cc6ce80ca3470ef6c795c59eade34b768bdf827677d86589115a07b54496659",
    ),
    "onnxruntime-fp8": (
        BuildOptions(backend="onnxruntime", precision="fp8", calibration=CALIBRATED),
        "a829167b69f58e3562eabc831cec8a52cd0cb44615e3465834b80e90b760bd07",
    ),
    "tensorrt-fp32": (
        BuildOptions(backend="tensorrt", precision="fp32"),
        "94be13606fb72e5c117242003116edcfbf499d9d1fde15f548128c1ea4bcdfa3",
    ),
    "tensorrt-fp16": (
        BuildOptions(backend="tensorrt", precision="fp16"),
        "8daf63c74e572605952784d3cc34eca323fd9bc2a36c65a7ae1cfd0964192e7f",
    ),
    "tensorrt-int8": (
        BuildOptions(backend="tensorrt", precision="int8", calibration=CALIBRATED),
        "05fc7b1d7c084b0ba6db962fd62fdad7ed50285f37a26c6331ff844ecaf1c20e",
    ),
    "tensorrt-fp8": (
        BuildOptions(backend="tensorrt", precision="fp8", calibration=CALIBRATED),
        "f28016e1d8980c1b0329b9a1986037fb2b85abb9218cf6d4b8289c961c0dcf0f",
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_KEYS))
def test_each_backend_and_precision_keeps_its_engine_key(case: str) -> None:
    options, golden = GOLDEN_KEYS[case]
    assert key(options=options, backend_version="1.0") == golden


def test_onnxruntime_quantization_settings_enter_only_an_onnxruntime_int8_key() -> None:
    static = OnnxRuntimeOptions(quantization="static")
    for base in [
        BuildOptions(backend="tensorrt", precision="int8", calibration=CALIBRATED),
        BuildOptions(backend="onnxruntime", precision="fp16", calibration=CALIBRATED),
        BuildOptions(backend="onnxruntime", precision="fp32", calibration=CALIBRATED),
    ]:
        assert key(options=base) == key(options=base.model_copy(update={"onnxruntime": static}))
    int8 = BuildOptions(backend="onnxruntime", precision="int8", calibration=CALIBRATED)
    assert key(options=int8) != key(options=int8.model_copy(update={"onnxruntime": static}))


# Each bound a manifest can reach, at its edge (accepted) and one step past it (refused).
EDGES: list[tuple[type[BaseModel], dict[str, Any], dict[str, Any]]] = [
    (ShapeRange, {"min": (1,), "opt": (1,), "max": (1,)}, {"min": (0,), "opt": (1,), "max": (1,)}),
    (ShapeRange, {"min": (1, 2), "opt": (2, 2), "max": (3, 2)}, {"min": (1, 2), "opt": (2,), "max": (3, 2)}),
    (ShapeRange, {"min": (2,), "opt": (2,), "max": (2,)}, {"min": (2,), "opt": (3,), "max": (2,)}),
    (ShapeRange, {"min": (2,), "opt": (2,), "max": (2,)}, {"min": (3,), "opt": (2,), "max": (2,)}),
    (ShapeRange, {"min": (1,), "opt": (1,), "max": (1,)}, {"min": (), "opt": (), "max": ()}),
    (BatchProfile, {"min": 1, "opt": 1, "max": 1}, {"min": 0, "opt": 1, "max": 1}),
    (AccuracyGate, {"max_abs_error": 0.0, "max_rel_error": 0.0}, {"max_abs_error": -0.1}),
    (AccuracyGate, {"max_rel_error": 0.0}, {"max_rel_error": -0.1}),
    (AccuracyGate, {"min_top1_agreement": 0.0}, {"min_top1_agreement": -0.1}),
    (AccuracyGate, {"min_top1_agreement": 1.0}, {"min_top1_agreement": 1.1}),
    (AccuracyGate, {"samples": 1}, {"samples": 0}),
    (AccuracyGate, {"samples": 100_000}, {"samples": 100_001}),
    (AccuracyGate, {"max_accuracy_drop": 0.0}, {"max_accuracy_drop": -0.1}),
    (AccuracyGate, {"max_accuracy_drop": 1.0}, {"max_accuracy_drop": 1.1}),
    (AccuracyGate, {"evaluation_output": "y"}, {"evaluation_output": ""}),
    (TensorRTOptions, {"builder_optimization_level": 0}, {"builder_optimization_level": -1}),
    (TensorRTOptions, {"builder_optimization_level": 5}, {"builder_optimization_level": 6}),
    (TensorRTOptions, {"workspace_mib": 1}, {"workspace_mib": 0}),
    (Calibration, {"path": "c"}, {"path": ""}),
]


@pytest.mark.parametrize(("model", "edge", "past"), EDGES, ids=[f"{m.__name__}-{sorted(p)}" for m, _, p in EDGES])
def test_each_bound_accepts_its_edge_and_refuses_one_step_past(
    model: type[BaseModel], edge: dict[str, Any], past: dict[str, Any]
) -> None:
    model.model_validate(edge)
    with pytest.raises(ValidationError, match=next(iter(past))):  # the message names the field
        model.model_validate(past)


def test_options_read_from_a_manifest_give_the_key_literals_give() -> None:
    # Strings parsed from JSON are new objects, not the interned literals of the source.
    import json

    text = json.dumps({"backend": "tensorrt", "precision": "fp16", "tensorrt": {"builder_optimization_level": 5}})
    parsed = BuildOptions.model_validate(json.loads(text))
    literal = BuildOptions(backend="tensorrt", precision="fp16", tensorrt=TensorRTOptions(builder_optimization_level=5))
    assert key(options=parsed) == key(options=literal)
    assert parsed.normalized()["tensorrt"] == {"builder_optimization_level": 5, "workspace_mib": None}
    with pytest.raises(ValueError, match="auto"):
        BuildOptions.model_validate(json.loads('{"backend": "auto"}')).normalized()


def test_a_digest_needs_data_to_attach_to() -> None:
    with pytest.raises(ValueError, match="evaluation"):
        BuildOptions().with_evaluation_digest(DIGEST)
    with pytest.raises(ValueError, match="calibration"):
        BuildOptions().with_calibration_digest(DIGEST)
    attached = BuildOptions(accuracy=AccuracyGate(evaluation=Evaluation(path="e.npz"))).with_evaluation_digest(DIGEST)
    assert attached.accuracy.evaluation is not None and attached.accuracy.evaluation.sha256 == DIGEST
