"""spec.serving.batching reaches the serving pod as adaptive batching unless a queue delay pins it."""

from __future__ import annotations

from typing import Any

import pytest

from modelfleet_operator.api import parse_inference_model
from modelfleet_operator.resources import build_deployment
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.settings import ServeSettings

ADAPTIVE = "MODELFLEET_BATCHING_ADAPTIVE"
TARGET = "MODELFLEET_BATCHING_P99_TARGET_MICROSECONDS"
DELAY = "MODELFLEET_MAX_QUEUE_DELAY_MICROSECONDS"


def pod_env(spec: dict[str, Any]) -> dict[str, str]:
    im = parse_inference_model(
        {
            "apiVersion": "modelfleet.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": "clf", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": {"model": {"uri": "pvc://models/clf/model.onnx"}, **spec},
        }
    )
    dep = build_deployment(im, arch="sm80", engine_key_="k", replicas=1, settings=OperatorSettings())
    return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def runtime(env: dict[str, str]) -> ServeSettings:
    kwargs: dict[str, Any] = {
        k.removeprefix("MODELFLEET_").lower(): v for k, v in env.items() if k.startswith("MODELFLEET_")
    }
    return ServeSettings(model="m.onnx", name="m", **kwargs)


def test_without_a_queue_delay_the_pod_batches_adaptively_at_the_default_target() -> None:
    env = pod_env({})
    assert env[ADAPTIVE] == "true"
    assert TARGET not in env
    settings = runtime(env)
    assert settings.batching_adaptive
    assert settings.batching_p99_target_microseconds == 100_000
    assert settings.max_queue_delay_microseconds == 0  # no bound but the target's tenth


def test_the_autoscaling_p99_target_is_the_batchers_target() -> None:
    env = pod_env({"autoscaling": {"maxReplicas": 4, "targetP99LatencyMilliseconds": 40}})
    assert runtime(env).batching_p99_target_microseconds == 40_000


def test_a_queue_delay_pins_the_batcher_as_before() -> None:
    env = pod_env({"serving": {"batching": {"maxQueueDelayMicroseconds": 1000}}})
    assert ADAPTIVE not in env
    assert env[DELAY] == "1000"
    assert not runtime(env).batching_adaptive


@pytest.mark.parametrize("adaptive", [True, False])
def test_adaptive_set_explicitly_wins(adaptive: bool) -> None:
    env = pod_env({"serving": {"batching": {"maxQueueDelayMicroseconds": 3000, "adaptive": adaptive}}})
    assert runtime(env).batching_adaptive is adaptive
    assert env[DELAY] == "3000"  # with adaptive, the most it may wait
