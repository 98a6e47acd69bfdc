"""The one module that talks to the Kubernetes API (besides kopf's own watches): apply, delete, status, events."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import urllib3
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from modelfleet_operator.api import API_VERSION, KIND
from modelfleet_operator.metrics import OperatorMetrics

FIELD_MANAGER = "modelfleet"
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An API call failed; `status` is the HTTP code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason = status, reason

    @property
    def transient(self) -> bool:
        """Worth retrying as is: no answer (connection refused/reset, timeout), 429, or a 5xx."""
        return self.status in {0, 429} or self.status >= 500


class NamespaceTerminating(ApiError):
    """The namespace is being deleted: nothing can be created in it any more."""


def _translate(exc: ApiException) -> ApiError:
    body = str(exc.body or "")
    cls = NamespaceTerminating if exc.status == 403 and "NamespaceTerminating" in body else ApiError
    return cls(int(exc.status or 0), str(exc.reason or ""), body[:500])


@contextmanager
def _calling() -> Iterator[None]:
    """API errors and transport failures (connection refused/reset, timeouts) as one ApiError, no traceback."""
    try:
        yield
    except ApiException as exc:
        raise _translate(exc) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ApiError(0, type(exc).__name__, _transport_reason(exc)) from None


def _transport_reason(exc: BaseException) -> str:
    """urllib3 wraps the cause (MaxRetryError -> NewConnectionError -> ConnectionRefusedError): the innermost."""
    reason = getattr(exc, "reason", None)
    return _transport_reason(reason) if isinstance(reason, BaseException) else str(exc)[:300]


def _empty(value: Any) -> bool:
    """What the API server leaves out when it stores an object (Go's omitempty): {}, [], "", 0, false, null."""
    return value is None or value is False or value == 0 or (isinstance(value, (str, list, dict)) and not value)


def contains(actual: Any, desired: Any) -> bool:
    """Does `actual` hold every field of `desired` with the same value? (what the server added is ignored)

    A field we set to an empty value and the server dropped counts as held: otherwise every reconcile
    would re-apply an object that already is as we want it.
    """
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            contains(actual[k], v) if k in actual else _empty(v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


EVENT_SOURCE = "modelfleet-operator"
EVENT_CACHE_SIZE = 4096  # client-go's maxLruCacheEntries
EVENT_WINDOW_SECONDS = 600.0  # client-go's defaultAggregateIntervalInSeconds


def event_key(event: Mapping[str, Any]) -> tuple[str, ...]:
    """What makes two Events the same occurrence, as client-go's getEventKey: source, involvedObject, type,
    reason and message."""
    source, involved = event.get("source") or {}, event.get("involvedObject") or {}
    return (
        str(source.get("component") or ""),
        str(source.get("host") or ""),
        *(str(involved.get(f) or "") for f in ("kind", "namespace", "name", "fieldPath", "uid", "apiVersion")),
        str(event.get("type") or ""),
        str(event.get("reason") or ""),
        str(event.get("message") or ""),
    )


@dataclass
class SeenEvent:
    name: str
    namespace: str
    count: int
    seen: float  # monotonic time of the last occurrence


class EventCache:
    """The Events this process recorded, least recently seen evicted first (a bounded LRU, as client-go's)."""

    def __init__(
        self,
        size: int = EVENT_CACHE_SIZE,
        window: float = EVENT_WINDOW_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size, self.window, self.monotonic = size, window, monotonic
        self._entries: OrderedDict[tuple[str, ...], SeenEvent] = OrderedDict()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def repeat_of(self, key: tuple[str, ...]) -> SeenEvent | None:
        """The Event to count this occurrence on: the same key seen within the window."""
        seen = self._entries.get(key)
        if seen is None or self.monotonic() - seen.seen > self.window:
            return None
        return seen

    def record(self, key: tuple[str, ...], *, name: str, namespace: str, count: int) -> None:
        self._entries[key] = SeenEvent(name=name, namespace=namespace, count=count, seen=self.monotonic())
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class Kube:
    """Synchronous API calls (run them in a thread); counts every request it makes."""

    def __init__(self, api_client: client.ApiClient, metrics: OperatorMetrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        _count_requests(api_client, self.metrics)  # first: discovery's requests count too
        self._api_client = api_client
        self._dynamic_client: dynamic.DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}
        self.requests: Counter[str] = Counter()
        self._instance = socket.gethostname()
        self.events = EventCache()

    @classmethod
    def from_environment(cls, metrics: OperatorMetrics | None = None) -> Kube:
        """In-cluster service account when there is one, else KUBECONFIG / ~/.kube/config."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
        api_client.user_agent = "modelfleet-operator"
        return cls(api_client, metrics)

    @property
    def _dynamic(self) -> dynamic.DynamicClient:
        """Made on first use: its discovery calls the API server, which need not be up when the operator starts."""
        if self._dynamic_client is None:
            with _calling():
                self._dynamic_client = dynamic.DynamicClient(self._api_client)
        return self._dynamic_client

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            with _calling():
                self._resources[key] = self._dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Server-side apply as field manager `modelfleet`: we own what we set, nothing else."""
        meta = obj["metadata"]
        self.requests[f"apply {obj['kind']}"] += 1
        with _calling():
            self._dynamic.server_side_apply(
                self._resource(obj["apiVersion"], obj["kind"]),
                body=dict(obj),
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )

    def delete(self, *, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.requests[f"delete {kind}"] += 1
        try:
            with _calling():
                self._resource(api_version, kind).delete(
                    name=name, namespace=namespace, body={"propagationPolicy": "Background"}
                )
        except ApiError as exc:
            if exc.status != 404:
                raise

    def patch_status(self, *, namespace: str, name: str, status: Mapping[str, Any]) -> str:
        """Replace the status we own (merge patch on the status subresource; spec is never written).

        Returns the object's new resourceVersion.
        """
        self.requests["patch InferenceModel/status"] += 1
        resource = self._resource(API_VERSION, KIND)
        # Lists are replaced whole by a merge patch; fields we no longer report are set to null.
        with _calling():
            updated = self._dynamic.patch(
                resource.subresources["status"],
                body={"status": dict(status)},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                field_manager=FIELD_MANAGER,
            )
        return str(updated.metadata.resourceVersion)

    def termination_message(self, *, namespace: str, job: str) -> str | None:
        """The build container's termination message of the Job's newest finished pod."""
        self.requests["list Pod"] += 1
        with _calling():
            found = self._resource("v1", "Pod").get(namespace=namespace, label_selector=f"job-name={job}")
        finished = []
        for pod in found.to_dict().get("items") or []:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == "build" and terminated:
                    finished.append((terminated.get("finishedAt") or "", terminated.get("message")))
        return max(finished)[1] if finished else None

    def emit_event(self, *, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event; a repeat within 10 minutes counts on the Event already there (count, lastTimestamp),
        as client-go's EventCorrelator does, instead of creating one object per occurrence."""
        event = self._event(involved, type_, reason, message)
        key = event_key(event)
        try:
            with self.events.lock:  # one writer per key at a time, so a repeat never races its first
                repeat = self.events.repeat_of(key)
                stored = self._count_event(repeat, event) if repeat is not None else None
                if stored is None:
                    stored = self._create_event(event)
                self.events.record(key, name=stored[0], namespace=event["metadata"]["namespace"], count=stored[1])
        except ApiError as exc:  # an event lost is not worth failing a reconcile for
            log.warning(
                "could not record event",
                extra={
                    "namespace": involved["metadata"]["namespace"],
                    "object_name": involved["metadata"]["name"],
                    "reason": reason,
                    "error": str(exc)[:300],
                    "transient": exc.transient,
                },
            )

    def _event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": "modelfleet.io/operator",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }

    def _create_event(self, event: Mapping[str, Any]) -> tuple[str, int]:
        self.requests["create Event"] += 1
        with _calling():
            created = self._resource("v1", "Event").create(body=dict(event), namespace=event["metadata"]["namespace"])
        return str(created.metadata.name), 1

    def _count_event(self, seen: SeenEvent, event: Mapping[str, Any]) -> tuple[str, int] | None:
        """Patch count and lastTimestamp of the Event `seen` names; None if it is gone (TTL, deleted)."""
        self.requests["patch Event"] += 1
        patch = {"count": seen.count + 1, "lastTimestamp": event["lastTimestamp"]}
        try:
            with _calling():
                self._dynamic.patch(
                    self._resource("v1", "Event"),
                    body=patch,
                    name=seen.name,
                    namespace=seen.namespace,
                    content_type="application/merge-patch+json",
                )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return seen.name, seen.count + 1

    def get_lease(self, *, namespace: str, name: str, timeout: float) -> dict[str, Any] | None:
        """The coordination.k8s.io/v1 Lease as JSON, or None when there is none."""
        self.requests["get Lease"] += 1
        try:
            with _calling():
                lease = self._resource("coordination.k8s.io/v1", "Lease").get(
                    name=name, namespace=namespace, _request_timeout=timeout
                )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(lease.to_dict())

    def write_lease(
        self, *, namespace: str, name: str, spec: Mapping[str, Any], resource_version: str | None, timeout: float
    ) -> dict[str, Any]:
        """Create the Lease (no resource_version) or replace it only if unchanged since it was read (409 if not)."""
        self.requests["create Lease" if resource_version is None else "update Lease"] += 1
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": dict(spec)}
        resource = self._resource("coordination.k8s.io/v1", "Lease")
        with _calling():
            if resource_version is None:
                lease = resource.create(body=body, namespace=namespace, _request_timeout=timeout)
            else:
                lease = resource.replace(body=body, name=name, namespace=namespace, _request_timeout=timeout)
        return dict(lease.to_dict())


def _count_requests(api_client: client.ApiClient, metrics: OperatorMetrics) -> None:
    """Every HTTP request of this client, by method and status code, as client-go's rest_client_requests_total."""
    rest = api_client.rest_client
    send = rest.request

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        started, code = time.monotonic(), "<error>"
        try:
            response = send(method, url, *args, **kwargs)
            code = str(response.status)
            return response
        except ApiException as exc:
            code = str(exc.status) if exc.status else "<error>"
            raise
        finally:
            metrics.request(code=code, method=method, host=urlsplit(url).netloc, seconds=time.monotonic() - started)

    rest.request = counted  # type: ignore[method-assign]  # this client's requests only
