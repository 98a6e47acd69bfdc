"""The DataPlane: metadata, health and infer for one served model; REST (and gRPC later) stay thin over it.

It owns the model's lifecycle: loading, warming every batch size of the profile, ready, draining on
SIGTERM. Every infer request ends with exactly one outcome counted in the metrics.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from functools import partial
from typing import Any

import numpy as np

from modelfleet_runtime.backends.base import Backend, build_warmup_inputs
from modelfleet_runtime.batcher import Batcher, BatcherConfig
from modelfleet_runtime.batching import (
    ModelSignature,
    batch_key,
    supports_batching,
    validate_inputs,
    validate_outputs,
)
from modelfleet_runtime.loader import build_model_source, build_warmup_batch_sizes, load_backend
from modelfleet_runtime.metrics import Metrics
from modelfleet_runtime.protocol import (
    BackendError,
    InferenceError,
    InferRequest,
    ModelNotFound,
    Unavailable,
    datatype_of,
    decode_infer_request,
    encode_infer_response,
    parse_header_length,
)
from modelfleet_runtime.settings import ServeSettings

log = logging.getLogger(__name__)

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
        self._signature: ModelSignature | None = None
        self._platform = ""
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.failure: str | None = None
        metrics.track(queue_depth=self._queue_depth, inflight=lambda: self._inflight)

    # --- lifecycle -----------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def inflight(self) -> int:
        return self._inflight

    def _queue_depth(self) -> int:
        return self._batcher.queue_depth if self._batcher else 0

    async def start(self) -> None:
        """Load the model, warm up every batch size of the profile, start the batcher, then report ready."""
        loop = asyncio.get_running_loop()
        settings = self._settings
        began = time.perf_counter()
        try:
            source = build_model_source(settings.model)
            backend = await loop.run_in_executor(None, load_backend, source, settings)
            self._backend = backend
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
            warm = partial(backend.warmup, sizes, iterations=settings.warmup_iterations, dims=source.opt_shapes)
            await loop.run_in_executor(None, warm)
            largest = build_warmup_inputs(backend.inputs, limit if batched else 1, source.opt_shapes)
            compute_s = await loop.run_in_executor(None, _fastest_run, backend, largest)
            inline = compute_s * 1e6 < settings.inline_compute_microseconds
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
                    inline=inline,
                ),
                observer=self._metrics,
            )
        except Exception as exc:
            self._state = State.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        if self._state is State.LOADING:
            self._state = State.READY
        log.info(
            "model %s ready in %.1fs: %s, max batch %d, warmed batch sizes %s; a full batch computes in "
            "%.0f us, so batches run %s",
            settings.name,
            time.perf_counter() - began,
            self._platform,
            limit if batched else 0,
            sizes if batched else [1],
            compute_s * 1e6,
            "inline on the event loop" if inline else "in executor threads",
        )

    def begin_drain(self) -> None:
        """Stop admitting work (readiness false, infer 503) and dispatch what is queued without delay."""
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
        if self._batcher is not None:
            await self._batcher.close()
        if self._backend is not None:
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
            raise ModelNotFound(f"unknown model '{name}'")
        if version not in (None, "", self._settings.model_version):
            raise ModelNotFound(
                f"model '{name}' has no version '{version}' (this server serves version "
                f"'{self._settings.model_version}')"
            )
        if self._signature is None:
            raise Unavailable(f"model '{name}' is {self._state.value}")
        return self._signature

    def model_ready(self, name: str, version: str | None) -> bool:
        if name != self._settings.name or version not in (None, "", self._settings.model_version):
            raise ModelNotFound(f"unknown model '{name}'" + (f" version '{version}'" if version else ""))
        return self.ready()

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        sig = self._check_model(name, version)
        return {
            "name": name,
            "versions": [self._settings.model_version],
            "platform": self._platform,
            "inputs": [spec.metadata() for spec in sig.inputs],
            "outputs": [spec.metadata() for spec in sig.outputs],
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

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: str | None
    ) -> tuple[bytes, int | None]:
        """Decode, validate, queue, await the batch, encode. Raises InferenceError subclasses only."""
        started = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        admitted = False
        outcome = "error"
        try:
            sig = self._check_model(name, version)
            if self._state is not State.READY or self._batcher is None:
                raise Unavailable(f"model '{name}' is {self._state.value}: not accepting requests")
            request = decode_infer_request(body, parse_header_length(header_length, len(body)))
            size = validate_inputs(request.inputs, sig)
            wanted = self._requested(request, sig)
            future = self._batcher.submit(
                request.inputs, size, batch_key(request.inputs, sig), self._timeout_s(request.timeout_us)
            )
            admitted = True
            outputs = await future
            encoded = encode_infer_response(
                model_name=name,
                model_version=self._settings.model_version,
                request_id=request.id,
                outputs=[(n, datatype_of(outputs[n].dtype), np.asarray(outputs[n]), binary) for n, binary in wanted],
            )
            outcome = "success"
            return encoded
        except InferenceError as exc:
            outcome = exc.outcome
            raise
        except Exception as exc:
            log.exception("infer on model %s failed", name)
            raise BackendError(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            self._metrics.request_done(outcome, time.perf_counter() - started if admitted else None)
