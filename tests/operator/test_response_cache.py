"""spec.serving.responseCache reaches the serving pod as the runtime's setting, and only when enabled."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet_operator.api import InvalidInferenceModelError, parse_inference_model
from modelfleet_operator.resources import build_deployment
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.settings import ServeSettings

VAR = "MODELFLEET_RESPONSE_CACHE_BYTES"


def pod_env(serving: dict[str, Any]) -> dict[str, str]:
    im = parse_inference_model(
        {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": "clf", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, "serving": serving},
        }
    )
    dep = build_deployment(im, arch="sm80", engine_key_="k", replicas=1, settings=OperatorSettings())
    return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_an_enabled_cache_sets_the_runtime_limit() -> None:
    env = pod_env({"responseCache": {"enabled": True, "maxBytes": 1 << 20}})
    assert env[VAR] == str(1 << 20)
    assert ServeSettings(model="m.onnx", name="m", response_cache_bytes=env[VAR]).response_cache_bytes == 1 << 20


@pytest.mark.parametrize(
    "serving", [{}, {"responseCache": {"maxBytes": 1 << 20}}, {"responseCache": {"enabled": False}}]
)
def test_without_enabled_the_pod_has_no_cache_and_an_unchanged_template(serving: dict[str, Any]) -> None:
    assert VAR not in pod_env(serving)
    assert pod_env(serving) == pod_env({})


@pytest.mark.parametrize("max_bytes", [0, 1024, True, "64Mi"])
def test_an_unusable_size_is_refused_naming_the_field(max_bytes: object) -> None:
    with pytest.raises(InvalidInferenceModelError, match=r"responseCache\.maxBytes"):
        pod_env({"responseCache": {"enabled": True, "maxBytes": max_bytes}})
