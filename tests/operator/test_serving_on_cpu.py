"""A GPU serving pod computing on the CPU is Stalled/ServingOnCPU: a real runtime read by the operator's probe.

The runtime here is a real `modelfleet serve` process told it serves sm90 (MODELFLEET_ARCHITECTURE, as the
operator sets it); this machine's ONNX Runtime is the CPU build, so it computes on CPUExecutionProvider and says
so on /metrics. The operator's real `ProviderProbe` reads that over HTTP; `plan` turns it into the conditions.
Not exercised: the kopf wiring (the pods index, the enqueue on a result) against a live cluster.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from modelfleet_operator.providers import PodProvider, ProviderProbe, parse_provider
from modelfleet_operator.reconcile import Observed, plan
from tests.modelzoo import classifier_model
from tests.operator.test_reconcile import FLEET, NOW, SETTINGS, cond, model, serve
from tests.runtime.conftest import ServerFactory

CPU, TRT, CUDA = "CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"


async def probe_until_known(probe: ProviderProbe, pods: list[dict[str, object]]) -> list[PodProvider]:
    for _ in range(600):  # hang guard only: one read normally answers at once
        got = probe.observe(("ns", "clf"), "clf", pods)
        if got:
            return got
        await asyncio.sleep(0.05)
    raise TimeoutError("the probe never read the runtime's provider")


def test_the_operator_reads_a_real_runtime_on_cpu_and_stalls_the_model(tmp_path: Path) -> None:
    factory = ServerFactory(tmp_path)
    try:
        server = factory(classifier_model(tmp_path / "clf.onnx"), "clf", architecture="sm90")
        enqueued: list[tuple[str, str]] = []

        async def read() -> list[PodProvider]:
            probe = ProviderProbe(on_result=enqueued.append, port=server.port, retry_seconds=0.0)
            pods = [
                {"name": "clf-sm90-x", "ready": True, "ip": "127.0.0.1", "architecture": "sm90"},
                {"name": "clf-cpu-y", "ready": True, "ip": "127.0.0.1", "architecture": "cpu"},  # never read
                {"name": "clf-sm80-z", "ready": False, "ip": "127.0.0.1", "architecture": "sm80"},  # not Ready
            ]
            try:
                return await probe_until_known(probe, pods)
            finally:
                await probe.close()

        providers = asyncio.run(read())
    finally:
        factory.cleanup()
    # the runtime asks for CUDA first: no tensorrt is installed beside it here
    assert providers == [PodProvider("clf-sm90-x", "sm90", CPU, CUDA)]
    assert enqueued == [("ns", "clf")]

    served, jobs, deployments = serve(model())
    before = plan(served, Observed(nodes=FLEET, jobs=jobs, deployments=deployments), settings=SETTINGS, now=NOW)
    assert cond(before, "Stalled")["status"] == "False" and cond(before, "Ready")["status"] == "True"
    after = plan(
        served,
        Observed(nodes=FLEET, jobs=jobs, deployments=deployments, providers=providers),
        settings=SETTINGS,
        now=NOW,
    )
    stalled = cond(after, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ServingOnCPU")
    assert f"clf-sm90-x (sm90) computes on {CPU}, asked for {CUDA}" in stalled["message"]
    assert (cond(after, "Ready")["status"], cond(after, "Ready")["reason"]) == ("False", "ServingOnCPU")
    assert cond(after, "Reconciling")["status"] == "False"
    assert cond(after, "Serving")["status"] == "True"  # it still answers
    assert [e.reason for e in after.events if e.type == "Warning"] == ["Stalled"]


def test_a_gpu_pod_on_a_gpu_provider_or_a_cpu_pod_is_not_stalled() -> None:
    served, jobs, deployments = serve(model())
    fine = [
        PodProvider("clf-sm90-x", "sm90", "CUDAExecutionProvider", TRT),  # TensorRT EP missing, CUDA serves
        PodProvider("clf-sm80-y", "sm80", "TensorRT", "TensorRT"),  # the native TensorRT backend
        PodProvider("clf-cpu-z", "cpu", CPU, CPU),
    ]
    p = plan(
        served, Observed(nodes=FLEET, jobs=jobs, deployments=deployments, providers=fine), settings=SETTINGS, now=NOW
    )
    assert cond(p, "Stalled")["status"] == "False" and cond(p, "Ready")["status"] == "True"


def test_parse_provider() -> None:
    text = (
        "# TYPE modelfleet_execution_provider_info gauge\n"
        'modelfleet_execution_provider_info{model="other",provider="CUDAExecutionProvider",requested="x"} 1.0\n'
        f'modelfleet_execution_provider_info{{model="clf",provider="{CPU}",requested="{TRT}"}} 1.0\n'
    )
    assert parse_provider(text, model="clf") == (CPU, TRT)
    assert parse_provider(text, model="none") is None
    assert parse_provider("not { metrics", model="clf") is None


def test_the_probe_forgets_pods_that_left() -> None:
    """Its record of read attempts stays bounded by the pods that exist."""

    async def run() -> tuple[int, int]:
        probe = ProviderProbe(on_result=lambda key: None, port=1, timeout_seconds=0.2)
        pod = {"name": "clf-sm90-x", "ready": True, "ip": "127.0.0.1", "architecture": "sm90"}
        probe.observe(("ns", "clf"), "clf", [pod])
        tried = len(probe._tried)
        probe.observe(("ns", "clf"), "clf", [])
        await probe.close()
        return tried, len(probe._tried)

    assert asyncio.run(run()) == (1, 0)
