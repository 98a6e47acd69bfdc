"""The operator's side of the labeled accuracy gate: build Job flags and volume, build identity, status figures."""

from __future__ import annotations

from typing import Any

from modelfleet_operator.reconcile import Observed, plan
from modelfleet_operator.resources import build_identity, build_options, needed_claims
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.build.options import DEFAULT_MAX_ACCURACY_DROP, parse_options
from tests.operator.test_reconcile import FLEET, NOW, SETTINGS, finished_job, kinds, model, with_status

SHA = "e" * 64
EVALUATION = {"uri": "pvc://datasets/digits/eval.npz", "sha256": SHA}


def labeled_model(**accuracy: Any) -> Any:
    return model(engine={"precision": "int8", "accuracy": {"evaluation": EVALUATION, **accuracy}})


def sm90_job(im: Any) -> dict[str, Any]:
    jobs = kinds(plan(im, Observed(nodes=FLEET), settings=SETTINGS, now=NOW), "Job")
    return next(j for j in jobs if j["metadata"]["labels"]["modelfleet.io/architecture"] == "sm90")


def test_the_build_job_gets_the_flags_and_mounts_the_evaluation_claim() -> None:
    im = labeled_model(maxAccuracyDrop=0.01)
    pod = sm90_job(im)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    local = f"{SETTINGS.models_path}/datasets/digits/eval.npz"
    assert f"--evaluation={local}" in args
    assert args[args.index("--evaluation-sha256") + 1] == SHA
    assert args[args.index("--max-accuracy-drop") + 1] == "0.01"
    option_args = args[args.index("--architecture") + 2 :]
    parsed = parse_options(option_args)
    assert parsed == build_options(im.spec, SETTINGS)
    assert parsed.accuracy.evaluation is not None and parsed.accuracy.evaluation.path == local
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert {"models", "datasets"} <= claims
    mounts = {m["mountPath"]: m.get("readOnly") for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[f"{SETTINGS.models_path}/datasets"] is True
    assert "datasets" in needed_claims(im, SETTINGS)


def test_without_evaluation_data_the_job_and_identity_are_unchanged() -> None:
    plain = model(engine={"precision": "int8"})
    spelled = model(engine={"precision": "int8", "accuracy": {"maxAccuracyDrop": 0.02}})
    args = sm90_job(plain)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith(("--evaluation", "--max-accuracy-drop"))]
    assert build_identity(spelled, "sm90", SETTINGS) == build_identity(plain, "sm90", SETTINGS)
    assert build_options(plain.spec, SETTINGS).accuracy.max_accuracy_drop == DEFAULT_MAX_ACCURACY_DROP


def test_the_build_identity_follows_the_evaluation_data_and_its_limit() -> None:
    settings = OperatorSettings(runtime_backend_versions={"tensorrt": "10.3.0"})
    pinned = {"uri": "pvc://models/clf/model.onnx", "sha256": "a" * 64}
    base = model(model=pinned, engine={"precision": "int8"})
    labeled = model(model=pinned, engine={"precision": "int8", "accuracy": {"evaluation": EVALUATION}})
    stricter = model(
        model=pinned, engine={"precision": "int8", "accuracy": {"evaluation": EVALUATION, "maxAccuracyDrop": 0}}
    )
    unpinned = model(model=pinned, engine={"precision": "int8", "accuracy": {"evaluation": {"uri": EVALUATION["uri"]}}})
    moved = model(
        model=pinned, engine={"precision": "int8", "accuracy": {"evaluation": {"uri": "pvc://datasets/other.npz"}}}
    )
    ids = {im_id: build_identity(im, "sm90", settings) for im_id, im in enumerate((base, labeled, stricter, unpinned))}
    assert len({build_id for build_id, _ in ids.values()}) == 4
    assert ids[0][1] and ids[1][1] and ids[2][1]  # pinned digests: the real engine key
    assert ids[3][1] is False  # the evaluation digest is a stand-in until the build computes it
    assert build_identity(moved, "sm90", settings)[0] != ids[3][0]


def test_status_carries_the_evaluation_figures_from_the_termination_message() -> None:
    im = labeled_model()
    first = plan(im, Observed(nodes=FLEET), settings=SETTINGS, now=NOW)
    jobs = [finished_job(j) for j in kinds(first, "Job")]
    figures = {
        "samples": 540,
        "referenceAccuracy": 0.9759,
        "accuracy": 0.9722,
        "accuracyDrop": 0.0037,
        "maxAccuracyDrop": 0.005,
        "output": "logits",
    }
    results = {
        j["metadata"]["name"]: {
            "phase": "Ready",
            "key": "k-" + j["metadata"]["labels"]["modelfleet.io/architecture"],
            "backend": "tensorrt",
            "accuracy": {"samples": 256, "maxRelError": 0.01, "top1Agreement": 0.996, "evaluation": figures},
        }
        for j in jobs
    }
    second = plan(
        with_status(im, first.status),
        Observed(nodes=FLEET, jobs=jobs, build_results=results),
        settings=SETTINGS,
        now=NOW,
    )
    engines = second.status["engines"]
    assert engines and all(e["phase"] == "Ready" for e in engines)
    assert all(e["accuracy"]["evaluation"] == figures for e in engines)
    assert all(e["accuracy"]["top1Agreement"] == 0.996 for e in engines)
    parsed = with_status(im, second.status).status.engines[0].accuracy
    assert parsed is not None and parsed.evaluation is not None
    assert parsed.evaluation.accuracy_drop == 0.0037


def test_the_build_job_quantizes_the_way_the_spec_asks() -> None:
    """spec.engine.onnxruntime.quantization reaches the Job (it was dropped: static specs built dynamic)."""
    im = model(
        engine={
            "precision": "int8",
            "calibration": {"uri": "pvc://datasets/calib.npz"},
            "onnxruntime": {"quantization": "static"},
        }
    )
    args = sm90_job(im)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--ort-quantization") + 1] == "static"
    assert build_options(im.spec, SETTINGS).onnxruntime.quantization == "static"
