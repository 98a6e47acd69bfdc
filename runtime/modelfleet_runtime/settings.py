"""Settings of `modelfleet serve`: model, name, port from the command line; the rest from MODELFLEET_* env."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(value: Any) -> Any:
    """Accept `[16, 32]` (JSON) or `16,32` from the environment; anything else goes on to validation."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class ShapeBounds(BaseModel):
    """One input's non-batch dimensions at the shape served most (opt) and the largest (max)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    opt: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    max: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)


class ServeSettings(BaseSettings):
    """Everything `modelfleet serve` needs, built once in `server.main()` and passed down.

    Batching knobs follow Triton's names and meaning (maxBatchSize, preferredBatchSizes,
    maxQueueDelayMicroseconds, maxQueueSize, per-request timeout), so an InferenceModel's
    `spec.serving.batching` maps one to one onto MODELFLEET_* variables.
    """

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_", extra="ignore", frozen=True)

    model: Path = Field(
        description="The model to serve: an .onnx file, or an engine-store directory written by "
        "`modelfleet build` (manifest.json + artifact). CLI: --model."
    )
    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="The model name clients use in /v2/models/{name}. CLI: --name.",
    )
    model_version: str = Field(default="1", min_length=1, description="The single version this server serves.")
    host: str = Field(default="0.0.0.0", description="Address to listen on. CLI: --host.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0 = any free port). CLI: --http-port.")
    grpc_port: int = Field(
        default=8081, ge=0, le=65535, description="OIP v2 gRPC port (inference.GRPCInferenceService); 0 = no gRPC."
    )

    max_batch_size: int = Field(
        default=32,
        ge=1,
        description="maxBatchSize: the largest batch (sum of the requests' batch dimensions) sent to the "
        "model; capped by the engine's batch profile max when the store manifest has one.",
    )
    preferred_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="preferredBatchSizes: a batch is dispatched as soon as one of these sizes can be formed "
        "(the largest such size wins). JSON list or comma-separated.",
    )
    max_queue_delay_microseconds: int = Field(
        default=0,
        ge=0,
        description="maxQueueDelayMicroseconds: how long the oldest queued request may wait for a batch to "
        "fill before whatever is queued is dispatched. 0 = dispatch at once (batches still form under load).",
    )
    batching_adaptive: bool = Field(
        default=False,
        description="Choose the batch-size limit and queue delay online, from measured batch compute times and "
        "the arrival rate, to keep p99 within batching_p99_target_microseconds while maximising throughput "
        "(see adaptive.py). max_queue_delay_microseconds, when set, bounds the delay it may choose.",
    )
    batching_p99_target_microseconds: int = Field(
        default=100_000,
        ge=1000,
        description="The p99 latency adaptive batching aims for (the InferenceModel's autoscaling p99 target "
        "when it has one).",
    )
    max_queue_size: int = Field(
        default=1024,
        ge=0,
        description="maxQueueSize: requests waiting for a batch; a request arriving at a full queue is "
        "rejected at once with 503. 0 = unbounded.",
    )
    max_queue_wait_microseconds: int = Field(
        default=0,
        ge=0,
        description="A bound on the queue in time rather than in count: a request arriving when the queued "
        "requests would take longer than this to compute (estimated from recent batches' cost per item) is "
        "rejected at once with 503, as at a full maxQueueSize; two full batches are always admitted. Under "
        "overload it bounds both a request's wait and the backlog left when the overload ends (the time to "
        "recover), whatever the model's speed on this machine. 0 = bound by maxQueueSize only (Triton's "
        "semantics).",
    )
    default_timeout_microseconds: int = Field(
        default=0,
        ge=0,
        description="Per-request queue timeout when the request sets none: a request not dispatched by then "
        "is rejected (503), never computed late. As in Triton it bounds the time in the queue only: a request "
        "dispatched in time is computed and answered however long that takes (bound the whole request with "
        "the client's own timeout; the body upload is bounded by body_timeout_seconds). 0 = no timeout.",
    )
    allow_timeout_override: bool = Field(
        default=True, description="Let a request's `timeout` parameter (microseconds) override the default."
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger ones get 413 before the body is buffered.",
    )
    max_inflight_body_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Memory budget for request bodies being received or held by requests in flight (declared "
        "Content-Length reserved before reading, inflated size added for compressed bodies). A request that "
        "would exceed it gets 503 with Retry-After before its body is read: the server is short of memory, "
        "not the client over a rate, and another replica may have room. At least max_request_bytes.",
    )
    decode_inline_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description="Request bodies up to this size are decoded on the event loop (about 1 ms for 64 KiB of "
        "JSON numbers); larger or compressed ones are decoded in a thread, so health and metrics stay "
        "answered while they decode.",
    )
    max_connections: int = Field(
        default=4096,
        ge=1,
        description="Open connections served normally; capped further by the open-file limit (the soft limit "
        "is raised to the hard one at start). Past it a connection's requests get 503 and it is closed, "
        "except health and metrics requests, which are always answered.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Largest request head (request line and headers); larger gets 431 and the connection closes.",
    )
    max_header_count: int = Field(
        default=100,
        ge=1,
        description="Most request headers accepted; more gets 431 and the connection closes. 100 as in Envoy, "
        "Kestrel, Tomcat and Apache (LimitRequestFields): an inference client sends about ten, and a chain "
        "of proxies adds a few dozen at most.",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request's head must arrive within this from its first byte; else 408 and close.",
    )
    body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A request's body must arrive within this from the end of its head (64 MiB needs ~9 Mbit/s); "
        "else 408 and close. Slow uploads cannot hold memory and connections for ever.",
    )
    min_body_bytes_per_second: float = Field(
        default=240.0,
        ge=0,
        description="After body_rate_grace_seconds, a request body arriving slower than this on average (since "
        "its start, or since the server last resumed reading it) gets 408 and the connection closes, so a "
        "trickle cannot hold a connection and its share of the body budget for the whole body timeout. "
        "Kestrel's MinRequestBodyDataRate default (240 bytes/s after 5 s); a body that can finish within "
        "body_timeout_seconds at all (64 MiB needs ~1.1 MB/s) is far above it. 0 = no minimum.",
    )
    body_rate_grace_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long a request body may arrive at any rate before min_body_bytes_per_second applies.",
    )
    idle_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        description="A connection with no request in progress, including one that never sent a byte, is "
        "closed after this long without a byte.",
    )
    instances: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Batches computed concurrently (Triton's instance count); 1 suits a GPU or a small CPU.",
    )

    inline_compute_microseconds: int = Field(
        default=200,
        ge=0,
        description="If a batch of maxBatchSize computes faster than this (measured after warm-up), batches run "
        "on the event loop thread instead of an executor thread: for tiny models the thread handoff costs "
        "more than the compute. 0 = always use executor threads. Timed at the max shapes where they are known "
        "(the store's options.shapes, or `shapes`); with unknown dynamic axes batches start in executor threads "
        "and go inline only after `inline_after_batches` real batches in a row computed under it. Either way two "
        "batches in a row that compute over it send batches back to executor threads.",
    )
    inline_after_batches: int = Field(
        default=16,
        ge=1,
        description="Real batches in a row that must compute under inline_compute_microseconds before batches "
        "of a model with unknown dynamic axes (or one sent back to the executor) run inline.",
    )
    shapes: dict[str, ShapeBounds] = Field(
        default_factory=dict,
        description="For a bare .onnx: each input's non-batch dimensions (axis 1 onwards) served, e.g. "
        '`{"x": {"opt": [32], "max": [512]}}`, as an engine store\'s options.shapes. Warm-up runs at opt and '
        "max; the inline decision is timed at max. Ignored for a store entry, whose manifest says.",
    )

    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0 = its default).")
    inter_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime inter-op threads (0 = its default).")
    ort_allow_spinning: bool = Field(
        default=False,
        description="Let ONNX Runtime's worker threads spin while idle; off by default because spinning "
        "steals the CPU the HTTP event loop needs on small machines.",
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimization level."
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers to try, in order; empty = TensorRT, CUDA, CPU, taking "
        "those this build of ONNX Runtime has.",
    )
    architecture: str = Field(
        default="",
        pattern=r"^(|cpu|sm\d{2,3})$",
        description="The architecture this pod serves (smXY or cpu; the operator sets it). smXY means a GPU is "
        "expected: ONNX Runtime computing on its CPU provider is then reported as a fault (a WARNING log line, "
        "the modelfleet_execution_provider_info metric, the model metadata). Empty = the engine-store "
        "manifest's architecture (none for a bare .onnx file).",
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="ONNX Runtime I/O binding: auto = on when the first provider is a GPU one.",
    )

    response_cache_bytes: int = Field(
        default=0,
        ge=0,
        description="The response cache (Triton's semantics): a request identical to an earlier successful one "
        "(same engine, input tensors and requested outputs) is answered with the stored response bytes without "
        "entering the batching queue. An LRU of at most this many bytes; 0 = off.",
    )

    warmup: Literal["profile", "all"] = Field(
        default="profile",
        description="Batch sizes warmed up before the server reports ready: `profile` = 1, the preferred "
        "sizes, the profile's min/opt/max, powers of two and maxBatchSize; `all` = every size from 1 to "
        "maxBatchSize.",
    )
    warmup_iterations: int = Field(default=2, ge=1, description="Warm-up runs per batch size.")
    verify_artifact: bool = Field(
        default=True, description="Check the store artifact's sha256 against its manifest before loading it."
    )

    drain_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM, how long accepted requests (including those still uploading) get to finish "
        "before the server exits anyway. The operator sets it from the pod's terminationGracePeriodSeconds, "
        "less the preStop sleep and a margin for exiting.",
    )
    drain_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="On SIGTERM, keep the listener open at least this long, answering not-ready and 503, so "
        "load balancers notice before connections are refused.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    backlog: int = Field(default=2048, ge=16, description="TCP listen backlog.")

    @field_validator("preferred_batch_sizes", mode="before")
    @classmethod
    def _split_ints(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("providers", mode="before")
    @classmethod
    def _split_strs(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError("preferred batch sizes must be >= 1")
        return sorted(set(value))

    @model_validator(mode="after")
    def _budget_holds_a_request(self) -> ServeSettings:
        if self.max_inflight_body_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_inflight_body_bytes {self.max_inflight_body_bytes} is below max_request_bytes "
                f"{self.max_request_bytes}: a request of the largest size could never be admitted"
            )
        return self

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ServeSettings:
        too_big = [v for v in self.preferred_batch_sizes if v > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred batch sizes {too_big} exceed max_batch_size {self.max_batch_size}")
        return self
