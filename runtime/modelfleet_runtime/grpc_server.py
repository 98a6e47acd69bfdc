"""OIP v2 over gRPC (inference.GRPCInferenceService, KServe's grpc_predict_v2.proto) beside the REST API.

grpc.aio runs on the REST server's event loop and calls the same DataPlane, so admission, the batcher, the
queue policy, deadlines and the metrics are shared; only the wire format differs. Inputs arrive in
`raw_input_contents` (what tritonclient sends) or in typed `contents`; outputs always go back as
`raw_output_contents`. Every failure is a gRPC status with a message (never a traceback): INVALID_ARGUMENT
naming the tensor, NOT_FOUND for another model, UNAVAILABLE when not ready or draining, RESOURCE_EXHAUSTED
for a full queue or memory budget, DEADLINE_EXCEEDED when the request's time ran out in the queue.
Messages are bounded by max_request_bytes, as REST bodies are.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NoReturn

import grpc
import numpy as np

from modelfleet_runtime.batching import ModelSignature
from modelfleet_runtime.dataplane import ClientGone, DataPlane, Decoded
from modelfleet_runtime.proto import grpc_predict_v2_pb2 as pb
from modelfleet_runtime.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from modelfleet_runtime.protocol import (
    DATATYPES,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_NAME_LENGTH,
    BackendError,
    DeadlineExceeded,
    InferenceError,
    InferRequest,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestedOutput,
    Unavailable,
    datatype_of,
    shown,
    tensor_from_raw,
    tensor_to_raw,
)
from modelfleet_runtime.settings import ServeSettings

log = logging.getLogger("modelfleet.grpc")

# The most specific class first: DeadlineExceeded and QueueFull are Unavailable's siblings, not subclasses.
_CODES: tuple[tuple[type[InferenceError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ClientGone, grpc.StatusCode.CANCELLED),
    (BackendError, grpc.StatusCode.INTERNAL),
)


def status_code(exc: InferenceError) -> grpc.StatusCode:
    """The gRPC status for one of the DataPlane's errors; a 503 not listed (memory budget) is RESOURCE_EXHAUSTED."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.RESOURCE_EXHAUSTED if exc.status == 503 else grpc.StatusCode.INTERNAL


# OIP datatype -> the InferTensorContents field that carries it typed (FP16 and BF16 only travel raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _check_tensor(tensor: Any) -> tuple[str, str, tuple[int, ...]]:
    name: str = tensor.name
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"input name {shown(name)!r} is empty or above {MAX_NAME_LENGTH} characters")
    datatype: str = tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{shown(name)}': unsupported datatype {shown(datatype, 40)!r}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape) or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidInput(f"input '{shown(name)}': shape {shown(list(shape))} is invalid")
    return name, datatype, shape


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': {len(values)} values in contents.{field} for shape {list(shape)}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size and (wide.min() < np.iinfo(dtype).min or wide.max() > np.iinfo(dtype).max):
        raise InvalidInput(f"input '{name}': a value in contents.{field} is out of range for {datatype}")
    return wide.astype(dtype).reshape(shape)


def _parameter(params: Any, key: str) -> Any:
    if key not in params:
        return None
    param = params[key]
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def decode_grpc_request(message: Any, deadline_s: float | None) -> InferRequest:
    """A ModelInferRequest as the DataPlane's InferRequest; InvalidInput naming the tensor for bad input."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: send one per input")
    if not message.inputs:
        raise InvalidInput("request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(message.inputs):
        name, datatype, shape = _check_tensor(tensor)
        if name in inputs:
            raise InvalidInput(f"input '{shown(name)}' appears twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{shown(name)}' has contents but the request uses raw_input_contents")
            inputs[name] = tensor_from_raw(name, datatype, shape, memoryview(raw[i]))
        else:
            inputs[name] = _from_contents(name, datatype, shape, tensor.contents)
    timeout = _parameter(message.parameters, "timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
    return InferRequest(
        id=message.id or None,
        inputs=inputs,
        outputs=[RequestedOutput(o.name, True) for o in message.outputs] or None,
        binary_output=True,
        timeout_us=timeout,
        deadline_s=deadline_s,
    )


def encode_grpc_response(
    name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray], wanted: list[tuple[str, bool]]
) -> Any:
    """The batch's outputs as a ModelInferResponse, every tensor in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id or "")
    for out_name, _ in wanted:
        arr = np.asarray(outputs[out_name])
        datatype = datatype_of(arr.dtype)
        response.outputs.add(name=out_name, datatype=datatype, shape=arr.shape)
        response.raw_output_contents.append(tensor_to_raw(datatype, arr))
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """inference.GRPCInferenceService over the DataPlane; every error is aborted with its status code."""

    def __init__(self, dataplane: DataPlane, *, model_version: str, budget: Any, decode_inline_bytes: int) -> None:
        self.dataplane = dataplane
        self.model_version = model_version
        self.decode_inline_bytes = decode_inline_bytes  # larger messages decode in the DataPlane's thread
        self.budget = budget  # the REST API's BodyBudget: request bytes held in memory, both protocols

    @staticmethod
    async def _abort(context: Any, exc: InferenceError) -> NoReturn:
        await context.abort(status_code(exc), exc.message)
        raise AssertionError("unreachable: abort raises")

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None))
        except InferenceError as exc:
            await self._abort(context, exc)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            meta = self.dataplane.model_metadata(request.name, request.version or None)
        except InferenceError as exc:
            await self._abort(context, exc)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        dp = self.dataplane
        name, version = request.model_name, request.model_version or None
        remaining = context.time_remaining()
        held = 0

        async def decode(sig: ModelSignature) -> Decoded:
            nonlocal held
            size = request.ByteSize()
            self.budget.reserve(size)
            held = size
            if size <= self.decode_inline_bytes:
                return dp.validated(decode_grpc_request(request, remaining), sig)
            return dp.validated(await dp.off_loop(decode_grpc_request, request, remaining), sig)

        def encode(req: InferRequest, outputs: dict[str, np.ndarray], wanted: list[tuple[str, bool]]) -> Any:
            return encode_grpc_response(name, self.model_version, req, outputs, wanted)

        try:
            return await dp.run_infer(name, version, decode, encode, protocol="grpc")
        except InferenceError as exc:
            await self._abort(context, exc)
        finally:
            self.budget.release(held)


def build_grpc_server(servicer: InferenceServicer, *, max_message_bytes: int, max_connections: int) -> Any:
    """A grpc.aio server (not yet bound) on the running loop; messages above `max_message_bytes` are refused
    by grpc itself with RESOURCE_EXHAUSTED before they reach the servicer."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_connections,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return server


async def start_grpc(dataplane: DataPlane, settings: ServeSettings, budget: Any, max_rpcs: int) -> Any:
    """Bind and start the gRPC server on settings.grpc_port; raises OSError when the port cannot be bound."""
    servicer = InferenceServicer(
        dataplane, model_version=settings.model_version, budget=budget, decode_inline_bytes=settings.decode_inline_bytes
    )
    server = build_grpc_server(servicer, max_message_bytes=settings.max_request_bytes, max_connections=max_rpcs)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        port = server.add_insecure_port(f"{address}:{settings.grpc_port}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}:{settings.grpc_port}: {exc}") from None
    await server.start()
    log.info("gRPC listening on %s:%d (inference.GRPCInferenceService)", settings.host, port)
    return server
