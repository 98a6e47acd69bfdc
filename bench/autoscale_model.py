"""The per-replica service model and the load traces that the autoscaler simulator runs on.

A replica is a dynamic-batching server with a saturation throughput `capacity_qps`. Per second of
simulated time the fleet is a fluid queue (arrivals beyond what the ready replicas serve wait in a backlog,
and beyond `queue_limit` per replica they are rejected with 503, as the runtime's `maxQueueSize` does);
on top of that backlog each request's latency is log-normal, with the median and p99 that the runtime
benchmark measured at that utilization:

    latency = backlog wait + LogNormal(median p50(rho), p99 p99(rho)),

where p50(rho) and p99(rho) interpolate the measured points linearly in log space (held below the first
point, extrapolated along the last segment above the last one). The points come from
`bench/results/runtime.json` (MiniLM's p50/p99 at 50 % and 80 % of its measured saturation throughput)
when the runtime benchmark has written it, else from the defaults below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Bucket bounds for simulated request-duration histograms: the runtime's layout (modelfleet_runtime.metrics:
# 30 geometric bounds from 0.5 ms to 2.5 s, 3 significant digits), so simulated p99s quantize like real ones.
DURATION_BUCKETS: tuple[float, ...] = (
    *(float(f"{0.0005 * (2.5 / 0.0005) ** (i / 29):.3g}") for i in range(30)),
    math.inf,
)

Z99 = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True)
class ServiceModel:
    """One replica's throughput, and its latency (p50, p99 in seconds) at measured utilizations."""

    capacity_qps: float
    points: tuple[tuple[float, float, float], ...]  # (utilization, p50 s, p99 s), ascending utilization
    queue_limit: int
    slo_ms: float  # the p99 SLO that goes with this model (the runtime benchmark's budget when calibrated)
    source: str

    def describe(self) -> str:
        pts = ", ".join(f"{r:.0%}: p50 {a * 1000:.1f} / p99 {b * 1000:.1f} ms" for r, a, b in self.points)
        return (
            f"capacity {self.capacity_qps:.0f} req/s per replica; {pts}; queue limit {self.queue_limit} ({self.source})"
        )

    def quantiles(self, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ln p50 and ln p99 at utilizations `rho` (piecewise linear in log space)."""
        r = np.array([p[0] for p in self.points])
        lo50, lo99 = np.log([p[1] for p in self.points]), np.log([p[2] for p in self.points])
        x = np.clip(rho, r[0], 1.0)
        ln50, ln99 = np.interp(x, r, lo50), np.interp(x, r, lo99)
        if r.size >= 2:
            # Past the last measured point, continue along the last segment (np.interp would hold it flat).
            beyond = np.maximum(x - r[-1], 0.0)
            ln50 = ln50 + beyond * (lo50[-1] - lo50[-2]) / (r[-1] - r[-2])
            ln99 = ln99 + beyond * (lo99[-1] - lo99[-2]) / (r[-1] - r[-2])
        return ln50, np.maximum(ln99, ln50)

    def utilization_at_p99(self, p99_s: float) -> float:
        """The steady utilization at which p99 reaches `p99_s` (the knee for that SLO)."""
        grid = np.linspace(0.0, 1.0, 1001)
        _, ln99 = self.quantiles(grid)
        below = grid[ln99 <= math.log(p99_s)]
        return float(below[-1]) if below.size else 0.0


# Defaults: an all-MiniLM-L6-v2-class encoder on one data-centre GPU (maxBatchSize 32,
# maxQueueDelayMicroseconds 2000, compute ≈ 3 ms + 0.4 ms·batch, so ~2000 req/s at saturation); the
# percentiles are those of an M/G/1 queue in front of that batch latency.
DEFAULT_MODEL = ServiceModel(
    capacity_qps=2000.0,
    points=(
        (0.1, 0.00666, 0.00794),
        (0.5, 0.0117, 0.01561),
        (0.8, 0.01666, 0.02644),
        (0.9, 0.01968, 0.03924),
        (0.95, 0.02379, 0.06291),
    ),
    queue_limit=1024,
    slo_ms=50.0,
    source="defaults (MiniLM-class encoder on one GPU, batch 32)",
)


def load_service_model(path: Path, *, model_name: str = "minilm") -> ServiceModel:
    """Calibrate from the runtime benchmark's JSON (`make bench-runtime`), else the defaults.

    Uses the named model's saturation throughput, its p50/p99 at each open-loop load point (`load_50`,
    `load_80`: utilization = offered rate / saturation throughput) and its p99 budget as the SLO.
    """
    try:
        entry: Any = json.loads(path.read_text())["models"][model_name]
        capacity = float(entry["saturation_qps"])
        points = tuple(
            sorted(
                (
                    float(v["target_rate"]) / capacity,
                    float(v["p50_ms"]) / 1000.0,
                    float(v["p99_ms"]) / 1000.0,
                )
                for k, v in entry.items()
                if k.startswith("load_") and isinstance(v, dict)
            )
        )
        slo_ms = float(entry["p99_budget_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MODEL
    if capacity <= 0 or len(points) < 2:
        return DEFAULT_MODEL
    return ServiceModel(
        capacity_qps=capacity,
        points=points,
        queue_limit=DEFAULT_MODEL.queue_limit,
        slo_ms=slo_ms,
        source=f"calibrated from {path} ({model_name}, measured {entry.get('measured_at', 'n/a')})",
    )


@dataclass(frozen=True)
class SecondState:
    """Vectors over seconds describing each second's latency distribution (see the module docstring)."""

    delay: np.ndarray  # backlog wait (s)
    ln_median: np.ndarray
    sigma: np.ndarray


def latency_params(model: ServiceModel, *, arrivals: np.ndarray, ready: np.ndarray, backlog: np.ndarray) -> SecondState:
    """Per-second latency parameters from arrivals, ready replicas and the mean backlog in that second."""
    capacity = np.maximum(ready, 1e-9) * model.capacity_qps
    rho = np.clip(arrivals / capacity, 0.0, 1.0)
    ln50, ln99 = model.quantiles(rho)
    return SecondState(delay=backlog / capacity, ln_median=ln50, sigma=np.maximum((ln99 - ln50) / Z99, 1e-6))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has no erf, and SciPy is not worth a dependency.
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    result: np.ndarray = 0.5 * (1.0 + np.sign(z) * erf)
    return result


def latency_cdf(params: SecondState, x: np.ndarray) -> np.ndarray:
    """P(latency ≤ x) per second (rows) and per x (columns)."""
    excess = x[None, :] - params.delay[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (np.log(np.maximum(excess, 1e-12)) - params.ln_median[:, None]) / params.sigma[:, None]
    cdf: np.ndarray = np.where(excess > 0.0, _normal_cdf(z), 0.0)
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
