"""Runs reconciles: a coalescing work queue over InferenceModels, fed by watch events, writing only differences."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from modelfleet_operator.api import AutoscalingSpec, InferenceModel, InvalidInferenceModelError, parse_inference_model
from modelfleet_operator.autoscaler.algorithm import AutoscalerConfig
from modelfleet_operator.autoscaler.controller import Autoscaler, ServingPod
from modelfleet_operator.conditions import CAPACITY_REASONS
from modelfleet_operator.k8s import ApiError, Kube, NamespaceTerminating, contains
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.reconcile import Observed, jobs_awaiting_results, parse_termination_message, plan
from modelfleet_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
ALL = "all"  # the one key of indices over the whole cluster (GPU pods)


class Index(Protocol):
    """What we use of a kopf index: key -> store of values."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def keys(self) -> Iterable[Any]: ...
    def values(self) -> Iterable[Any]: ...


def _first(index: Index | None, key: Any) -> Any:
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None


def _by_name(index: Index | None, key: Key) -> dict[str, Mapping[str, Any]]:
    store = index.get(key) if index is not None else None
    return {obj["metadata"]["name"]: obj for obj in store or ()}


class Controller:
    """Owns the queue and the caches (kopf indices); the decisions are `reconcile.plan`'s."""

    def __init__(
        self,
        settings: OperatorSettings,
        kube: Kube,
        autoscaler: Autoscaler,
        *,
        workers: int = 4,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings, self.kube, self.autoscaler = settings, kube, autoscaler
        self.workers, self.clock = workers, clock
        self.models: Index | None = None
        self.nodes: Index | None = None
        self.jobs: Index | None = None
        self.deployments: Index | None = None
        self.services: Index | None = None
        self.pods: Index | None = None
        self.model_pods: Index | None = None
        self.gpu_pods: Index | None = None
        self.claims: Index | None = None
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._busy: set[Key] = set()
        self._again: set[Key] = set()
        self._node_summary: dict[str, NodeInfo] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.autoscaled: dict[Key, int] = {}
        self.autoscaler_status: dict[Key, dict[str, Any]] = {}
        # The status we last wrote, with the resourceVersion it got: the watch cache may still hold an older
        # one, and deciding from that would announce the same Events twice and write the same status again.
        self._written: dict[Key, tuple[int, dict[str, Any]]] = {}

    def bind(self, **indices: Index) -> None:
        """Keep the live kopf indices (they are complete before any handler runs)."""
        for name, index in indices.items():
            setattr(self, name, index)

    def enqueue(self, key: Key) -> None:
        if key in self._busy:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_namespace(self, namespace: str) -> None:
        for key in list(self.models.keys() if self.models is not None else ()):
            if key[0] == namespace:
                self.enqueue(key)

    def capacity_freed(self) -> None:
        """Re-plan the models that wait for GPUs (their status says so), now that some are free."""
        for key in list(self.models.keys() if self.models is not None else ()):
            conditions = ((_first(self.models, key) or {}).get("status") or {}).get("conditions") or []
            if any(c.get("reason") in CAPACITY_REASONS and c.get("status") == "True" for c in conditions):
                self.enqueue(key)

    def enqueue_all(self) -> None:
        for key in list(self.models.keys() if self.models is not None else ()):
            self.enqueue(key)

    def node_changed(self, node: NodeInfo | None, name: str) -> None:
        """Re-plan every model when a node joins, leaves, or changes labels, taints or GPUs (not heartbeats)."""
        if node == self._node_summary.get(name):
            return
        if node is None:
            self._node_summary.pop(name, None)
        else:
            self._node_summary[name] = node
        self.enqueue_all()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(), name=f"reconcile-{i}") for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync(), name="resync"))
        self._tasks.append(asyncio.create_task(self._autoscale_loop(), name="autoscale"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.autoscaler.close()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            self.enqueue_all()

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.autoscale_interval_seconds)
            keys = list(self.models.keys() if self.models is not None else ())
            results = await asyncio.gather(*(self._autoscale_one(k) for k in keys), return_exceptions=True)
            for key, result in zip(keys, results, strict=True):
                if isinstance(result, Exception):  # one model's trouble must not stop the loop for the others
                    log.error("autoscaling %s/%s failed: %r", *key, result)

    async def _autoscale_one(self, key: Key) -> None:
        body = _first(self.models, key)
        try:
            im = parse_inference_model(body) if body is not None else None
        except InvalidInferenceModelError:
            im = None
        if im is None or im.spec.autoscaling is None:
            if key in self.autoscaled:
                self.autoscaled.pop(key)
                self.autoscaler_status.pop(key, None)
                self.autoscaler.forget("/".join(key))
            return
        deployments = _by_name(self.deployments, key)
        current = sum(int((d.get("spec") or {}).get("replicas", 0)) for d in deployments.values())
        if not deployments:
            return  # nothing serves yet: no metrics to read
        try:
            step = await self.autoscaler.step(
                key="/".join(key),
                model=im.metadata["name"],
                config=self._autoscaler_config(im),
                pods=self._serving_pods(key),
                current_replicas=current,
            )
        except Exception:  # a broken scrape must not stop the other models' autoscaling
            log.exception("autoscaling %s/%s failed", *key)
            return
        self.autoscaled[key] = step.desired_replicas
        self.autoscaler_status[key] = step.status
        if step.event is not None and body is not None:
            kind, reason, message = step.event
            await asyncio.to_thread(self.kube.emit_event, involved=body, type_=kind, reason=reason, message=message)
        if step.desired_replicas != current or (body or {}).get("status", {}).get("autoscaler") != step.status:
            self.enqueue(key)

    @staticmethod
    def _autoscaler_config(im: InferenceModel) -> AutoscalerConfig:
        assert im.spec.autoscaling is not None
        return Controller._autoscaler_config_from(im.spec.autoscaling)

    @staticmethod
    def _autoscaler_config_from(spec: AutoscalingSpec) -> AutoscalerConfig:
        """The algorithm's configuration: fields the user left unset stay unset, so they take HPA defaults."""
        return AutoscalerConfig.model_validate(spec.model_dump(by_alias=True, exclude_none=True))

    def _serving_pods(self, key: Key) -> list[ServingPod]:
        store = self.pods.get(key) if self.pods is not None else None
        return [
            ServingPod(
                name=p["name"],
                ready=p["ready"],
                host=p["ip"],
                port=self.settings.serving_port,
                startup_seconds=p["startup"],
            )
            for p in store or ()
        ]

    async def _worker(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._busy.add(key)
            try:
                await self.reconcile(key)
            except NamespaceTerminating:
                pass  # the namespace is going away with the model; nothing to reconcile
            except ApiError as exc:
                log.warning("reconcile of %s/%s failed: %s %s; retrying in 10s", *key, exc.status, exc.reason)
                asyncio.get_running_loop().call_later(10, self.enqueue, key)
            except Exception:  # one model's failure must not stop the others; it is retried later
                log.exception("reconcile of %s/%s failed; retrying in 10s", *key)
                asyncio.get_running_loop().call_later(10, self.enqueue, key)
            finally:
                self._busy.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue(key)

    async def reconcile(self, key: Key) -> None:
        body = _first(self.models, key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self._written.pop(key, None)
            return  # deleted: ownerReferences let the garbage collector remove the children
        namespace, name = key
        written = self._written.get(key)
        if written is not None and _resource_version(body) < written[0]:
            body = {**body, "status": written[1]}
        try:
            im = parse_inference_model(body)
        except InvalidInferenceModelError as exc:
            await self._invalid(body, str(exc))
            return
        jobs = _by_name(self.jobs, key)
        deployments = _by_name(self.deployments, key)
        services = _by_name(self.services, key)
        results = {}
        for job in jobs_awaiting_results(im, list(jobs.values())):
            message = await asyncio.to_thread(self.kube.termination_message, namespace=namespace, job=job)
            results[job] = parse_termination_message(message)
        nodes = [n for store in (self.nodes.values() if self.nodes is not None else ()) for n in store]
        observed = Observed(
            gpu_pods=list(self.gpu_pods.get(ALL, ()) if self.gpu_pods is not None else ()),
            pods=list(self.model_pods.get(key, ()) if self.model_pods is not None else ()),
            claims=None if self.claims is None else dict(self.claims.get(namespace, ())),
            nodes=nodes,
            jobs=list(jobs.values()),
            deployments=list(deployments.values()),
            build_results=results,
            autoscaled_replicas=self.autoscaled.get(key),
            autoscaler_status=self.autoscaler_status.get(key),
        )
        decided = plan(im, observed, settings=self.settings, now=self.clock().replace(microsecond=0))
        current = {
            **{("Job", n): o for n, o in jobs.items()},
            **{("Deployment", n): o for n, o in deployments.items()},
            **{("Service", n): o for n, o in services.items()},
        }
        for obj in decided.apply:
            if not contains(current.get((obj["kind"], obj["metadata"]["name"])), obj):
                await asyncio.to_thread(self.kube.apply, obj)
        for ref in decided.delete:
            await asyncio.to_thread(
                self.kube.delete,
                api_version=ref.api_version,
                kind=ref.kind,
                namespace=namespace,
                name=ref.name,
            )
        if decided.status != (body.get("status") or {}):
            version = await asyncio.to_thread(
                self.kube.patch_status,
                namespace=namespace,
                name=name,
                status=_with_removals(body.get("status") or {}, decided.status),
            )
            self._written[key] = (_resource_version({"metadata": {"resourceVersion": version}}), decided.status)
        for event in decided.events:
            await asyncio.to_thread(
                self.kube.emit_event,
                involved=body,
                type_=event.type,
                reason=event.reason,
                message=event.message,
            )

    async def _invalid(self, body: Mapping[str, Any], message: str) -> None:
        # Only reachable if the API server's schema let something through the models reject.
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "Ready",
            "status": "False",
            "reason": "InvalidSpec",
            "message": message[:4000],
            "observedGeneration": meta.get("generation", 0),
            "lastTransitionTime": now,
        }
        old = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        if old and {k: v for k, v in old[0].items() if k != "lastTransitionTime"} == {
            k: v for k, v in condition.items() if k != "lastTransitionTime"
        }:
            return
        status["conditions"] = [condition] + [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
        await asyncio.to_thread(self.kube.patch_status, namespace=meta["namespace"], name=meta["name"], status=status)
        await asyncio.to_thread(
            self.kube.emit_event, involved=body, type_="Warning", reason="InvalidSpec", message=message
        )


def _resource_version(body: Mapping[str, Any]) -> int:
    """etcd-backed resourceVersions are increasing integers; anything else compares as 'unknown' (0)."""
    try:
        return int(body["metadata"].get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


def _with_removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that also clears top-level status fields the new status no longer has."""
    return {**{k: None for k in old if k not in new}, **new}
