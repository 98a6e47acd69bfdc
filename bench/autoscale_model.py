"""The per-replica service model and the load traces that the autoscaler simulator runs on.

A replica is a dynamic-batching server with a saturation throughput `capacity_qps`. Per second of
simulated time the fleet is a fluid queue (arrivals beyond what the ready replicas serve wait in a backlog,
and beyond `queue_limit` per replica they are rejected with 503, as the runtime's `maxQueueSize` does);
on top of that backlog each request sees

    latency = batch latency s(rho) + backlog wait + a stochastic queueing wait W,

where s(rho) grows linearly from `latency_floor_s` (batch of 1) to `latency_full_s` (full batch) with the
utilization rho, and W is the M/G/1 (Kingman) approximation for a server of rate `capacity_qps`:
P(W > x) = rho * exp(-x / theta), theta = k / (capacity * (1 - rho)). The numbers come from
`bench/results/runtime.json` when the runtime benchmark has written it, else from the defaults below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# Bucket bounds for simulated request-duration histograms: the runtime's layout (modelfleet_runtime.metrics:
# 30 geometric bounds from 0.5 ms to 2.5 s, 3 significant digits), so simulated p99s quantize like real ones.
DURATION_BUCKETS: tuple[float, ...] = (
    *(float(f"{0.0005 * (2.5 / 0.0005) ** (i / 29):.3g}") for i in range(30)),
    math.inf,
)


@dataclass(frozen=True)
class ServiceModel:
    """One replica's throughput and latency under load."""

    capacity_qps: float
    latency_floor_s: float
    latency_full_s: float
    queue_limit: int
    variability: float
    source: str

    def describe(self) -> str:
        return (
            f"capacity {self.capacity_qps:.0f} req/s per replica, batch latency "
            f"{self.latency_floor_s * 1000:.1f}-{self.latency_full_s * 1000:.1f} ms, queue limit "
            f"{self.queue_limit}, k={self.variability:g} ({self.source})"
        )


# Defaults: all-MiniLM-L6-v2-class encoder on one data-centre GPU with maxBatchSize 32,
# maxQueueDelayMicroseconds 2000: compute(b) ≈ 3 ms + 0.4 ms·b, so a full batch takes ~16 ms and one
# replica saturates near 32 / 16 ms ≈ 2000 req/s; light-load latency ≈ 2 ms delay + 3.4 ms compute.
DEFAULT_MODEL = ServiceModel(
    capacity_qps=2000.0,
    latency_floor_s=0.0054,
    latency_full_s=0.018,
    queue_limit=1024,
    variability=1.0,
    source="defaults (MiniLM-class encoder on one GPU, batch 32)",
)


def _find(obj: Any, *keys: str) -> Any:
    for key in keys:
        if isinstance(obj, dict) and key in obj:
            return obj[key]
    return None


def load_service_model(path: Path) -> ServiceModel:
    """Calibrate from the runtime benchmark's JSON if it exists and has what we need; else defaults.

    Reads, for the MiniLM entry if there is one (else the first model): the server's saturation
    throughput, and p50/p99 at 50 % load; the floor is p50 at 50 % load and the full-batch latency is
    chosen so that the model's p99 at 80 % load matches the measured one when that is present.
    """
    if not path.exists():
        return DEFAULT_MODEL
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return DEFAULT_MODEL
    models = _find(data, "models", "results") or data
    entry: Any = None
    if isinstance(models, dict):
        entry = next((v for k, v in models.items() if "minilm" in k.lower()), None) or next(iter(models.values()), None)
    elif isinstance(models, list) and models:
        entry = next((m for m in models if "minilm" in str(_find(m, "model", "name")).lower()), models[0])
    if not isinstance(entry, dict):
        return DEFAULT_MODEL
    capacity = _find(entry, "saturation_qps", "server_saturation_qps", "saturation_throughput", "server_qps")
    load50 = _find(entry, "load_50", "at_50", "p50_load") or {}
    load80 = _find(entry, "load_80", "at_80", "p80_load") or {}
    p50_ms = _find(load50, "p50_ms")
    p99_80_ms = _find(load80, "p99_ms")
    if not isinstance(capacity, int | float) or not isinstance(p50_ms, int | float) or capacity <= 0:
        return DEFAULT_MODEL
    floor = float(p50_ms) / 1000.0
    model = replace(
        DEFAULT_MODEL,
        capacity_qps=float(capacity),
        latency_floor_s=floor,
        latency_full_s=2.5 * floor,
        source=f"calibrated from {path}",
    )
    if isinstance(p99_80_ms, int | float) and p99_80_ms > 0:
        # Solve p99(0.8) = s(0.8) + θ·ln(100·0.8) for latency_full_s, keeping k.
        theta = model.variability / (model.capacity_qps * 0.2)
        s80 = float(p99_80_ms) / 1000.0 - theta * math.log(80.0)
        full = floor + (s80 - floor) / 0.8
        if full > floor:
            model = replace(model, latency_full_s=full)
    return model


@dataclass(frozen=True)
class SecondState:
    """Vectors over seconds describing each second's latency distribution (see the module docstring)."""

    delay: np.ndarray  # deterministic part: batch latency + backlog wait (s)
    rho: np.ndarray  # probability of a stochastic wait
    theta: np.ndarray  # mean of the stochastic wait when there is one (s)


def latency_params(model: ServiceModel, *, arrivals: np.ndarray, ready: np.ndarray, backlog: np.ndarray) -> SecondState:
    """Per-second latency parameters from arrivals, ready replicas and the mean backlog in that second."""
    capacity = np.maximum(ready, 1e-9) * model.capacity_qps
    rho = np.clip(arrivals / capacity, 0.0, None)
    rho_q = np.minimum(rho, 0.98)
    service = model.latency_floor_s + (model.latency_full_s - model.latency_floor_s) * np.minimum(rho, 1.0)
    delay = service + backlog / capacity
    theta = model.variability / (model.capacity_qps * (1.0 - rho_q))
    return SecondState(delay=delay, rho=rho_q, theta=theta)


def latency_cdf(params: SecondState, x: np.ndarray) -> np.ndarray:
    """P(latency ≤ x) per second (rows) and per x (columns)."""
    d = params.delay[:, None]
    excess = x[None, :] - d
    with np.errstate(over="ignore", invalid="ignore"):
        tail = params.rho[:, None] * np.exp(-np.maximum(excess, 0.0) / params.theta[:, None])
    cdf: np.ndarray = np.where(excess >= 0.0, 1.0 - tail, 0.0)
    return cdf


# ---------------------------------------------------------------------------------------------------------
# Traces: offered load in requests per second, one value per simulated second.

TRACES = ("steady", "diurnal", "step2", "step5", "spike10", "bursty")


def trace_rate(name: str, *, base_qps: float, seed: int) -> np.ndarray:
    """The mean offered rate per second for a named trace (arrival counts are drawn from it)."""
    rng = np.random.default_rng(seed)
    if name == "steady":
        return np.full(3600, base_qps)
    if name == "diurnal":
        # Two compressed "days" of 1 h: 0.4x at night to 1.6x at the peak, with a slow random wander.
        t = np.arange(7200)
        wave = 1.0 + 0.6 * np.sin(2 * np.pi * t / 3600 - np.pi / 2)
        wander = np.exp(np.cumsum(rng.normal(0.0, 0.002, t.size)))
        wander /= np.mean(wander)
        rate: np.ndarray = base_qps * wave * np.clip(wander, 0.85, 1.15)
        return rate
    if name in ("step2", "step5"):
        factor = 2.0 if name == "step2" else 5.0
        rate = np.full(3600, base_qps)
        rate[900:2700] *= factor
        return rate
    if name == "spike10":
        # A x10 surge for 3 minutes, reached in 10 s, between two calm stretches.
        rate = np.full(3600, base_qps)
        ramp = np.linspace(1.0, 10.0, 10)
        rate[1200:1210] *= ramp
        rate[1210:1380] *= 10.0
        rate[1380:1390] *= ramp[::-1]
        return rate
    if name == "bursty":
        # Markov-modulated Poisson over 2 h: calm (1x, mean 6 min) and burst (3x, mean 3 min) states.
        rate = np.empty(7200)
        high = False
        for i in range(rate.size):
            if rng.random() < (1 / 180 if high else 1 / 360):
                high = not high
            rate[i] = base_qps * (3.0 if high else 1.0)
        return rate
    raise ValueError(f"unknown trace {name!r}; choose from {', '.join(TRACES)}")


def trace_arrivals(name: str, *, base_qps: float, seed: int) -> np.ndarray:
    """Per-second Poisson arrival counts for a trace (seeded, so every controller sees the same load)."""
    rate = trace_rate(name, base_qps=base_qps, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return rng.poisson(rate).astype(np.float64)
