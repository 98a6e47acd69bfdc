"""`modelfleet operator`: runs the kopf operator against the cluster KUBECONFIG or the service account names."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import kopf
from aiohttp import web

from modelfleet_operator import logs, metrics
from modelfleet_operator.autoscaler.controller import Autoscaler
from modelfleet_operator.autoscaler.sources import PodScrapeSource
from modelfleet_operator.controller import Controller
from modelfleet_operator.handlers import register
from modelfleet_operator.k8s import Kube
from modelfleet_operator.leader import LeaderElector, Outcome, elector_from_environment, lead
from modelfleet_operator.settings import OperatorSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelfleet operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    parser.add_argument("--liveness-port", type=int, default=8081, help="port of /healthz (0: off)")
    parser.add_argument("--metrics-port", type=int, default=0, help="port of the operator's /metrics (0: off)")
    parser.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="act only while holding the Lease, so replicas can stand by (default); --no-leader-election acts at once",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=None,
        help="json lines, or text (logfmt key=value); default: text on a terminal, json otherwise",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = OperatorSettings(**({"namespaces": args.namespace} if args.namespace else {}))
    autoscaler = Autoscaler(PodScrapeSource())
    kube = Kube.from_environment(observability(args, autoscaler))
    controller = Controller(settings, kube, autoscaler)
    registry = kopf.OperatorRegistry()
    register(registry, controller)

    def operate(stop: asyncio.Event, ready: asyncio.Event) -> Coroutine[Any, Any, None]:
        return kopf.operator(
            registry=registry,
            standalone=True,  # no kopf peering: the Lease (leader.py) decides which replica acts
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            stop_flag=stop,
            ready_flag=ready,
        )

    elector = elector_from_environment(settings, kube, os.environ) if args.leader_election else None
    return asyncio.run(run(operate, elector, args.liveness_port))


async def run(
    operate: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, None]],
    elector: LeaderElector | None,
    liveness_port: int,
) -> int:
    """/healthz answers from the start (a standby is alive); the operator runs at once or only while leading."""
    stop, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def take_signals() -> None:  # SIGTERM/SIGINT set the stop flag, which kopf watches too
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async def retake_signals() -> None:
        # kopf installs its own handlers when it starts; stopping it through our flag instead spares its
        # shutdown a 5 s wait for the flag's waiter task (and covers a signal before kopf's handlers exist).
        await ready.wait()
        take_signals()

    take_signals()
    keeper = asyncio.create_task(retake_signals())  # before kopf starts: kopf leaves the tasks it found alone
    health = await serve_health(liveness_port, elector) if liveness_port else None
    try:
        if elector is None:
            await operate(stop, ready)
            return 0
        if await lead(elector, lambda: operate(stop, ready), stop) is Outcome.LOST:
            # Stop acting at once, as controller-runtime does: no handler may write after a standby took over.
            logging.shutdown()
            os._exit(1)
        return 0
    finally:
        keeper.cancel()
        if health is not None:
            await health.cleanup()


async def serve_health(port: int, elector: LeaderElector | None) -> web.AppRunner:
    """GET /healthz: 200 while the event loop runs, with this candidate's identity and whether it leads."""

    async def healthz(_: web.Request) -> web.Response:
        if elector is None:
            return web.json_response({"leaderElection": False})
        return web.json_response({"leaderElection": True, "identity": elector.identity, "leader": elector.leading})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def observability(args: argparse.Namespace, autoscaler: Autoscaler) -> metrics.OperatorMetrics:
    """Structured logs on stderr; the operator's and the autoscaler's metrics on one /metrics (if a port is set)."""
    logs.configure(args.log_format, verbose=args.verbose)
    operator_metrics = metrics.OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, operator_metrics.registry, autoscaler.registry)
    return operator_metrics
