"""Serving pods and the model's Service expose the runtime's OIP gRPC port beside REST (or not, when off)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfleet_operator.reconcile import Observed, plan
from modelfleet_operator.resources import build_deployment
from modelfleet_operator.settings import OperatorSettings
from modelfleet_runtime.server import build_parser
from tests.operator.test_reconcile import ARCHS, FLEET, NOW, kinds, model


def runtime_grpc_port(settings: OperatorSettings) -> tuple[int, list[dict[str, object]]]:
    dep = build_deployment(model(), arch=ARCHS[0], engine_key_="k", replicas=1, settings=settings)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"][1:])  # what `modelfleet serve` reads from them
    return args.grpc_port, container["ports"]


@pytest.mark.parametrize("port", [8081, 9000])
def test_the_pod_serves_grpc_on_a_named_port_the_service_routes_with_app_protocol_grpc(port: int) -> None:
    settings = OperatorSettings(serving_grpc_port=port)
    served, ports = runtime_grpc_port(settings)
    assert served == port
    assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in ports
    service = kinds(plan(model(), Observed(nodes=FLEET), settings=settings, now=NOW), "Service")[0]
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc == {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    assert {p["name"] for p in ports} >= {p["targetPort"] for p in service["spec"]["ports"]}


def test_grpc_off_leaves_only_http() -> None:
    settings = OperatorSettings(serving_grpc_port=0)
    served, ports = runtime_grpc_port(settings)
    assert served == 0
    assert [p["name"] for p in ports] == ["http"]
    service = kinds(plan(model(), Observed(nodes=FLEET), settings=settings, now=NOW), "Service")[0]
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_grpc_and_http_cannot_share_a_port() -> None:
    with pytest.raises(ValidationError, match="serving_grpc_port must differ"):
        OperatorSettings(serving_port=9000, serving_grpc_port=9000)
