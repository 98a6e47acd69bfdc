"""`make bench-autoscale`: compare our autoscaler with the HPA and Knative's KPA on simulated traces.

For every trace (steady, diurnal, step x2/x5, spike x10, bursty MMPP) and pod start-up delay (30, 60,
120 s), each controller runs at a sweep of targets; each run scores SLO attainment (share of requests
within the p99 SLO, rejected ones counting as misses), minutes meeting the SLO, dropped requests,
replica-seconds, scaling actions and flaps (direction reversals less than 5 minutes apart). Writes
`bench/results/autoscale.json` (one record per run), `autoscale.md` (tables and the goal check) and one
PNG of cost-against-attainment curves per trace.

Controllers: `ours` (the real algorithm with its defaults, 15 s sync), `ours-5s` (the same with a 5 s
sync), `ours-spec` (the algorithm as first specified: HPA arithmetic on p99 too, HPA rate limits and a
fixed 300 s window), `hpa` and `kpa` (see autoscale_controllers.py). `--controllers ours-xKEY=JSON;...`
runs ours with configuration overrides, for experiments; three keys are not configuration: `interval`
(the sync period), `p99x` (the p99 target as a multiple of the SLO) and `instant` (see `Ours.recent_seconds`).

    python -m bench.autoscale_sim [--quick] [--jobs 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.autoscale_controllers import Hpa, Kpa, Oracle, Ours
from bench.autoscale_engine import Controller, RunResult, simulate
from bench.autoscale_model import DEFAULT_MODEL, TRACES, ServiceModel, load_service_model, trace_arrivals
from modelfleet_operator.autoscaler.algorithm import LatencyStep

CONTROLLERS = ("ours", "hpa", "kpa", "ours-5s", "ours-spec", "oracle")
BASELINES = ("hpa", "kpa")
FULL_FRACTIONS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
QUICK_FRACTIONS = (0.6, 0.75, 0.9)
STARTUPS = (30, 60, 120)
# Sync phases, as fractions of each controller's sync period, that each run is averaged over: load changes
# do not fall on a controller's clock, and a step exactly at a sync boundary is the one case in which a
# window's average is already the new level.
PHASES = (0.0, 1 / 3, 2 / 3)
# Trace seeds that each run is averaged over: a 2 h MMPP draw holds a dozen bursts, and which controller
# looks best on bursty traffic changed from one draw to the next.
SEEDS = (7, 8, 9, 10, 11)


@dataclass(frozen=True)
class Job:
    trace: str
    startup_s: int
    controller: str
    fraction: float
    seeds: tuple[int, ...]
    base_replicas: float
    slo_ms: float
    p99_target_ms: float
    model: ServiceModel
    phases: tuple[float, ...] = (0.0,)


def make_controller(job: Job) -> Controller:
    mu = job.model.capacity_qps
    if job.controller == "ours":
        return Ours(target=job.fraction * mu, target_p99_ms=job.p99_target_ms)
    if job.controller == "ours-spec":
        # The algorithm exactly as first specified: HPA arithmetic for p99 too, HPA rate limits, 300 s.
        return Ours(
            target=job.fraction * mu,
            target_p99_ms=job.p99_target_ms,
            latency_step=LatencyStep.RATIO,
            name="ours-spec",
            extra={
                "overloadBypassesRateLimit": False,
                "scaleDownWindowStartupFactor": None,
                "adaptiveScaleDownWindow": False,
            },
        )
    if job.controller == "ours-5s":
        return Ours(target=job.fraction * mu, target_p99_ms=job.p99_target_ms, name="ours-5s", interval=5)
    if job.controller.startswith("ours-x"):
        # Experiments: ours-x<key>=<json>;<key>=<json> overrides the algorithm's configuration.
        # `interval` is the sync period in seconds, not an algorithm setting.
        extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in job.controller[6:].split(";"))}
        interval = int(extra.pop("interval", 15))
        # `p99x`: the p99 target as a multiple of the SLO (a looser target trades attainment for cost).
        p99x = float(extra.pop("p99x", 1.0))
        # `instant`: see `Ours.recent_seconds` (an upper bound for a queue-depth signal, not a controller).
        recent = int(extra.pop("instant", 0))
        return Ours(
            target=job.fraction * mu,
            target_p99_ms=job.p99_target_ms * p99x,
            name=job.controller,
            interval=interval,
            recent_seconds=recent,
            extra=extra,
        )
    if job.controller == "hpa":
        return Hpa(target=job.fraction * mu)
    if job.controller == "oracle":
        return Oracle(target=job.model.utilization_at_p99(0.9 * job.slo_ms / 1000.0) * mu)
    if job.controller == "kpa":
        # The sweep is over effective utilization; the KPA's own target is that over its 70 %.
        return Kpa(target=job.fraction * mu / 0.7)
    raise ValueError(f"unknown controller {job.controller!r}")


def run_job(job: Job) -> dict[str, Any]:
    """One controller at one target on one trace, averaged over the trace's seeds and the sync phases."""
    interval = make_controller(job).interval
    # Phases that round to the same second (a 1 s or 2 s tick) would only repeat a run.
    offsets = sorted({round(phase * interval) for phase in job.phases})
    base_qps = job.base_replicas * job.model.capacity_qps
    traces = [trace_arrivals(job.trace, base_qps=base_qps, seed=seed) for seed in job.seeds]
    results: list[RunResult] = []
    for arrivals in traces:
        for offset in offsets:
            controller = make_controller(job)
            results.append(
                simulate(
                    arrivals,
                    controller,
                    model=job.model,
                    startup_s=job.startup_s,
                    slo_s=job.slo_ms / 1000.0,
                    phase=offset,
                )
            )
    result = results[0]

    def mean(attr: str, digits: int) -> float:
        return round(float(np.mean([getattr(r, attr) for r in results])), digits)

    return {
        "trace": job.trace,
        "startup_s": job.startup_s,
        "controller": job.controller,
        "target": round(controller.target, 3),
        "utilization_target": round(controller.target / job.model.capacity_qps, 3)
        if isinstance(controller, Oracle)
        else job.fraction,
        "slo_attainment": mean("slo_attainment", 4),
        "minute_attainment": mean("minute_attainment", 2),
        "replica_seconds": mean("replica_seconds", 1),
        "flaps": mean("flaps", 2),
        "dropped": mean("dropped", 0),
        "scaling_actions": mean("scaling_actions", 2),
        "seeds": len(job.seeds),
        "phases": len(offsets),
        "series": {
            "replicas": result.replicas[::10].astype(int).tolist(),
            "rate": traces[0][::10].astype(int).tolist(),
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Comparing curves


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier of (cost, attainment): points no other point beats on both."""
    best: list[tuple[float, float]] = []
    for cost, att in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or att > best[-1][1]:
            best.append((cost, att))
    return best


# Attainments closer than this (percentage points) count as equal: below it the difference is noise.
EQUAL_ATTAINMENT_PP = 0.1


def cost_at(points: Sequence[tuple[float, float]], attainment: float) -> float | None:
    """The cheapest run reaching `attainment` (within EQUAL_ATTAINMENT_PP; no interpolation)."""
    costs = [c for c, a in points if a >= attainment - EQUAL_ATTAINMENT_PP]
    return min(costs) if costs else None


def compare(ours: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """At each of the other controller's frontier points, how much ours costs to reach its attainment."""
    rows: list[dict[str, float | None]] = []
    savings: list[float] = []
    for cost, att in frontier(other):
        mine = cost_at(ours, att)
        rows.append({"attainment": att, "other": cost, "ours": mine})
        if mine is not None:
            savings.append(1.0 - mine / cost)
    reached = [r for r in rows if r["ours"] is not None]
    top = rows[-1] if rows else None  # the frontier is sorted by cost, so its last point attains the most
    # The other direction: at ours' frontier points, what the baseline pays (None: it never gets there).
    reverse = [(cost, cost_at(other, att)) for cost, att in frontier(ours)]
    reverse_savings = [1.0 - mine / theirs for mine, theirs in reverse if theirs is not None]
    return {
        "reverse_unreachable": sum(1 for _, theirs in reverse if theirs is None),
        "reverse_points": len(reverse),
        "reverse_median_saving": float(np.median(reverse_savings)) if reverse_savings else None,
        "levels": rows,
        "dominates": len(reached) == len(rows) and all(s >= -1e-9 for s in savings),
        "min_saving": min(savings) if savings else None,
        "median_saving": float(np.median(savings)) if savings else None,
        "max_saving": max(savings) if savings else None,
        "unreached": len(rows) - len(reached),
        "best_attainment": None if top is None else top["attainment"],
        "saving_at_best": None
        if top is None or top["ours"] is None or not top["other"]
        else 1.0 - float(top["ours"]) / float(top["other"]),
    }


def summarize(records: list[dict[str, Any]], controllers: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for trace in sorted({r["trace"] for r in records}, key=TRACES.index):
        for startup in sorted({r["startup_s"] for r in records}):
            pts = {
                c: [
                    (r["replica_seconds"], r["slo_attainment"])
                    for r in records
                    if r["trace"] == trace and r["startup_s"] == startup and r["controller"] == c
                ]
                for c in controllers
            }
            key = f"{trace}/{startup}"
            summary[key] = {
                f"{mine} vs {other}": compare(pts[mine], pts[other])
                for mine in controllers
                if mine.startswith("ours") and pts[mine]
                for other in (*BASELINES, "oracle")
                if pts.get(other)
            }
    return summary


# ---------------------------------------------------------------------------------------------------------
# Output


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f}%"


def write_markdown(
    path: Path,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    header: list[str],
    controllers: Sequence[str],
) -> None:
    lines = ["# Autoscaler simulation", "", *header, ""]
    lines += [
        "## Goal check: replica-seconds saved by ours at the attainment each baseline reaches",
        "",
        "For every point on a baseline's cost/attainment frontier, the cheapest run of ours reaching at",
        f"least that attainment, less {EQUAL_ATTAINMENT_PP} point (no interpolation).",
        "`saving` = 1 - ours/baseline (positive: ours is cheaper);"
        " `dominates` = ours matches or beats every frontier point.",
        "",
        "The last two columns look the other way: at each point of ours' frontier, ours' median saving"
        " over the cheapest baseline run as good, and how many of ours' points the baseline never reaches.",
        "",
        "`at its best` = the saving at the highest attainment the baseline reaches (its most SLO-faithful"
        " target), which is what a team defending an SLO would pick.",
        "",
        "| trace | start-up | comparison | dominates | at its best (attainment) | min saving | median saving |"
        " max saving | unreached | reverse median | ours' points out of reach |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, per in summary.items():
        trace, startup = key.split("/")
        for other, cmp in per.items():
            lines.append(
                f"| {trace} | {startup} s | {other} | {'yes' if cmp['dominates'] else 'no'} | "
                f"{pct(cmp['saving_at_best'])} ({cmp['best_attainment']:.2f}%) | "
                f"{pct(cmp['min_saving'])} | {pct(cmp['median_saving'])} | {pct(cmp['max_saving'])} | "
                f"{cmp['unreached']} | {pct(cmp['reverse_median_saving'])} | "
                f"{cmp['reverse_unreachable']}/{cmp['reverse_points']} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| trace | start-up | controller | target (req/s/pod) | util. target | SLO attainment | minutes OK |"
        " replica-s | actions | flaps | dropped |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {c: i for i, c in enumerate(controllers)}
    for r in sorted(
        records, key=lambda r: (TRACES.index(r["trace"]), r["startup_s"], order[r["controller"]], r["target"])
    ):
        lines.append(
            f"| {r['trace']} | {r['startup_s']} s | {r['controller']} | {r['target']:.0f} | "
            f"{r['utilization_target']:.2f} | {r['slo_attainment']:.2f}% | {r['minute_attainment']:.1f}% | "
            f"{r['replica_seconds']:.0f} | {r['scaling_actions']} | {r['flaps']} | {r['dropped']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plots(out: Path, records: list[dict[str, Any]], controllers: Sequence[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors: dict[str, Any] = {
        "ours": "tab:green",
        "hpa": "tab:blue",
        "kpa": "tab:orange",
        "ours-spec": "tab:olive",
        "ours-5s": "tab:purple",
        "oracle": "black",
    }
    for trace in sorted({r["trace"] for r in records}, key=TRACES.index):
        startups = sorted({r["startup_s"] for r in records})
        fig, axes = plt.subplots(2, len(startups), figsize=(5 * len(startups), 8), squeeze=False)
        for col, startup in enumerate(startups):
            ax = axes[0][col]
            for c in controllers:
                rs = sorted(
                    (r for r in records if r["trace"] == trace and r["startup_s"] == startup and r["controller"] == c),
                    key=lambda r: r["replica_seconds"],
                )
                if not rs:
                    continue
                ax.plot(
                    [r["replica_seconds"] / 3600 for r in rs],
                    [r["slo_attainment"] for r in rs],
                    "o-",
                    color=colors.get(c),
                    label=c,
                )
            ax.set_title(f"{trace}, start-up {startup} s")
            ax.set_xlabel("replica-hours")
            ax.set_ylabel("% requests within SLO")
            ax.grid(alpha=0.3)
            ax.legend()
            ax2 = axes[1][col]
            for c in controllers:
                rs = [r for r in records if r["trace"] == trace and r["startup_s"] == startup and r["controller"] == c]
                if not rs:
                    continue
                # The time series of the run closest to 99 % attainment at the lowest cost.
                good = [r for r in rs if r["slo_attainment"] >= 99.0] or rs
                pick = min(good, key=lambda r: r["replica_seconds"])
                ax2.plot(
                    np.arange(len(pick["series"]["replicas"])) * 10 / 60,
                    pick["series"]["replicas"],
                    color=colors.get(c),
                    label=f"{c} (target {pick['target']:.0f})",
                )
            rate = rs[0]["series"]["rate"] if rs else []
            ax3 = ax2.twinx()
            ax3.plot(np.arange(len(rate)) * 10 / 60, rate, color="grey", alpha=0.3)
            ax3.set_ylabel("offered req/s", color="grey")
            ax2.set_xlabel("minutes")
            ax2.set_ylabel("replicas")
            ax2.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"autoscale_{trace}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 targets, 2 traces x 1 start-up: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--runtime-results", type=Path, default=Path("bench/results/runtime.json"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--seeds",
        default=",".join(str(s) for s in SEEDS),
        help="trace seeds to average over (one MMPP draw has only a dozen bursts)",
    )
    parser.add_argument(
        "--slo-ms", type=float, default=None, help="the p99 latency SLO being scored (default: the service model's)"
    )
    parser.add_argument(
        "--service-model",
        choices=("calibrated", "defaults"),
        default="calibrated",
        help="calibrated: from --runtime-results when it exists (else the defaults)",
    )
    parser.add_argument(
        "--p99-target-ms",
        type=float,
        default=None,
        help="our targetP99LatencyMilliseconds (default: the SLO)",
    )
    parser.add_argument("--base-replicas", type=float, default=6.37, help="base load, in replicas' capacity")
    parser.add_argument("--traces", default=",".join(TRACES))
    parser.add_argument("--startups", default=",".join(str(s) for s in STARTUPS))
    parser.add_argument("--controllers", default=",".join(CONTROLLERS))
    parser.add_argument(
        "--phases",
        default=",".join(f"{p:.4g}" for p in PHASES),
        help="sync phases to average over, as fractions of the sync period",
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    model = load_service_model(args.runtime_results) if args.service_model == "calibrated" else DEFAULT_MODEL
    if args.slo_ms is None:
        args.slo_ms = model.slo_ms
    traces = args.traces.split(",")
    startups = [int(s) for s in args.startups.split(",")]
    controllers = args.controllers.split(",")
    fractions: tuple[float, ...] = FULL_FRACTIONS
    if args.quick:
        traces = [t for t in traces if t in ("bursty", "spike10")] or traces[:1]
        startups = startups[1:2] or startups
        fractions = QUICK_FRACTIONS
    p99_target = args.p99_target_ms or args.slo_ms
    phases = tuple(float(p) for p in args.phases.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    jobs = [
        Job(trace, startup, c, f, seeds, args.base_replicas, args.slo_ms, p99_target, model, phases)
        for trace in traces
        for startup in startups
        for c in controllers
        for f in (fractions if c != "oracle" else fractions[:1])
    ]
    started = time.monotonic()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(run_job, jobs, chunksize=4))
    else:
        records = [run_job(j) for j in jobs]
    elapsed = time.monotonic() - started

    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, controllers)
    header = [
        f"Service model: {model.describe()}.",
        f"SLO: p99 <= {args.slo_ms:g} ms; our targetP99LatencyMilliseconds {p99_target:g} ms; at steady load"
        f" p99 reaches the SLO at {model.utilization_at_p99(args.slo_ms / 1000):.0%} utilization.",
        f"Base load {args.base_replicas:g} replicas' capacity"
        f" ({args.base_replicas * model.capacity_qps:.0f} req/s); seeds {args.seeds};"
        f" {len(records)} runs in {elapsed:.0f} s, each the mean over the seeds' traces and over sync phases"
        f" {', '.join(f'{p:.2g}' for p in phases)} of the controller's sync period (load changes do not wait"
        " for its clock)"
        f"{' (--quick)' if args.quick else ''}.",
        "Targets are swept as a utilization fraction of one replica's capacity; the KPA's configured target"
        " is that fraction over its 70 % target utilization, so all three aim at the same per-pod load.",
        "Metrics windows: ours and the HPA see 15 s windows every 15 s (ours-5s: 5 s every 5 s);"
        " the KPA sees per-second totals every 2 s.",
        "Controllers: `ours` = the real algorithm, defaults, 15 s sync; `ours-5s` = same, 5 s sync;"
        " `ours-spec` = the algorithm as first specified (HPA arithmetic on p99 too, HPA rate limits,"
        " fixed 300 s window); `hpa` = Kubernetes HPA, default behavior; `kpa` = Knative KPA, RPS mode;"
        " `oracle` = perfect foresight (reads the trace one start-up time ahead, sizes for p99 at 90 % of the"
        " SLO; one run, not a sweep): what no reactive controller can beat.",
    ]
    (args.out / "autoscale.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "series"} for r in records], indent=1) + "\n"
    )
    write_markdown(args.out / "autoscale.md", records, summary, header, controllers)
    plots = [] if args.no_plots else write_plots(args.out, records, controllers)
    for line in header:
        print(line)
    for key, per in summary.items():
        for other, cmp in per.items():
            print(
                f"{key:>14} {other:>14}: dominates={cmp['dominates']!s:5}"
                f" saving at its best {pct(cmp['saving_at_best'])} min"
                f" {pct(cmp['min_saving'])} median {pct(cmp['median_saving'])} max {pct(cmp['max_saving'])}"
                f" unreached {cmp['unreached']}; ours' points out of its reach"
                f" {cmp['reverse_unreachable']}/{cmp['reverse_points']}"
            )
    steady_flaps = {
        r["controller"]: max(
            (x["flaps"] for x in records if x["trace"] == "steady" and x["controller"] == r["controller"]),
            default=0,
        )
        for r in records
        if r["trace"] == "steady"
    }
    if steady_flaps:
        print("most flaps on steady traffic, over all targets:", steady_flaps)
    print(f"wrote {args.out / 'autoscale.json'}, {args.out / 'autoscale.md'}" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
