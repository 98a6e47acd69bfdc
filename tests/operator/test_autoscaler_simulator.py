"""The autoscaler simulator's own parts: the calibrated service model and the scoring engine.

The simulator is what the autoscaler's claims rest on, so its model is checked against the figures it is
calibrated from, and its scoring against runs whose outcome is known in direction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.autoscale_controllers import Hpa, Oracle
from bench.autoscale_engine import simulate
from bench.autoscale_model import DEFAULT_MODEL, latency_cdf, latency_params, load_service_model, trace_arrivals
from bench.autoscale_sim import PHASES, Job, run_job

RUNTIME_RESULTS = {
    "models": {
        "minilm": {
            "saturation_qps": 400.0,
            "p99_budget_ms": 250.0,
            "measured_at": "test",
            "load_50": {"target_rate": 200.0, "p50_ms": 20.0, "p99_ms": 60.0},
            "load_80": {"target_rate": 320.0, "p50_ms": 50.0, "p99_ms": 600.0},
        }
    }
}


@pytest.fixture
def calibrated(tmp_path: Path) -> Path:
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps(RUNTIME_RESULTS))
    return path


def test_the_model_reproduces_the_measured_percentiles(calibrated: Path) -> None:
    model = load_service_model(calibrated)
    assert model.capacity_qps == 400.0
    assert model.slo_ms == 250.0
    for rho, p50, p99 in ((0.5, 0.020, 0.060), (0.8, 0.050, 0.600)):
        replicas = 10
        params = latency_params(
            model,
            arrivals=np.array([rho * replicas * model.capacity_qps]),
            ready=np.array([float(replicas)]),
            backlog=np.array([0.0]),
        )
        cdf = latency_cdf(params, np.array([p50, p99]))[0]
        assert cdf[0] == pytest.approx(0.5, abs=1e-4)
        assert cdf[1] == pytest.approx(0.99, abs=1e-4)
    # p99 = 250 ms lies between the two measured points, on the log-linear segment.
    expected = 0.5 + 0.3 * math.log(250 / 60) / math.log(600 / 60)
    assert model.utilization_at_p99(0.250) == pytest.approx(expected, abs=2e-3)


def test_a_backlog_delays_every_request(calibrated: Path) -> None:
    model = load_service_model(calibrated)
    params = latency_params(model, arrivals=np.array([2000.0]), ready=np.array([10.0]), backlog=np.array([4000.0]))
    # 4000 queued requests at 4000/s of capacity: nobody finishes within the first second.
    assert latency_cdf(params, np.array([0.9]))[0, 0] == 0.0


@pytest.mark.parametrize("content", ["", "{}", json.dumps({"models": {"minilm": {"saturation_qps": 1}}})])
def test_without_usable_benchmark_results_the_defaults_apply(tmp_path: Path, content: str) -> None:
    path = tmp_path / "runtime.json"
    path.write_text(content)
    assert load_service_model(path) == DEFAULT_MODEL
    assert load_service_model(tmp_path / "missing.json") == DEFAULT_MODEL


def test_scoring_separates_foresight_from_a_late_controller() -> None:
    model = DEFAULT_MODEL
    arrivals = trace_arrivals("spike10", base_qps=6.37 * model.capacity_qps, seed=7)
    slo = model.slo_ms / 1000.0
    oracle = simulate(
        arrivals,
        Oracle(target=model.utilization_at_p99(0.9 * slo) * model.capacity_qps),
        model=model,
        startup_s=60,
        slo_s=slo,
    )
    hpa = simulate(arrivals, Hpa(target=0.7 * model.capacity_qps), model=model, startup_s=60, slo_s=slo)
    assert oracle.slo_attainment > 99.0
    assert oracle.dropped == 0
    # The HPA learns of the spike only from its metrics and waits a minute for pods: requests are lost.
    assert hpa.slo_attainment < 95.0
    assert hpa.dropped > 0
    assert hpa.scaling_actions >= 2


def test_each_run_is_the_mean_over_seeds_and_sync_phases() -> None:
    model = DEFAULT_MODEL
    seeds = (7, 8)
    job = Job("step5", 60, "hpa", 0.7, seeds, 6.37, model.slo_ms, model.slo_ms, model, PHASES)
    runs = {
        (seed, p): simulate(
            trace_arrivals("step5", base_qps=6.37 * model.capacity_qps, seed=seed),
            Hpa(target=0.7 * model.capacity_qps),
            model=model,
            startup_s=60,
            slo_s=model.slo_ms / 1000.0,
            phase=round(p * 15),
        )
        for seed in seeds
        for p in PHASES
    }
    # The step falls on a sync at phase 0 only: where the clock stands changes the outcome...
    assert len({round(runs[7, p].slo_attainment, 6) for p in PHASES}) > 1
    # ...and so does the draw of the arrivals...
    assert runs[7, PHASES[1]].slo_attainment != runs[8, PHASES[1]].slo_attainment
    # ...so the record is the mean over both, not one lucky (or unlucky) clock or draw.
    record = run_job(job)
    assert (record["seeds"], record["phases"]) == (len(seeds), len(PHASES))
    assert record["slo_attainment"] == pytest.approx(np.mean([r.slo_attainment for r in runs.values()]), abs=1e-4)
    assert record["replica_seconds"] == pytest.approx(np.mean([r.replica_seconds for r in runs.values()]), abs=0.1)


def test_the_instant_rate_experiment_sees_a_surge_before_the_window_does() -> None:
    # `ours-xinstant=3` bounds what a queue-depth signal could add (README): at this phase a sync falls at the
    # end of the surge's 10 s ramp, where the window's average is still half of what the last seconds show.
    def run(controller: str) -> dict[str, float]:
        model = DEFAULT_MODEL
        return run_job(Job("spike10", 60, controller, 0.7, (7,), 6.37, model.slo_ms, model.slo_ms, model, (2 / 3,)))

    plain, instant = run("ours"), run("ours-xinstant=3")
    assert instant["slo_attainment"] > plain["slo_attainment"] + 0.5
    assert instant["replica_seconds"] < 1.1 * plain["replica_seconds"]
