"""`modelfleet operator`: runs the kopf operator against the cluster KUBECONFIG or the service account names."""

from __future__ import annotations

import argparse
import asyncio

import kopf

from modelfleet_operator import logs, metrics
from modelfleet_operator.autoscaler.controller import Autoscaler
from modelfleet_operator.autoscaler.sources import PodScrapeSource
from modelfleet_operator.controller import Controller
from modelfleet_operator.handlers import register
from modelfleet_operator.k8s import Kube
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
    controller = Controller(settings, Kube.from_environment(observability(args, autoscaler)), autoscaler)
    registry = kopf.OperatorRegistry()
    register(registry, controller)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,  # one replica with a Recreate strategy; no peering objects to write
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=liveness,
        )
    )
    return 0


def observability(args: argparse.Namespace, autoscaler: Autoscaler) -> metrics.OperatorMetrics:
    """Structured logs on stderr; the operator's and the autoscaler's metrics on one /metrics (if a port is set)."""
    logs.configure(args.log_format, verbose=args.verbose)
    operator_metrics = metrics.OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, operator_metrics.registry, autoscaler.registry)
    return operator_metrics
