"""The DataPlane: metadata, health and infer for one served model; REST and gRPC stay thin over it.

It owns the model's lifecycle: loading, warming every batch size of the profile, ready, draining on
SIGTERM. Every infer request ends with exactly one outcome counted in the metrics.

Admission comes before work: unknown model, not ready, draining and a full queue are answered before the
body is read; a request admitted is then seen through even if draining starts while it uploads. Large
bodies decode in a thread so the event loop keeps answering; a request whose client has gone is not
submitted, and one already queued is cancelled (the batcher skips cancelled futures).

With the response cache on (cache.py), a request identical to an earlier successful one is answered from
memory once decoded and validated, without entering the queue; admission (model, state, queue room) still
comes first, so a full queue refuses hits too, before their bodies are read.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np

from modelfleet_runtime.adaptive import Tuner
from modelfleet_runtime.backends.base import Backend, ExecutionProvider, build_warmup_inputs
from modelfleet_runtime.batcher import Batcher, BatcherConfig
from modelfleet_runtime.batching import (
    ModelSignature,
    batch_key,
    supports_batching,
    validate_inputs,
    validate_outputs,
)
from modelfleet_runtime.cache import CachedResponse, ResponseCache, build_key, engine_identity, with_id
from modelfleet_runtime.loader import (
    ModelSource,
    build_model_source,
    build_warmup_batch_sizes,
    file_sha256,
    load_backend,
    shapes_known,
    with_served_shapes,
)
from modelfleet_runtime.metrics import Metrics
from modelfleet_runtime.placement import Placement
from modelfleet_runtime.protocol import (
    BackendError,
    InferenceError,
    InferRequest,
    ModelNotFound,
    QueueFull,
    Unavailable,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
)
from modelfleet_runtime.settings import ServeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVER_NAME = "modelfleet"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "model_configuration", "schedule_policy")


def _fastest_run(backend: Backend, feeds: dict[str, np.ndarray], repeats: int = 5) -> float:
    """The best of a few timed runs: what a batch costs when nothing else competes for the CPU."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        backend.infer(feeds)
        best = min(best, time.perf_counter() - began)
    return best


def clip(text: str, limit: int = 100) -> str:
    """Client input echoed in an error message, bounded."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class ClientGone(InferenceError):
    """The client disconnected before its answer: nothing is sent, and it is counted apart."""

    status = 499
    outcome = "cancelled"


class Watch(Protocol):
    """What the DataPlane needs of a connection: whether the client has gone, and a callback when it goes."""

    @property
    def lost(self) -> bool: ...

    def on_lost(self, callback: Callable[[], object]) -> None: ...

    def discard(self, callback: Callable[[], object]) -> None: ...


BodyReader = Callable[[], Awaitable[bytes]]
Decoded = tuple[InferRequest, int, list[tuple[str, bool]]]
Keyed = tuple[InferRequest, int, list[tuple[str, bool]], bytes | None]  # REST: ..., the response cache key


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class DataPlane:
    """One model, one batcher. Create it in the serving event loop; `await start()` loads the model."""

    def __init__(self, *, settings: ServeSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._state = State.LOADING
        self._backend: Backend | None = None
        self._batcher: Batcher | None = None
        self._placement: Placement | None = None
        self._signature: ModelSignature | None = None
        self._platform = ""
        self._cache: ResponseCache | None = None
        self._engine = b""
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Loading and warm-up run in a thread of their own, so shutdown need not wait for the default
        # executor; decoding in another, one at a time (it is GIL-bound: more threads would only add memory).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelfleet-load")
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelfleet-decode")
        self._loading_now = False
        self._stopping = False
        self.failure: str | None = None
        metrics.track(queue_depth=self._queue_depth, inflight=lambda: self._inflight)
        metrics.track_provider(self.execution_provider)
        metrics.track_placement(lambda: self._placement.inline if self._placement is not None else None)

    # --- lifecycle -----------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def loading_now(self) -> bool:
        """A model load or warm-up run is still executing in the loader thread."""
        return self._loading_now

    def execution_provider(self) -> ExecutionProvider | None:
        """What the loaded model computes on; None before it is loaded."""
        return self._backend.execution_provider if self._backend is not None else None

    def _queue_depth(self) -> int:
        return self._batcher.queue_depth if self._batcher else 0

    def _run_loading(self, fn: Callable[[], T]) -> T:
        self._loading_now = True
        try:
            return fn()
        finally:
            self._loading_now = False

    async def _in_loader(self, fn: Callable[[], T]) -> T:
        if self._stopping:
            raise asyncio.CancelledError("stopping")
        return await asyncio.get_running_loop().run_in_executor(self._loader, self._run_loading, fn)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (inflating, decoding) in the decode thread."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def start(self) -> None:
        """Load the model, warm up every batch size of the profile, start the batcher, then report ready."""
        settings = self._settings
        began = time.perf_counter()
        try:
            source = with_served_shapes(build_model_source(settings.model), settings)
            backend = await self._in_loader(partial(load_backend, source, settings))
            self._backend = backend
            if settings.response_cache_bytes:
                await self._start_cache(source)
            batched = supports_batching(backend.inputs, backend.outputs)
            limit = min(
                x for x in (settings.max_batch_size, backend.max_batch_size, source.batch and source.batch.max) if x
            )
            preferred = [p for p in settings.preferred_batch_sizes if p <= limit]
            if preferred != settings.preferred_batch_sizes:
                log.warning("preferred batch sizes above the profile max %d dropped: now %s", limit, preferred)
            self._signature = ModelSignature(backend.inputs, backend.outputs, limit if batched else 0)
            self._platform = backend.platform
            sizes = build_warmup_batch_sizes(
                max_batch_size=limit, preferred=preferred, profile=source.batch, mode=settings.warmup
            )
            placement, decided = await self._warm_up(
                backend, source, sizes if batched else [1], limit if batched else 1
            )
            self._placement = placement
            self._batcher = Batcher(
                infer=backend.infer,
                input_names=tuple(spec.name for spec in backend.inputs),
                config=BatcherConfig(
                    max_batch_size=limit,
                    preferred_batch_sizes=frozenset(preferred),
                    max_queue_delay_s=settings.max_queue_delay_microseconds / 1e6,
                    max_queue_size=settings.max_queue_size,
                    instances=settings.instances,
                    batched=batched,
                    inline=placement.inline,
                ),
                observer=self._metrics,
                placement=placement,
                tuner=self._tuner(limit) if batched and settings.batching_adaptive else None,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._state = State.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        if self._state is State.LOADING:
            self._state = State.READY
        log.info(
            "model %s ready in %.1fs: %s on %s, max batch %d, warmed batch sizes %s%s",
            settings.name,
            time.perf_counter() - began,
            self._platform,
            backend.execution_provider.active,
            limit if batched else 0,
            sizes if batched else [1],
            decided,
        )

    def _tuner(self, limit: int) -> Tuner:
        settings = self._settings
        target_s = settings.batching_p99_target_microseconds / 1e6
        bound = settings.max_queue_delay_microseconds / 1e6 or target_s
        log.info("adaptive batching: p99 target %.0f ms, queue delay at most %.0f us", target_s * 1e3, bound * 1e6)
        return Tuner(max_batch_size=limit, instances=settings.instances, target_s=target_s, max_delay_s=bound)

    async def _warm_up(
        self, backend: Backend, source: ModelSource, sizes: list[int], top: int
    ) -> tuple[Placement, str]:
        """Warm every size at the opt shapes and the full batch `top` at the max shapes; time that to place batches.

        Returns the placement and, for the ready log line, what was warmed at which shapes and what decided.
        """
        settings = self._settings
        # One size per thread call, so a SIGTERM during warm-up stops it after the current run.
        for size in sizes:
            await self._in_loader(
                partial(backend.warmup, [size], iterations=settings.warmup_iterations, dims=source.opt_shapes)
            )
        if source.max_shapes:
            await self._in_loader(
                partial(backend.warmup, [top], iterations=settings.warmup_iterations, dims=source.max_shapes)
            )
        largest = build_warmup_inputs(backend.inputs, top, source.max_shapes or source.opt_shapes)
        compute_s = await self._in_loader(partial(_fastest_run, backend, largest))
        shapes = {name: list(array.shape) for name, array in largest.items()}
        warmed = f" at the opt shapes {dict(source.opt_shapes)}" if source.opt_shapes else ""
        if source.max_shapes:
            warmed += f" and batch {top} at the max shapes {dict(source.max_shapes)}"
        threshold_us = settings.inline_compute_microseconds
        under = compute_s * 1e6 < threshold_us
        # The computing thread's CPU time is a batch's whole cost only where the model computes on it alone.
        cpu_is_cost = backend.execution_provider.on_cpu and settings.intra_op_threads == 1
        clock = "its thread's CPU time" if cpu_is_cost else "its wall time"
        if shapes_known(backend.inputs, source.max_shapes):
            placement = Placement(
                threshold_s=threshold_us / 1e6,
                promote_after=settings.inline_after_batches,
                allowed=under,
                trusted_elements=sum(int(array.size) for array in largest.values()) if under else 0,
                cpu_is_cost=cpu_is_cost,
            )
            where = "inline on the event loop" if placement.inline else "in executor threads"
            timed = f"a full batch at the max shapes {shapes} computes in {compute_s * 1e6:.0f} us"
            return placement, f"{warmed}; {timed}, so batches run {where} (a batch's cost: {clock})"
        placement = Placement(
            threshold_s=threshold_us / 1e6, promote_after=settings.inline_after_batches, cpu_is_cost=cpu_is_cost
        )
        return placement, f"{warmed}; " + (
            f"dynamic axes have no max (warm-up shapes {shapes} compute in {compute_s * 1e6:.0f} us, which says "
            f"nothing of real requests), so batches start in executor threads and run inline only after "
            f"{settings.inline_after_batches} real batches in a row compute under {threshold_us} us (a batch's "
            f"cost: {clock})"
        )

    async def _start_cache(self, source: ModelSource) -> None:
        """The response cache, keyed on this engine's identity (its artifact's sha256, hashed here if the
        store did not record it), so responses of another engine can never be answered from it."""
        settings = self._settings
        sha = source.sha256 or await self._in_loader(partial(file_sha256, source.artifact))
        assert sha is not None
        self._engine = engine_identity(key=source.key, sha256=sha, name=settings.name, version=settings.model_version)
        self._cache = ResponseCache(settings.response_cache_bytes)
        self._metrics.track_cache(self._cache)
        log.info("response cache of %d bytes, keyed on engine %s", settings.response_cache_bytes, self._engine.decode())

    def begin_drain(self) -> None:
        """Stop admitting work (readiness false, infer 503) and dispatch what is queued without delay."""
        self._stopping = True
        if self._state in (State.LOADING, State.READY):
            self._state = State.DRAINING
        if self._batcher is not None:
            self._batcher.flush()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no accepted request is in flight; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._stopping = True
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        if self._batcher is not None:
            await self._batcher.close()
        if self._backend is not None and not self._loading_now:
            self._backend.close()

    # --- metadata and health -------------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def live(self) -> bool:
        return self._state is not State.FAILED

    def ready(self) -> bool:
        return self._state is State.READY

    def _check_model(self, name: str, version: str | None) -> ModelSignature:
        if name != self._settings.name:
            raise ModelNotFound(f"unknown model '{clip(name)}'")
        if version not in (None, "", self._settings.model_version):
            raise ModelNotFound(
                f"model '{name}' has no version '{clip(version or '')}' (this server serves version "
                f"'{self._settings.model_version}')"
            )
        if self._signature is None:
            raise Unavailable(f"model '{name}' is {self._state.value}")
        return self._signature

    def model_ready(self, name: str, version: str | None) -> bool:
        if name != self._settings.name or version not in (None, "", self._settings.model_version):
            raise ModelNotFound(f"unknown model '{clip(name)}'" + (f" version '{clip(version)}'" if version else ""))
        return self.ready()

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        sig = self._check_model(name, version)
        return {
            "name": name,
            "versions": [self._settings.model_version],
            "platform": self._platform,
            "inputs": [spec.metadata() for spec in sig.inputs],
            "outputs": [spec.metadata() for spec in sig.outputs],
            # An extension field: tritonclient hands the metadata JSON back as a dict, other keys untouched.
            "parameters": provider.parameters() if (provider := self.execution_provider()) is not None else {},
        }

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration view (batch axis left out of dims when batching), for its tools."""
        sig = self._check_model(name, version)
        drop = 1 if sig.batched else 0

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": s.name,
                    "data_type": "TYPE_" + ("STRING" if s.datatype == "BYTES" else s.datatype),
                    "dims": list(s.shape[drop:]),
                }
                for s in specs
            ]

        config: dict[str, Any] = {
            "name": name,
            "platform": self._platform,
            "max_batch_size": sig.max_batch_size,
            "input": tensors(sig.inputs),
            "output": tensors(sig.outputs),
        }
        if sig.batched:
            config["dynamic_batching"] = {
                "preferred_batch_size": [p for p in self._settings.preferred_batch_sizes if p <= sig.max_batch_size],
                "max_queue_delay_microseconds": self._settings.max_queue_delay_microseconds,
                "default_queue_policy": {
                    "max_queue_size": self._settings.max_queue_size,
                    "default_timeout_microseconds": self._settings.default_timeout_microseconds,
                    "allow_timeout_override": self._settings.allow_timeout_override,
                },
            }
        return config

    # --- infer ---------------------------------------------------------------------------------------------

    def _timeout_s(self, request_us: int | None) -> float | None:
        us = self._settings.default_timeout_microseconds
        if request_us is not None and self._settings.allow_timeout_override:
            us = request_us
        return us / 1e6 if us else None

    def _requested(self, request: InferRequest, sig: ModelSignature) -> list[tuple[str, bool]]:
        if request.outputs is None:
            return [(spec.name, request.binary_output) for spec in sig.outputs]
        validate_outputs((o.name for o in request.outputs), sig)
        return [(o.name, request.binary_output if o.binary is None else o.binary) for o in request.outputs]

    def _admit(self, name: str, version: str | None) -> ModelSignature:
        """Everything that can refuse a request before its body is read: model, state, queue room."""
        sig = self._check_model(name, version)
        batcher = self._batcher
        if self._state is not State.READY or batcher is None:
            raise Unavailable(f"model '{name}' is {self._state.value}: not accepting requests")
        refusal = self.queue_refusal()
        if refusal is not None:
            raise QueueFull(refusal)
        return sig

    def queue_refusal(self) -> str | None:
        """Why a request arriving now would be refused for a full queue (by count, or by the time the queued
        work will take), or None. Cheap: the connection asks it for every infer request before the app does."""
        batcher = self._batcher
        if batcher is None:
            return None
        limit = self._settings.max_queue_size
        if limit and batcher.queue_depth >= limit:
            return f"queue full: {batcher.queue_depth} requests are already waiting (maxQueueSize {limit})"
        wait_us = self._settings.max_queue_wait_microseconds
        # Two full batches are always admitted, so batches can fill whatever the cost estimate says.
        if wait_us and batcher.full_batches_queued >= 2 and batcher.queued_seconds() * 1e6 > wait_us:
            return (
                f"queue full: the {batcher.queue_depth} requests waiting take about "
                f"{batcher.queued_seconds() * 1e3:.0f} ms to compute (maxQueueWait {wait_us / 1e3:g} ms)"
            )
        return None

    def _decode(self, body: bytes, header_length: str | None, sig: ModelSignature) -> Keyed:
        request = decode_infer_request(body, parse_header_length(header_length, len(body)))
        size = validate_inputs(request.inputs, sig)
        wanted = self._requested(request, sig)
        key = None
        if self._cache is not None:
            datatypes = {n: datatype_of(a.dtype) for n, a in request.inputs.items()}
            key = build_key(self._engine, request.inputs, datatypes, wanted)
        return request, size, wanted, key

    async def _decoded(self, body: bytes, header_length: str | None, sig: ModelSignature) -> Keyed:
        if len(body) <= self._settings.decode_inline_bytes:
            return self._decode(body, header_length, sig)
        return await self.off_loop(self._decode, body, header_length, sig)

    def _submit(
        self, request: InferRequest, size: int, sig: ModelSignature, watch: Watch | None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        assert self._batcher is not None  # admitted
        if watch is not None and watch.lost:
            raise ClientGone("the client disconnected before its request was queued")
        timeout_s = self._timeout_s(request.timeout_us)
        if request.deadline_s is not None:
            timeout_s = request.deadline_s if timeout_s is None else min(timeout_s, request.deadline_s)
        future = self._batcher.submit(request.inputs, size, batch_key(request.inputs, sig), timeout_s)
        if self._state is State.DRAINING:
            self._batcher.flush()  # admitted before the drain began, uploaded after it
        return future

    @staticmethod
    async def _outputs(future: asyncio.Future[dict[str, np.ndarray]], watch: Watch | None) -> dict[str, np.ndarray]:
        """The batch's answer; cancelled (and never computed, if still queued) when the client goes."""
        if watch is None:
            return await future
        watch.on_lost(future.cancel)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled() and watch.lost:
                raise ClientGone("the client disconnected while its request was queued") from None
            raise
        finally:
            watch.discard(future.cancel)

    def _cached(self, key: bytes | None) -> CachedResponse | None:
        return self._cache.get(key) if self._cache is not None and key is not None else None

    def _encode(
        self,
        name: str,
        request: InferRequest,
        outputs: dict[str, np.ndarray],
        wanted: list[tuple[str, bool]],
        key: bytes | None,
    ) -> tuple[bytes, int | None]:
        """The response; with the cache on it is encoded without the id, stored, and sent with the id spliced in."""
        body, length = encode_infer_response(
            model_name=name,
            model_version=self._settings.model_version,
            request_id=request.id if key is None else None,
            outputs=[(n, datatype_of(outputs[n].dtype), np.asarray(outputs[n]), binary) for n, binary in wanted],
        )
        if key is None or self._cache is None:
            return body, length
        response = CachedResponse(body, length)
        self._cache.put(key, response)
        return with_id(response, request.id)

    async def infer(
        self,
        name: str,
        version: str | None,
        read_body: BodyReader,
        header_length: str | None,
        watch: Watch | None = None,
    ) -> tuple[bytes, int | None]:
        """Admit, read the body, decode, validate, queue, await the batch, encode (REST).

        Raises InferenceError subclasses only; `read_body` may raise them too (size, budget, encoding).
        """

        key: bytes | None = None  # the response cache's key of this request (REST responses only)

        async def decode(sig: ModelSignature) -> Decoded:
            nonlocal key
            request, size, wanted, key = await self._decoded(await read_body(), header_length, sig)
            return request, size, wanted

        def hit(request: InferRequest) -> tuple[bytes, int | None] | None:
            cached = self._cached(key)
            return None if cached is None else with_id(cached, request.id)

        def encode(
            request: InferRequest, outputs: dict[str, np.ndarray], wanted: list[tuple[str, bool]]
        ) -> tuple[bytes, int | None]:
            return self._encode(name, request, outputs, wanted, key)

        return await self.run_infer(name, version, decode, encode, watch, hit=hit)

    def validated(self, request: InferRequest, sig: ModelSignature) -> Decoded:
        """A request decoded elsewhere (gRPC), checked against the model as a REST body is."""
        size = validate_inputs(request.inputs, sig)
        return request, size, self._requested(request, sig)

    async def run_infer(
        self,
        name: str,
        version: str | None,
        decode: Callable[[ModelSignature], Awaitable[Decoded]],
        encode: Callable[[InferRequest, dict[str, np.ndarray], list[tuple[str, bool]]], T],
        watch: Watch | None = None,
        protocol: str = "rest",
        hit: Callable[[InferRequest], T | None] | None = None,
    ) -> T:
        """Any protocol's infer: admit, `decode` (once admitted), queue, await the batch, `encode`; one outcome."""
        started = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        queued = False
        outcome = "error"
        try:
            sig = self._admit(name, version)
            request, size, wanted = await decode(sig)
            answer = None if hit is None else hit(request)
            if answer is not None:  # a response cache hit never enters the queue
                queued, outcome = True, "success"
                return answer
            future = self._submit(request, size, sig, watch)
            queued = True
            outputs = await self._outputs(future, watch)
            encoded = encode(request, outputs, wanted)
            outcome = "success"
            return encoded
        except InferenceError as exc:
            outcome = exc.outcome
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # the task's caller went (a gRPC client cancelled or its deadline passed)
            raise
        except Exception as exc:
            log.exception("infer on model %s failed", name)
            raise BackendError(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            self._metrics.request_done(outcome, time.perf_counter() - started if queued else None, protocol)
