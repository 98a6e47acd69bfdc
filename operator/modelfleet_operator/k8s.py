"""The one module that talks to the Kubernetes API (besides kopf's own watches): apply, delete, status, events."""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

from modelfleet_operator.api import API_VERSION, KIND

FIELD_MANAGER = "modelfleet"
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An API call failed; `status` is the HTTP code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason = status, reason


class NamespaceTerminating(ApiError):
    """The namespace is being deleted: nothing can be created in it any more."""


def _translate(exc: ApiException) -> ApiError:
    body = str(exc.body or "")
    cls = NamespaceTerminating if exc.status == 403 and "NamespaceTerminating" in body else ApiError
    return cls(int(exc.status or 0), str(exc.reason or ""), body[:500])


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


class Kube:
    """Synchronous API calls (run them in a thread); counts every request it makes."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._dynamic = dynamic.DynamicClient(api_client)
        self._resources: dict[tuple[str, str], Any] = {}
        self.requests: Counter[str] = Counter()
        self._instance = socket.gethostname()

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster service account when there is one, else KUBECONFIG / ~/.kube/config."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
        api_client.user_agent = "modelfleet-operator"
        return cls(api_client)

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        if key not in self._resources:
            self._resources[key] = self._dynamic.resources.get(api_version=api_version, kind=kind)
        return self._resources[key]

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Server-side apply as field manager `modelfleet`: we own what we set, nothing else."""
        meta = obj["metadata"]
        self.requests[f"apply {obj['kind']}"] += 1
        try:
            self._dynamic.server_side_apply(
                self._resource(obj["apiVersion"], obj["kind"]),
                body=dict(obj),
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except ApiException as exc:
            raise _translate(exc) from None

    def delete(self, *, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.requests[f"delete {kind}"] += 1
        try:
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _translate(exc) from None

    def patch_status(self, *, namespace: str, name: str, status: Mapping[str, Any]) -> str:
        """Replace the status we own (merge patch on the status subresource; spec is never written).

        Returns the object's new resourceVersion.
        """
        self.requests["patch InferenceModel/status"] += 1
        resource = self._resource(API_VERSION, KIND)
        # Lists are replaced whole by a merge patch; fields we no longer report are set to null.
        try:
            updated = self._dynamic.patch(
                resource.subresources["status"],
                body={"status": dict(status)},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                field_manager=FIELD_MANAGER,
            )
        except ApiException as exc:
            raise _translate(exc) from None
        return str(updated.metadata.resourceVersion)

    def termination_message(self, *, namespace: str, job: str) -> str | None:
        """The build container's termination message of the Job's newest finished pod."""
        self.requests["list Pod"] += 1
        pods = self._resource("v1", "Pod").get(namespace=namespace, label_selector=f"job-name={job}").to_dict()
        finished = []
        for pod in pods.get("items") or []:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == "build" and terminated:
                    finished.append((terminated.get("finishedAt") or "", terminated.get("message")))
        return max(finished)[1] if finished else None

    def emit_event(self, *, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
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
            "source": {"component": "modelfleet-operator"},
            "reportingComponent": "modelfleet.io/operator",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.requests["create Event"] += 1
        try:
            self._resource("v1", "Event").create(body=event, namespace=meta["namespace"])
        except ApiException as exc:  # an event lost is not worth failing a reconcile for
            log.warning("could not record event %s on %s: %s", reason, meta["name"], exc.reason)

    def get_lease(self, *, namespace: str, name: str, timeout: float) -> dict[str, Any] | None:
        """The coordination.k8s.io/v1 Lease as JSON, or None when there is none."""
        self.requests["get Lease"] += 1
        try:
            lease = self._resource("coordination.k8s.io/v1", "Lease").get(
                name=name, namespace=namespace, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _translate(exc) from None
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
        try:
            if resource_version is None:
                lease = resource.create(body=body, namespace=namespace, _request_timeout=timeout)
            else:
                lease = resource.replace(body=body, name=name, namespace=namespace, _request_timeout=timeout)
        except ApiException as exc:
            raise _translate(exc) from None
        return dict(lease.to_dict())
