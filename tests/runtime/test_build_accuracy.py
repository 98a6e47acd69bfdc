"""The accuracy gate's figures and verdicts, and the samples it compares."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from modelfleet_runtime.build import InvalidOptions
from modelfleet_runtime.build.accuracy import (
    check_gate,
    compare_outputs,
    gate_batches,
    load_calibration,
    synthetic_feeds,
)
from modelfleet_runtime.build.options import BatchProfile, BuildOptions, ResolvedGate
from modelfleet_runtime.build.validate import validate_model
from tests.modelzoo import FEATURES, classifier_model

GATE = ResolvedGate(max_abs_error=0.1, max_rel_error=0.1, min_top1_agreement=0.9, samples=4)


def test_figures_are_the_worst_over_outputs() -> None:
    ref = {
        "p": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32),
        "e": np.array([[10.0, -20.0]] * 2, np.float32),
    }
    cand = {
        "p": np.array([[0.85, 0.15], [0.6, 0.4]], np.float32),
        "e": np.array([[10.0, -19.0]] * 2, np.float32),
    }
    report = compare_outputs([ref], [cand], classifiers=frozenset({"p"}))
    assert report.samples == 2
    assert report.outputs["p"].max_abs_error == pytest.approx(0.4)
    assert report.outputs["e"].max_rel_error == pytest.approx(1 / 20)  # relative to the output's scale
    assert report.top1_agreement == 0.5
    assert report.outputs["e"].top1_agreement is None
    verdict = check_gate(report, GATE)
    assert not verdict.passed
    assert any("max absolute error 1 > 0.1" in f and "'e'" in f for f in verdict.failures)
    assert any("top-1 agreement 0.5000 < 0.9000" in f for f in verdict.failures)


def test_nan_in_the_candidate_fails_every_threshold() -> None:
    ref = {"y": np.ones((2, 3), np.float32)}
    cand = {"y": np.array([[1, 1, np.nan], [1, 1, 1]], np.float32)}
    report = compare_outputs([ref], [cand], classifiers=frozenset())
    assert math.isinf(report.max_abs_error)
    verdict = check_gate(
        report, ResolvedGate(max_abs_error=None, max_rel_error=1e9, min_top1_agreement=None, samples=1)
    )
    assert not verdict.passed
    figures = report.as_dict(camel=True)
    assert figures["maxAbsError"] is None
    assert figures["nonFinite"] is True


def test_an_exact_candidate_passes() -> None:
    ref = {"y": np.arange(6, dtype=np.float32).reshape(2, 3)}
    verdict = check_gate(compare_outputs([ref], [dict(ref)], classifiers=frozenset({"y"})), GATE)
    assert verdict.passed
    assert verdict.message.startswith("accuracy gate passed")


def test_calibration_data_must_match_the_inputs(tmp_path: Path) -> None:
    model = classifier_model(tmp_path / "c.onnx")
    spec = validate_model(model, options=BuildOptions())
    good = tmp_path / "good.npz"
    np.savez(good, input=np.zeros((8, FEATURES), np.float64))
    assert load_calibration(good, spec)["input"].dtype == np.float32
    wrong_width = tmp_path / "wide.npz"
    np.savez(wrong_width, input=np.zeros((8, FEATURES + 1), np.float32))
    with pytest.raises(InvalidOptions, match="axis 1"):
        load_calibration(wrong_width, spec)
    ints_for_floats = tmp_path / "ints.npz"
    np.savez(ints_for_floats, input=np.zeros((8, FEATURES), np.complex64))
    with pytest.raises(InvalidOptions, match="'input'"):
        load_calibration(ints_for_floats, spec)
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"junk")
    with pytest.raises(InvalidOptions, match="not a readable"):
        load_calibration(not_npz, spec)


def test_gate_samples_come_in_batches_of_opt(tmp_path: Path) -> None:
    model = classifier_model(tmp_path / "c.onnx")
    options = BuildOptions(batch=BatchProfile(min=2, opt=5, max=8))
    spec = validate_model(model, options=options)
    batches = gate_batches(spec, options=options, calibration=None)
    assert [b["input"].shape for b in batches] == [(5, FEATURES)] * 13  # 64 samples, rounded up to 65
    calibration = {"input": np.zeros((11, FEATURES), np.float32)}
    batches = gate_batches(spec, options=options, calibration=calibration)
    assert [b["input"].shape[0] for b in batches] == [5, 5]  # the last single row is below min=2
    again = synthetic_feeds(spec, options=options, rows=3)
    np.testing.assert_array_equal(again["input"], synthetic_feeds(spec, options=options, rows=3)["input"])
