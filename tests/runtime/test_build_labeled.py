"""The labeled accuracy gate on real labels: scikit-learn's digits, a trained MLP, real ONNX Runtime builds."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelfleet_runtime.build import InvalidOptions, accuracy, labeled
from modelfleet_runtime.build.cli import main
from modelfleet_runtime.build.options import DEFAULT_MAX_ACCURACY_DROP, BatchProfile, BuildOptions
from modelfleet_runtime.build.validate import ModelSpec, TensorSpec, validate_model
from tests.digits import Digits, digits_model, perturbed, train_digits, write_evaluation
from tests.modelzoo import two_io_model

HELD_OUT = 540  # 30 % of the 1797 digits


@pytest.fixture(scope="module")
def digits() -> Digits:
    return train_digits()


@pytest.fixture(scope="module")
def files(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The trained MLP as ONNX and the held-out split as the evaluation .npz."""
    root = tmp_path_factory.mktemp("digits")
    return digits_model(root / "digits.onnx", digits.weights), write_evaluation(root / "eval.npz", digits)


@pytest.fixture(scope="module")
def scored(files: tuple[Path, Path]) -> tuple[TensorSpec, labeled.LabeledSet]:
    """The output the gate scores and the loaded evaluation set, through the module's API."""
    model, evaluation = files
    spec = validate_model(model, options=BuildOptions())
    output = labeled.classifier_output(spec)
    return output, labeled.load_evaluation(evaluation, spec, classes=labeled.class_count(output))


def build(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    term = tmp_path / f"term-{len(list(tmp_path.glob('term-*')))}"
    code = main(["--store", str(tmp_path / "store"), "--termination-log", str(term), *args])
    return code, json.loads(term.read_text())


def published(tmp_path: Path) -> list[Path]:
    store = tmp_path / "store"
    return sorted(p for p in store.iterdir() if not p.name.startswith(".")) if store.exists() else []


def manifest_of(tmp_path: Path, key: str) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "store" / key / "manifest.json").read_text()))


def show(what: str, figures: dict[str, Any]) -> None:
    print(
        f"{what}: reference {figures['referenceAccuracy']:.4f}, engine {figures['accuracy']:.4f}, "
        f"drop {figures['accuracyDrop'] * 100:.2f} points on {figures['samples']} digits"
    )


def test_fp32_build_scores_as_the_reference_and_publishes_the_figures(
    tmp_path: Path, digits: Digits, files: tuple[Path, Path]
) -> None:
    model, evaluation = files
    code, result = build(tmp_path, "--model", str(model), "--evaluation", str(evaluation), "--precision", "fp32")
    assert code == 0, result
    figures = result["accuracy"]["evaluation"]
    show("fp32", figures)
    assert figures["samples"] == HELD_OUT
    assert figures["output"] == "logits"
    assert figures["maxAccuracyDrop"] == DEFAULT_MAX_ACCURACY_DROP
    # The hand-made ONNX graph classifies the held-out digits exactly as scikit-learn's own model does.
    assert figures["referenceAccuracy"] == pytest.approx(digits.sklearn_accuracy)
    assert figures["referenceAccuracy"] > 0.9
    assert figures["accuracy"] == figures["referenceAccuracy"]
    assert figures["accuracyDrop"] == 0
    stored = manifest_of(tmp_path, result["key"])["accuracy"]["evaluation"]
    assert stored == {
        "samples": HELD_OUT,
        "reference_accuracy": figures["referenceAccuracy"],
        "accuracy": figures["accuracy"],
        "accuracy_drop": 0,
        "max_accuracy_drop": DEFAULT_MAX_ACCURACY_DROP,
        "output": "logits",
    }
    again_code, again = build(tmp_path, "--model", str(model), "--evaluation", str(evaluation), "--precision", "fp32")
    assert again_code == 0
    assert again["cacheHit"] is True
    assert again["accuracy"]["evaluation"] == figures


def test_the_evaluation_data_is_part_of_the_key(tmp_path: Path, digits: Digits, files: tuple[Path, Path]) -> None:
    model, evaluation = files
    _, plain = build(tmp_path, "--model", str(model))
    _, labeled_run = build(tmp_path, "--model", str(model), "--evaluation", str(evaluation))
    fewer = write_evaluation(tmp_path / "fewer.npz", digits, pixels=digits.test_x[:100], labels=digits.test_y[:100])
    _, other_data = build(tmp_path, "--model", str(model), "--evaluation", str(fewer))
    assert "evaluation" not in plain["accuracy"]
    assert len({plain["key"], labeled_run["key"], other_data["key"]}) == 3
    assert other_data["accuracy"]["evaluation"]["samples"] == 100


def test_int8_build_is_gated_by_its_real_drop(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, evaluation = files
    args = ["--model", str(model), "--evaluation", str(evaluation), "--precision", "int8"]
    code, result = build(tmp_path, *args)
    figures = result["accuracy"]["evaluation"]
    show(f"int8 dynamic ({result.get('cpuInt8Kernel')})", figures)
    drop = figures["accuracyDrop"]
    assert drop == pytest.approx(figures["referenceAccuracy"] - figures["accuracy"])
    assert (code == 0) == (drop <= DEFAULT_MAX_ACCURACY_DROP)
    assert (code == 8) == (drop > DEFAULT_MAX_ACCURACY_DROP)
    (tmp_path / "strict").mkdir()
    strict_code, strict = build(tmp_path / "strict", *args, "--max-accuracy-drop", "0")
    assert strict["accuracy"]["evaluation"]["accuracyDrop"] == drop  # the same artifact, the same figures
    assert (strict_code == 8) == (drop > 0)
    assert (published(tmp_path / "strict") == []) == (drop > 0)
    if strict_code == 8:
        assert f"a drop of {drop * 100:.2f} points > 0.00" in strict["message"]


def test_an_engine_that_loses_accuracy_is_refused_with_its_figures(
    tmp_path: Path, digits: Digits, files: tuple[Path, Path]
) -> None:
    """Static int8 calibrated on images 20 times too faint: the activation ranges clip real inputs. The
    drift gate compares on that calibration data, where the engine looks fine; real digits show the loss."""
    model, evaluation = files
    faint = tmp_path / "faint.npz"
    np.savez(faint, pixels=(digits.test_x[:128] * 0.05).astype(np.float32))
    code, result = build(
        tmp_path,
        *("--model", str(model), "--evaluation", str(evaluation), "--precision", "int8"),
        *("--ort-quantization", "static", "--calibration", str(faint)),
        # The drift figures are not what this test is about; only the labeled gate may refuse.
        *("--max-rel-error", "1e6", "--min-top1-agreement", "0"),
    )
    figures = result["accuracy"]["evaluation"]
    show("int8 static, miscalibrated", figures)
    print("drift figures on the calibration data:", {k: v for k, v in result["accuracy"].items() if k != "outputs"})
    assert code == 8
    assert result["reason"] == "AccuracyGateFailed"
    assert published(tmp_path) == []
    assert figures["accuracyDrop"] == pytest.approx(figures["referenceAccuracy"] - figures["accuracy"])
    assert figures["accuracyDrop"] > 0.05
    assert result["message"] == (
        f"top-1 accuracy {figures['accuracy']:.4f} on {HELD_OUT} labeled samples, "
        f"{figures['referenceAccuracy']:.4f} for the fp32 reference: "
        f"a drop of {figures['accuracyDrop'] * 100:.2f} points > 0.50; nothing was published"
    )


def test_a_worse_candidate_is_refused_through_the_module_api(
    tmp_path: Path, digits: Digits, files: tuple[Path, Path], scored: tuple[TensorSpec, labeled.LabeledSet]
) -> None:
    model, _ = files
    worse = digits_model(tmp_path / "worse.onnx", perturbed(digits.weights, scale=1.0))  # type: ignore[arg-type]
    output, data = scored
    report = labeled.run_evaluation(
        reference=accuracy.onnxruntime_runner(model, optimize=False),
        candidate=accuracy.onnxruntime_runner(worse, optimize=False),
        data=data,
        output=output,
        batch=BatchProfile(),
        max_accuracy_drop=DEFAULT_MAX_ACCURACY_DROP,
    )
    print(report.message)
    assert report.reference_accuracy == pytest.approx(digits.sklearn_accuracy)
    assert report.accuracy < report.reference_accuracy
    assert report.accuracy_drop == pytest.approx(report.reference_accuracy - report.accuracy)
    assert report.passed is False
    assert f"a drop of {report.accuracy_drop * 100:.2f} points > 0.50" in report.message


def test_every_sample_is_scored_in_batches_the_profile_allows(
    files: tuple[Path, Path], scored: tuple[TensorSpec, labeled.LabeledSet]
) -> None:
    """540 rows in batches of 16 leave 12: with min 13 the last batch is padded, never dropped or undersized."""
    model, _ = files
    output, data = scored
    run = accuracy.onnxruntime_runner(model, optimize=False)
    seen: list[int] = []

    def recording(feeds: accuracy.Feeds) -> dict[str, accuracy.Array]:
        seen.append(next(iter(feeds.values())).shape[0])
        return run(feeds)

    padded = labeled.predictions(recording, data, output=output, batch=BatchProfile(min=13, opt=16, max=32))
    one_by_one = labeled.predictions(run, data, output=output, batch=BatchProfile(min=1, opt=1, max=1))
    assert seen == [16] * 33 + [13]
    assert padded.shape == (HELD_OUT,)
    np.testing.assert_array_equal(padded, one_by_one)


Corrupt = Callable[[Digits], dict[str, Any]]
BROKEN_EVALUATIONS: list[tuple[str, Corrupt, str]] = [
    ("labels-missing", lambda d: {"pixels": d.test_x}, "no 'labels' array"),
    ("labels-float", lambda d: {"pixels": d.test_x, "labels": d.test_y.astype(np.float32)}, "must be integers"),
    ("labels-short", lambda d: {"pixels": d.test_x, "labels": d.test_y[:-1]}, "expected [540]"),
    ("labels-2d", lambda d: {"pixels": d.test_x, "labels": d.test_y[:, None]}, "'labels' has shape [540, 1]"),
    ("labels-out-of-range", lambda d: {"pixels": d.test_x, "labels": d.test_y + 1}, "outside 0..9"),
    ("input-missing", lambda d: {"labels": d.test_y}, "missing ['pixels']"),
    ("input-rank", lambda d: {"pixels": d.test_x[:, :, None], "labels": d.test_y}, "'pixels' has rank 3"),
    ("input-width", lambda d: {"pixels": d.test_x[:, :32], "labels": d.test_y}, "'pixels' axis 1 is 32"),
    ("input-dtype", lambda d: {"pixels": d.test_x.astype(np.complex64), "labels": d.test_y}, "complex64"),
    ("unexpected-array", lambda d: {"pixels": d.test_x, "labels": d.test_y, "extra": d.test_y}, "unexpected"),
]


@pytest.mark.parametrize(
    ("arrays", "needle"), [c[1:] for c in BROKEN_EVALUATIONS], ids=[c[0] for c in BROKEN_EVALUATIONS]
)
def test_a_broken_evaluation_file_is_refused_naming_the_array(
    tmp_path: Path, digits: Digits, files: tuple[Path, Path], arrays: Corrupt, needle: str
) -> None:
    model, _ = files
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays(digits))
    code, result = build(tmp_path, "--model", str(model), "--evaluation", str(broken))
    assert (code, result["reason"]) == (2, "InvalidOptions"), result
    assert needle in result["message"]
    assert "evaluation broken.npz" in result["message"]
    assert published(tmp_path) == []


def test_a_model_without_a_classifier_output_is_refused_naming_its_outputs(tmp_path: Path) -> None:
    model = two_io_model(tmp_path / "two_io.onnx")
    data = tmp_path / "eval.npz"
    np.savez(data, a=np.zeros((4, 16), np.float32), b=np.zeros((4, 16), np.float32), labels=np.zeros(4, np.int64))
    code, result = build(tmp_path, "--model", str(model), "--evaluation", str(data))
    assert (code, result["reason"]) == (2, "InvalidOptions")
    assert "none of the model's outputs qualifies: 'sum' ['batch', 'seq'], 'dot' ['batch', 1]" in result["message"]


def test_the_scored_output_is_the_only_classifier_or_the_one_named() -> None:
    pixels = TensorSpec("pixels", "float32", ("batch", 64))
    outputs = (TensorSpec("logits", "float32", ("batch", 10)), TensorSpec("aux", "float32", ("batch", 4)))
    spec = ModelSpec(opset=17, inputs=(pixels,), outputs=outputs, has_qdq=False, has_fp8=False)
    with pytest.raises(InvalidOptions, match=r"several outputs are classifier-shaped \['logits', 'aux'\]"):
        labeled.classifier_output(spec)
    assert labeled.classifier_output(spec, "aux").name == "aux"
    with pytest.raises(InvalidOptions, match="no such output"):
        labeled.classifier_output(spec, "probabilities")


def test_a_named_output_must_exist_in_the_build(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, evaluation = files
    args = ["--model", str(model), "--evaluation", str(evaluation)]
    code, result = build(tmp_path, *args, "--evaluation-output", "logits")
    assert code == 0
    assert result["accuracy"]["evaluation"]["output"] == "logits"
    code, result = build(tmp_path, *args, "--evaluation-output", "probabilities")
    assert (code, result["reason"]) == (2, "InvalidOptions")
    assert "'probabilities': the model has no such output (outputs: 'logits' ['batch', 10])" in result["message"]


def test_a_prepared_q_dq_model_that_loses_accuracy_is_refused_before_any_build(
    tmp_path: Path, digits: Digits, files: tuple[Path, Path]
) -> None:
    """The same faint calibration through the TensorRT Q/DQ graph (`qdq`): the shared prepare step checks the
    labeled set too, so the refusal comes once, before any architecture's build, and nothing is stored."""
    model, evaluation = files
    faint = tmp_path / "faint.npz"
    np.savez(faint, pixels=(digits.test_x[:128] * 0.05).astype(np.float32))
    code, result = build(
        tmp_path,
        *("--model", str(model), "--evaluation", str(evaluation), "--precision", "int8"),
        *("--ort-quantization", "qdq", "--calibration", str(faint)),
        *("--max-rel-error", "1e6", "--min-top1-agreement", "0"),
    )
    assert (code, result["reason"]) == (8, "AccuracyGateFailed")
    assert result["message"].startswith("the int8 model (prepared once for every architecture, checked on the CPU): ")
    assert re.search(r"a drop of \d+\.\d\d points > 0\.50$", result["message"]), result["message"]
    assert result["effectivePrecision"] is None  # refused before the build step
    assert [p.name for p in published(tmp_path)] == ["prepared"]  # no engine,
    assert [p for p in (tmp_path / "store" / "prepared").iterdir() if not p.name.startswith(".")] == []  # no model


def test_a_prepared_model_records_its_labeled_figures(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, evaluation = files
    code, result = build(
        tmp_path,
        *("--model", str(model), "--evaluation", str(evaluation), "--precision", "fp16"),
        *("--backend", "onnxruntime", "--architecture", "sm80"),
    )
    assert code == 0, result
    prepared = result["prepared"]
    assert prepared["accuracy"] == result["accuracy"]["evaluation"]["accuracy"]  # the fp16 graph is what is served
    assert prepared["accuracyDrop"] == pytest.approx(result["accuracy"]["evaluation"]["accuracyDrop"])
    assert prepared["accuracyDrop"] <= 0.005
