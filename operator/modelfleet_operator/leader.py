"""Leader election on a coordination.k8s.io/v1 Lease with client-go's semantics: only one operator replica acts."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from modelfleet_operator.k8s import ApiError, Kube
from modelfleet_operator.settings import OperatorSettings

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
JITTER = 0.2  # a standby waits retry_period x [1, 1.2): two standbys do not ask in lockstep
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    lease_duration: int  # seconds a standby waits, from when it saw the record change, before taking over
    renew_deadline: float  # seconds the leader keeps acting without a successful renew
    retry_period: float  # seconds between renews (leader) and tries (standby)

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> Timing:
        return cls(
            lease_duration=settings.leader_election_lease_duration_seconds,
            renew_deadline=settings.leader_election_renew_deadline_seconds,
            retry_period=settings.leader_election_retry_period_seconds,
        )


@dataclass(frozen=True)
class LeaseRecord:
    """The election record a Lease's spec holds (holder "" = nobody, e.g. released)."""

    holder: str = ""
    lease_duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> LeaseRecord:
        spec = spec or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def to_spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


@dataclass(frozen=True)
class Observation:
    record: LeaseRecord
    at: float  # local monotonic time at which this candidate first saw the record as it is


def micro_time(t: datetime) -> str:
    """Kubernetes MicroTime: RFC 3339 in UTC with microseconds."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def observe(previous: Observation | None, record: LeaseRecord, now: float) -> Observation:
    """A record's age counts from when *we* first saw it change, never from its renewTime (another machine's
    clock): clock skew between replicas cannot make a live leader look expired."""
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


def held_by_other(observation: Observation, identity: str, now: float, default_duration: int) -> bool:
    """Someone else holds the Lease and, by our own clock, it has not expired: do not touch it."""
    record = observation.record
    if not record.holder or record.holder == identity:
        return False
    return now < observation.at + (record.lease_duration_seconds or default_duration)


def claimed(current: LeaseRecord | None, identity: str, duration: int, now: datetime) -> LeaseRecord:
    """The record we write to acquire or renew: a renew keeps acquireTime, a change of holder counts a transition."""
    stamp = micro_time(now)
    if current is not None and current.holder == identity:
        return replace(current, lease_duration_seconds=duration, renew_time=stamp)
    transitions = 0 if current is None else current.transitions + 1
    return LeaseRecord(identity, duration, acquire_time=stamp, renew_time=stamp, transitions=transitions)


def released(current: LeaseRecord, now: datetime) -> LeaseRecord:
    """What a leader writes when it stops: no holder, so a standby acquires on its next try (as client-go)."""
    stamp = micro_time(now)
    return LeaseRecord("", 1, acquire_time=stamp, renew_time=stamp, transitions=current.transitions)


def lease_namespace(env: Mapping[str, str], fallback: str, account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The operator's own namespace: the downward API's POD_NAMESPACE, else the service account's, else `fallback`."""
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    with suppress(OSError):
        if namespace := account_file.read_text().strip():
            return namespace
    return fallback


def candidate_identity(env: Mapping[str, str], hostname: str, suffix: str) -> str:
    """POD_NAME (or the hostname) plus a random suffix: a restarted process is a new candidate, as in
    controller-runtime, so it never mistakes its predecessor's Lease for its own."""
    return f"{env.get('POD_NAME') or hostname}_{suffix}"


class LeaseStore:
    """The Lease through `Kube`; blocking calls (the elector runs them in its own threads)."""

    def __init__(self, kube: Kube, *, namespace: str, name: str, timeout: float) -> None:
        self.kube, self.namespace, self.name, self.timeout = kube, namespace, name, timeout

    def get(self) -> tuple[LeaseRecord, str] | None:
        lease = self.kube.get_lease(namespace=self.namespace, name=self.name, timeout=self.timeout)
        if lease is None:
            return None
        return LeaseRecord.from_spec(lease.get("spec")), str(lease["metadata"]["resourceVersion"])

    def write(self, record: LeaseRecord, resource_version: str | None) -> LeaseRecord:
        """Create (no resource_version) or replace what we read; someone else's write in between is a 409."""
        lease = self.kube.write_lease(
            namespace=self.namespace,
            name=self.name,
            spec=record.to_spec(),
            resource_version=resource_version,
            timeout=self.timeout,
        )
        return LeaseRecord.from_spec(lease.get("spec"))


class LeaderElector:
    """One candidate: `acquire` (standby), `hold` (renew while leading), `release` (graceful stop)."""

    def __init__(self, store: LeaseStore, identity: str, timing: Timing) -> None:
        self.store, self.identity, self.timing = store, identity, timing
        self.leading = False
        self._observed: Observation | None = None
        self._failures = 0  # attempts failed in a row (an outage logs its first and its end)
        self._renewed_at = 0.0
        # Its own threads: the controller's work in the default executor never delays a renew.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="leader-election")

    @property
    def lease(self) -> str:
        return f"{self.store.namespace}/{self.store.name}"

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self._executor, fn, *args), self.timing.renew_deadline)

    def _note(self, record: LeaseRecord, now: float) -> None:
        previous = self._observed
        self._observed = observe(previous, record, now)
        if record.holder not in ("", self.identity) and (previous is None or previous.record.holder != record.holder):
            log.info("lease %s is held by %s; %s stands by", self.lease, record.holder, self.identity)

    async def _try_acquire_or_renew(self) -> bool:
        current = await self._blocking(self.store.get)
        if current is not None:
            self._note(current[0], time.monotonic())
            assert self._observed is not None
            if held_by_other(self._observed, self.identity, time.monotonic(), self.timing.lease_duration):
                return False
        record = claimed(current[0] if current else None, self.identity, self.timing.lease_duration, datetime.now(UTC))
        try:
            written = await self._blocking(self.store.write, record, current[1] if current else None)
        except ApiError as exc:
            if exc.status != 409:  # 409: another candidate wrote first, an ordinary race
                log.warning("lease %s: %s", self.lease, exc)
            return False
        self._note(written, time.monotonic())
        return True

    async def _attempt(self) -> bool:
        try:
            done = await self._try_acquire_or_renew()
        except Exception as exc:  # the API server away, a timeout: try again within the deadline
            # One line for an outage, not one per retry: the first failure, then the recovery.
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            extra = {"retry": self._failures, "transient": True}
            log.log(level, "lease %s: %s: %s (retrying)", self.lease, type(exc).__name__, exc, extra=extra)
            return False
        if self._failures:
            log.info("lease %s reachable again after %d failed attempts", self.lease, self._failures)
            self._failures = 0
        return done

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this candidate holds the Lease (True) or `stop` is set (False)."""
        log.info("%s is a candidate for lease %s", self.identity, self.lease)
        while not stop.is_set():
            started = time.monotonic()
            if await self._attempt():
                self.leading, self._renewed_at = True, started
                log.info("%s acquired lease %s", self.identity, self.lease)
                return True
            pause = self.timing.retry_period * random.uniform(1, 1 + JITTER)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
        return False

    async def hold(self) -> str:
        """Renew every retry period while leading; return why leadership ended (the caller stops at once)."""
        while True:
            await asyncio.sleep(self.timing.retry_period)
            if reason := await self._renew():
                self.leading = False
                return reason

    async def _renew(self) -> str | None:
        # The deadline counts from the *start* of the last successful renew: the write landed after it, so
        # the leader always stops before any standby (lease_duration after it saw that write) takes over.
        deadline = self._renewed_at + self.timing.renew_deadline
        while (remaining := deadline - time.monotonic()) > 0:
            started = time.monotonic()
            try:
                renewed = await asyncio.wait_for(self._attempt(), remaining)
            except TimeoutError:
                break
            if renewed:
                self._renewed_at = started
                return None
            if self._observed is not None and self._observed.record.holder not in ("", self.identity):
                return f"the lease is held by {self._observed.record.holder}"
            await asyncio.sleep(max(0.0, min(self.timing.retry_period, deadline - time.monotonic())))
        return f"no renew succeeded within the renew deadline ({self.timing.renew_deadline:g}s)"

    async def release(self) -> None:
        """Give the Lease up (graceful shutdown): a standby acquires on its next try instead of waiting it out."""
        if not self.leading:
            return
        self.leading = False
        try:
            current = await self._blocking(self.store.get)
            if current is None or current[0].holder != self.identity:
                return
            await self._blocking(self.store.write, released(current[0], datetime.now(UTC)), current[1])
            log.info("%s released lease %s", self.identity, self.lease)
        except Exception as exc:
            log.warning(
                "%s could not release lease %s (a standby takes over when it expires): %s",
                self.identity,
                self.lease,
                exc,
            )


def elector_from_environment(settings: OperatorSettings, kube: Kube, env: Mapping[str, str]) -> LeaderElector:
    """The candidate of this process: the Lease in the operator's namespace, identity from the pod's name."""
    timing = Timing.from_settings(settings)
    namespace = lease_namespace(env, settings.leader_election_namespace)
    store = LeaseStore(
        kube, namespace=namespace, name=settings.leader_election_lease_name, timeout=timing.renew_deadline
    )
    return LeaderElector(store, candidate_identity(env, socket.gethostname(), secrets.token_hex(3)), timing)


class Outcome(enum.Enum):
    STOPPED = "stopped before acquiring"
    FINISHED = "the work finished; the lease released"
    LOST = "the lease was lost"


async def lead(elector: LeaderElector, work: Callable[[], Coroutine[Any, Any, None]], stop: asyncio.Event) -> Outcome:
    """Run `work` only while holding the Lease. On LOST the work is still running: the caller must stop at once."""
    if not await elector.acquire(stop):
        return Outcome.STOPPED
    # The renew task exists before the work starts: kopf cancels, on its way out, only tasks it did not find.
    holding = asyncio.create_task(elector.hold(), name="leader-election renew")
    working = asyncio.create_task(work(), name="leader work")
    await asyncio.wait({holding, working}, return_when=asyncio.FIRST_COMPLETED)
    if holding.done():
        reason = holding.exception() or holding.result()
        log.error("%s lost lease %s: %s; stopping at once", elector.identity, elector.lease, reason)
        return Outcome.LOST
    holding.cancel()
    try:
        working.result()
    finally:
        await elector.release()
    return Outcome.FINISHED
