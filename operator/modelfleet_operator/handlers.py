"""kopf decorators only: watch events feed the controller's queue; indices are its caches."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import kopf

from modelfleet_operator.api import GROUP, PLURAL, VERSION
from modelfleet_operator.capacity import OwnPod, finished, gpu_pod, pod_gpus, unschedulable_message
from modelfleet_operator.controller import ALL, Controller
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.resources import BUILD, LABEL_ARCH, LABEL_COMPONENT, LABEL_MODEL, SERVING

OWNED = {LABEL_MODEL: kopf.PRESENT}


def serving_pod(name: str, meta: kopf.Meta, status: kopf.Status) -> dict[str, Any]:
    """What the autoscaler needs of a serving pod: address, readiness, and how long it took to get Ready."""
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    is_ready = ready.get("status") == "True" and not meta.get("deletionTimestamp")
    startup = None
    created, became_ready = meta.get("creationTimestamp"), ready.get("lastTransitionTime")
    if is_ready and created and became_ready:
        startup = (_parse_time(became_ready) - _parse_time(created)).total_seconds()
    architecture = (meta.get("labels") or {}).get(LABEL_ARCH, "")
    return {
        "name": name,
        "ready": is_ready,
        "ip": status.get("podIP"),
        "startup": startup,
        "architecture": architecture,
    }


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Register every handler on `registry`, bound to `controller`."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        settings.scanning.disabled = True  # no CRD/namespace scanning, so no RBAC for it
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        await controller.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await controller.stop()

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="models")
    def models(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): dict(body)}

    @kopf.index("", "v1", "nodes", registry=registry, id="nodes")
    def nodes(body: kopf.Body, **_: Any) -> dict[Any, Any]:
        node = NodeInfo.from_node(body)
        return {node.name: node}

    @kopf.index("batch", "v1", "jobs", labels=OWNED, registry=registry, id="jobs")
    def jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[LABEL_MODEL]): dict(body)}

    @kopf.index(
        "apps",
        "v1",
        "deployments",
        labels={**OWNED, LABEL_COMPONENT: SERVING},
        registry=registry,
        id="deployments",
    )
    def deployments(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[LABEL_MODEL]): dict(body)}

    @kopf.index("", "v1", "services", labels=OWNED, registry=registry, id="services")
    def services(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels[LABEL_MODEL]): dict(body)}

    @kopf.index("", "v1", "pods", labels=OWNED, registry=registry, id="model_pods")
    def model_pods(name: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return (
            {(body.metadata.namespace, labels[LABEL_MODEL]): own_pod(name, labels, body)} if not finished(body) else {}
        )

    @kopf.index("", "v1", "pods", registry=registry, id="gpu_pods")
    def gpu_pods(labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        held = gpu_pod(body, build=LABEL_MODEL in labels and labels.get(LABEL_COMPONENT) == BUILD)
        return {ALL: held} if held is not None else {}

    @kopf.index("", "v1", "persistentvolumeclaims", registry=registry, id="claims")
    def claims(namespace: str | None, name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
        return {namespace: (name, status.get("phase") or "Pending")}

    @kopf.index("", "v1", "pods", labels={**OWNED, LABEL_COMPONENT: SERVING}, registry=registry, id="pods")
    def pods(
        namespace: str | None, name: str, labels: kopf.Labels, meta: kopf.Meta, status: kopf.Status, **_: Any
    ) -> dict[Any, Any]:
        return {(namespace, labels[LABEL_MODEL]): serving_pod(name, meta, status)}

    # Handlers that touch the controller are async: kopf runs sync handlers in threads, and the
    # controller's queue belongs to the event loop.
    def bind(kwargs: dict[str, Any]) -> None:
        controller.bind(
            models=kwargs["models"],
            nodes=kwargs["nodes"],
            jobs=kwargs["jobs"],
            deployments=kwargs["deployments"],
            services=kwargs["services"],
            pods=kwargs["pods"],
            model_pods=kwargs["model_pods"],
            gpu_pods=kwargs["gpu_pods"],
            claims=kwargs["claims"],
        )

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def model_event(namespace: str | None, name: str, type: str, **kwargs: Any) -> None:
        bind(kwargs)
        if type != "DELETED" and namespace:
            controller.enqueue((namespace, name))

    # Every kind the operator owns is watched, so a deleted or edited child is repaired within seconds.
    @kopf.on.event("batch", "v1", "jobs", labels=OWNED, registry=registry)
    @kopf.on.event("apps", "v1", "deployments", labels={**OWNED, LABEL_COMPONENT: SERVING}, registry=registry)
    @kopf.on.event("", "v1", "services", labels=OWNED, registry=registry)
    @kopf.on.event("", "v1", "pods", labels=OWNED, registry=registry)
    async def child_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
        bind(kwargs)
        if namespace:
            controller.enqueue((namespace, labels[LABEL_MODEL]))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(body: kopf.Body, name: str, type: str, **kwargs: Any) -> None:
        bind(kwargs)
        controller.node_changed(None if type == "DELETED" else NodeInfo.from_node(body), name)

    @kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry)
    async def claim_event(namespace: str | None, **kwargs: Any) -> None:
        bind(kwargs)
        if namespace:
            controller.enqueue_namespace(namespace)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def gpu_pod_event(body: kopf.Body, type: str, **kwargs: Any) -> None:
        """A GPU freed anywhere may let a model that waits for capacity grow."""
        if pod_gpus(body) and (type == "DELETED" or finished(body)):
            bind(kwargs)
            controller.capacity_freed()


def own_pod(name: str, labels: kopf.Labels, body: kopf.Body) -> OwnPod:
    return OwnPod(
        name=name,
        component=labels.get(LABEL_COMPONENT, ""),
        architecture=labels.get(LABEL_ARCH, ""),
        node=str(body.spec.get("nodeName") or ""),
        unschedulable=unschedulable_message(body),
    )
