"""Runs reconciles: a coalescing work queue over InferenceModels, fed by watch events, writing only differences."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from modelfleet_operator.api import AutoscalingSpec, InferenceModel, InvalidInferenceModelError, parse_inference_model
from modelfleet_operator.autoscaler.algorithm import AutoscalerConfig
from modelfleet_operator.autoscaler.controller import Autoscaler, ServingPod
from modelfleet_operator.conditions import CAPACITY_REASONS
from modelfleet_operator.k8s import ApiError, Kube, NamespaceTerminating, contains
from modelfleet_operator.logs import ObjectLogger, for_object
from modelfleet_operator.metrics import OperatorMetrics
from modelfleet_operator.placement import NodeInfo
from modelfleet_operator.providers import ProviderProbe
from modelfleet_operator.reconcile import Observed, Plan, jobs_awaiting_results, parse_termination_message, plan
from modelfleet_operator.resources import ANNOTATION_ENGINE_KEY
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
        # Instrumentation: when each queued key was added, and how many times in a row each key failed.
        self.metrics: OperatorMetrics = kube.metrics
        self._added_at: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        # What each Ready GPU serving pod computes on, read once from its /metrics (a CPU fallback is Stalled).
        self.providers = ProviderProbe(on_result=self.enqueue, port=settings.serving_port)

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
            self._added_at[key] = time.monotonic()
            self.metrics.queued(self._queue.qsize())

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
        self.metrics.workers(self.workers)
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
        await self.providers.close()

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
                    _model_log(key).error("autoscaling failed", extra={"error": repr(result)})

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
            _model_log(key).exception("autoscaling failed")
            return
        self.autoscaled[key] = step.desired_replicas
        self.autoscaler_status[key] = step.status
        if step.event is not None and body is not None:
            kind, reason, message = step.event
            _model_log(key).info(
                "autoscaler decided",
                extra={"reason": reason, "type": kind, "replicas": current, "desired": step.desired_replicas},
            )
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
            started = time.monotonic()
            self.metrics.dequeued(self._queue.qsize(), started - self._added_at.pop(key, started))
            result = "error"
            try:
                await self.reconcile(key)
                result = "success"
                self._failures.pop(key, None)
            except NamespaceTerminating:
                result = "success"  # the namespace is going away with the model; nothing to reconcile
            except ApiError as exc:
                self._failed(key, exc)
            except Exception:  # one model's failure must not stop the others; it is retried later
                _model_log(key).exception("reconcile failed; retrying in 10s", extra={"retry": self._retry(key)})
            finally:
                self.metrics.reconciled(result, time.monotonic() - started)
                self._busy.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue(key)

    def _retry(self, key: Key) -> int:
        """Count one more failure of `key` in a row, and enqueue it again in 10 s."""
        self._failures[key] = self._failures.get(key, 0) + 1
        self.metrics.retried()
        asyncio.get_running_loop().call_later(10, self.enqueue, key)
        return self._failures[key]

    def _failed(self, key: Key, exc: ApiError) -> None:
        """One line per failed reconcile, no traceback; transient errors (no answer, 429, 5xx) at warning."""
        fields = {"code": exc.status, "error": str(exc)[:300], "transient": exc.transient, "retry": self._retry(key)}
        level = logging.WARNING if exc.transient else logging.ERROR
        _model_log(key).log(level, "reconcile failed; retrying in 10s", extra=fields)

    async def reconcile(self, key: Key) -> None:
        body = _first(self.models, key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self._written.pop(key, None)
            self.metrics.models.set(key, None)
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
            providers=self.providers.observe(key, name, list(self.pods.get(key, ()) if self.pods is not None else ())),
        )
        decided = plan(im, observed, settings=self.settings, now=self.clock().replace(microsecond=0))
        current = {
            **{("Job", n): o for n, o in jobs.items()},
            **{("Deployment", n): o for n, o in deployments.items()},
            **{("Service", n): o for n, o in services.items()},
        }
        olog = _model_log(key)
        for obj in decided.apply:
            existing = current.get((obj["kind"], obj["metadata"]["name"]))
            if not contains(existing, obj):
                await asyncio.to_thread(self.kube.apply, obj)
                _log_applied(olog, obj, existing)
        for ref in decided.delete:
            await asyncio.to_thread(
                self.kube.delete,
                api_version=ref.api_version,
                kind=ref.kind,
                namespace=namespace,
                name=ref.name,
            )
            olog.info("deleted", extra={"child_kind": ref.kind, "child": ref.name})
        if decided.status != (body.get("status") or {}):
            version = await asyncio.to_thread(
                self.kube.patch_status,
                namespace=namespace,
                name=name,
                status=_with_removals(body.get("status") or {}, decided.status),
            )
            self._written[key] = (_resource_version({"metadata": {"resourceVersion": version}}), decided.status)
            self._status_changed(olog, body.get("status") or {}, decided, jobs)
        self.metrics.models.set(key, decided.status.get("conditions") or [])
        for event in decided.events:
            olog.log(
                logging.WARNING if event.type == "Warning" else logging.INFO,
                event.message,
                extra={"reason": event.reason, "type": event.type, "event": True},
            )
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
        self.metrics.models.set((meta["namespace"], meta["name"]), status["conditions"])
        _model_log((meta["namespace"], meta["name"])).error("invalid spec", extra={"reason": "InvalidSpec"})
        await asyncio.to_thread(
            self.kube.emit_event, involved=body, type_="Warning", reason="InvalidSpec", message=message
        )

    def _status_changed(
        self, olog: ObjectLogger, old: Mapping[str, Any], decided: Plan, jobs: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Log each condition that changed, and count the builds that finished (their status just got written)."""
        before = {c.get("type"): c for c in old.get("conditions") or []}
        for c in decided.status.get("conditions") or []:
            was = before.get(c["type"]) or {}
            if (was.get("status"), was.get("reason")) != (c["status"], c.get("reason")):
                olog.info(
                    "condition changed",
                    extra={"condition": c["type"], "status": c["status"], "reason": c.get("reason"),
                           "from": was.get("status"), "detail": c.get("message")},
                )  # fmt: skip
        for arch, outcome, job in finished_builds(old, decided.status):
            seconds = _job_seconds(jobs.get(job))
            self.metrics.build_finished(arch, outcome, seconds)
            fields = {"architecture": arch, "outcome": outcome, "job": job, "seconds": seconds}
            olog.info("build finished", extra=fields)


def _model_log(key: Key) -> ObjectLogger:
    return for_object(log, *key)


def _log_applied(olog: ObjectLogger, obj: Mapping[str, Any], existing: Mapping[str, Any] | None) -> None:
    """One line per child written: created or configured; for a Deployment, the engine and replicas it moves to."""
    fields: dict[str, Any] = {"child_kind": obj["kind"], "child": obj["metadata"]["name"]}
    if obj["kind"] == "Deployment":
        new_key = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_ENGINE_KEY)
        old_key = ((existing or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ENGINE_KEY)
        old_replicas = ((existing or {}).get("spec") or {}).get("replicas")
        fields.update(engine=new_key, replicas=obj["spec"].get("replicas"))
        if existing is not None and old_key != new_key:
            fields.update(action="rolled", from_engine=old_key)
        elif existing is not None and old_replicas != obj["spec"].get("replicas"):
            fields.update(action="scaled", from_replicas=old_replicas)
    fields.setdefault("action", "created" if existing is None else "configured")
    message = "build started" if obj["kind"] == "Job" and existing is None else f"{obj['kind']} {fields['action']}"
    olog.info(message, extra=fields)


def finished_builds(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(architecture, succeeded | failed, job) of each engine whose build reached Ready or Failed in `new`."""
    before = {(e.get("architecture"), e.get("buildId")): e.get("phase") for e in old.get("engines") or []}
    out = []
    for e in new.get("engines") or []:
        phase = e.get("phase")
        if phase in {"Ready", "Failed"} and before.get((e.get("architecture"), e.get("buildId"))) != phase:
            out.append((str(e.get("architecture")), "succeeded" if phase == "Ready" else "failed", str(e.get("job"))))
    return out


def _job_seconds(job: Mapping[str, Any] | None) -> float | None:
    """A finished Job's run time, startTime to completionTime (or to its Failed condition)."""
    status = (job or {}).get("status") or {}
    end = status.get("completionTime") or next(
        (c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") == "Failed"), None
    )
    if not status.get("startTime") or not end:
        return None
    return (_parse_time(end) - _parse_time(status["startTime"])).total_seconds()


def _parse_time(value: Any) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _resource_version(body: Mapping[str, Any]) -> int:
    """etcd-backed resourceVersions are increasing integers; anything else compares as 'unknown' (0)."""
    try:
        return int(body["metadata"].get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


def _with_removals(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that also clears top-level status fields the new status no longer has."""
    return {**{k: None for k in old if k not in new}, **new}
