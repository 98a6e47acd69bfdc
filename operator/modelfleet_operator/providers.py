"""Which execution provider each GPU serving pod computes on: read once from its /metrics when it is Ready.

The runtime exposes `modelfleet_execution_provider_info{model,provider,requested} 1`. A pod of an smXY
architecture on `CPUExecutionProvider` serves on CPU (the wrong ONNX Runtime build, or CUDA libraries that did
not load): the conditions report it as Stalled/ServingOnCPU. Only GPU-architecture pods are read, each once per
pod IP (again after a failed read, no sooner than `retry_seconds`), in tasks of their own: a reconcile never
waits for a pod's answer, and the pod's model is enqueued when one comes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

METRIC = "modelfleet_execution_provider_info"
CPU_PROVIDER = "CPUExecutionProvider"
Key = tuple[str, str]


@dataclass(frozen=True)
class PodProvider:
    """What one serving pod computes on, as its runtime reported."""

    pod: str
    architecture: str
    provider: str
    requested: str

    @property
    def on_cpu(self) -> bool:
        return self.architecture.startswith("sm") and self.provider == CPU_PROVIDER

    def describe(self) -> str:
        return f"{self.pod} ({self.architecture}) computes on {self.provider}, asked for {self.requested}"


def parse_provider(text: str, *, model: str) -> tuple[str, str] | None:
    """(provider, requested) from a runtime's metrics text, or None when it has no such series."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception:  # the parser raises bare ValueError/IndexError on garbage
        return None
    for family in families:
        for sample in family.samples:
            if sample.name == METRIC and sample.labels.get("model") == model and sample.value == 1:
                return sample.labels.get("provider", ""), sample.labels.get("requested", "")
    return None


async def read_provider(
    session: aiohttp.ClientSession, url: str, *, model: str, timeout_seconds: float
) -> tuple[str, str] | None:
    """GET one pod's /metrics; None on any failure (the pod is read again later)."""
    try:
        async with asyncio.timeout(timeout_seconds):
            async with session.get(url) as response:
                if response.status != 200:
                    return None
                text = (await response.content.read(4 * 1024 * 1024)).decode("utf-8", errors="replace")
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    return parse_provider(text, model=model)


@dataclass
class ProviderProbe:
    """Per-pod results for the conditions; `observe` returns what is known and starts reads for the rest."""

    on_result: Callable[[Key], None]
    port: int
    timeout_seconds: float = 2.0
    retry_seconds: float = 60.0
    # model -> (pod, IP) -> result; a pod with a new IP is a new runtime process, read again
    _known: dict[Key, dict[tuple[str, str], PodProvider]] = field(default_factory=dict)
    _tried: dict[tuple[Key, str, str], float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    def observe(self, key: Key, model: str, pods: Sequence[Mapping[str, Any]]) -> list[PodProvider]:
        """The Ready GPU pods' providers known so far (pods: the handlers' serving_pod dicts)."""
        now, live = time.monotonic(), {}
        for pod in pods:
            arch, ip = str(pod.get("architecture") or ""), pod.get("ip")
            if pod.get("ready") and ip and arch.startswith("sm"):
                live[(str(pod["name"]), str(ip))] = arch
        known = {ident: p for ident, p in self._known.get(key, {}).items() if ident in live}
        self._known[key] = known
        for gone in [t for t in self._tried if t[0] == key and t[1:] not in live]:
            del self._tried[gone]  # pods that left: forget when they were read
        for ident, arch in live.items():
            tried = self._tried.get((key, *ident))
            if ident not in known and (tried is None or now - tried >= self.retry_seconds):
                self._tried[(key, *ident)] = now
                task = asyncio.get_running_loop().create_task(self._read(key, model, ident, arch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return list(known.values())

    async def _read(self, key: Key, model: str, ident: tuple[str, str], arch: str) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        pod, ip = ident
        url = f"http://{f'[{ip}]' if ':' in ip else ip}:{self.port}/metrics"
        got = await read_provider(self._session, url, model=model, timeout_seconds=self.timeout_seconds)
        if got is not None:
            self._known.setdefault(key, {})[ident] = PodProvider(pod, arch, provider=got[0], requested=got[1])
            self.on_result(key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
