"""Open Inference Protocol v2 on the wire: JSON and binary tensors to NumPy and back; {"error": ...} errors.

The binary tensor extension follows Triton's: a request or response whose body is a JSON header followed by
raw tensor bytes carries `Inference-Header-Content-Length: <JSON length>`; a tensor sent that way has
`parameters.binary_data_size` instead of `data`. Outputs come back binary when the request asks for it
per output (`parameters.binary_data`) or for all (`parameters.binary_data_output`). BYTES tensors use
Triton's 4-byte little-endian length prefix per element.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"

# OIP v2 datatype -> NumPy dtype. BF16 has no NumPy dtype and is refused with a clear error.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
# Little-endian on the wire, as Triton sends it.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {k: v.newbyteorder("<") for k, v in DATATYPES.items() if k != "BYTES"}


_BY_DTYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}
_BY_DTYPE.update({v: k for k, v in _WIRE_DTYPES.items()})


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name of a NumPy dtype (object/str/bytes arrays are BYTES)."""
    name = _BY_DTYPE.get(dtype)
    if name is not None:
        return name
    if dtype.kind in "OSU":
        return "BYTES"
    raise ValueError(f"no OIP v2 datatype for NumPy dtype {dtype}")


# --- errors ------------------------------------------------------------------------------------------------


class InferenceError(Exception):
    """An error with an HTTP status and a metrics outcome; the client gets its message as {"error": ...}."""

    status = 500
    outcome = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(InferenceError):
    status = 400
    outcome = "invalid"


class ModelNotFound(InferenceError):
    status = 404
    outcome = "invalid"


class PayloadTooLarge(InferenceError):
    status = 413
    outcome = "invalid"


class Unavailable(InferenceError):
    """Not ready (loading) or shutting down: try another replica."""

    status = 503
    outcome = "unavailable"


class QueueFull(InferenceError):
    status = 503
    outcome = "rejected_queue_full"


class DeadlineExceeded(InferenceError):
    """The request's timeout passed before it was dispatched; it was not computed (Triton: UNAVAILABLE)."""

    status = 503
    outcome = "timeout"


class BackendError(InferenceError):
    status = 500
    outcome = "error"


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


# --- requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request's binary_data_output


@dataclass(slots=True)
class InferRequest:
    """A decoded infer request: input arrays in the order sent, and what the client wants back."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None
    binary_output: bool
    timeout_us: int | None


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < length <= body_length:
        raise InvalidInput(f"{HEADER_LENGTH} {length} is outside the body of {body_length} bytes")
    return length


def _shape_of(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
    if any(d < 0 for d in raw):
        raise InvalidInput(f"input '{name}': shape {raw} has a negative dimension")
    return tuple(raw)


def _bytes_from_binary(name: str, blob: memoryview, count: int) -> np.ndarray:
    """Triton's BYTES wire format: per element a uint32 little-endian length, then the bytes."""
    if count * 4 > len(blob):
        raise InvalidInput(f"input '{name}': {len(blob)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > len(blob):
            raise InvalidInput(f"input '{name}': BYTES data ends inside element {i}'s length prefix")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise InvalidInput(f"input '{name}': BYTES element {i} runs past the tensor's data")
        out[i] = bytes(blob[offset : offset + length])
        offset += length
    if offset != len(blob):
        raise InvalidInput(f"input '{name}': {len(blob) - offset} bytes left after {count} BYTES elements")
    return out


def _serialize_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = np.array(data, dtype=np.object_).reshape(-1) if count else np.empty(0, dtype=np.object_)
        if flat.size != count:
            raise InvalidInput(f"input '{name}': {flat.size} elements in 'data' for shape {list(shape)}")
        for i, item in enumerate(flat):
            if isinstance(item, str):
                flat[i] = item.encode("utf-8")
            elif not isinstance(item, bytes):
                raise InvalidInput(f"input '{name}': BYTES data must be strings, element {i} is {type(item).__name__}")
        return flat.reshape(shape)
    try:
        arr = np.array(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input '{name}': 'data' does not hold {datatype} values: {exc}") from None
    if arr.size != count:
        raise InvalidInput(f"input '{name}': {arr.size} elements in 'data' for shape {list(shape)} ({count})")
    return arr.reshape(shape)


def decode_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON + binary tensors) into NumPy arrays.

    Every malformed input raises `InvalidInput` naming the tensor; this never raises anything else.
    """
    header = body if header_length is None else body[:header_length]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request has no 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")

    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput("every input needs a string 'name'")
        name: str = raw["name"]
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            raise InvalidInput(f"input '{name}': unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")
        shape = _shape_of(name, raw.get("shape"))
        tparams = raw.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise InvalidInput(f"input '{name}': 'parameters' must be an object")
        if "shared_memory_region" in tparams:
            raise InvalidInput(f"input '{name}': shared memory inputs are not supported")
        size = tparams.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise InvalidInput(f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            blob = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                inputs[name] = _bytes_from_binary(name, blob, math.prod(shape)).reshape(shape)
            else:
                dtype = _WIRE_DTYPES[datatype]
                expected = math.prod(shape) * dtype.itemsize
                if size != expected:
                    raise InvalidInput(
                        f"input '{name}': {size} bytes of binary data, but shape {list(shape)} of {datatype} "
                        f"needs {expected}"
                    )
                inputs[name] = np.frombuffer(blob, dtype=dtype).reshape(shape)
        elif "data" in raw:
            inputs[name] = _from_json_data(name, datatype, shape, raw["data"])
        else:
            raise InvalidInput(f"input '{name}' has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the last binary input")

    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_requested_outputs(doc.get("outputs")),
        binary_output=_flag(params, "binary_data_output"),
        timeout_us=_timeout(params),
    )


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter '{key}' must be true or false")
    return value


def _timeout(params: dict[str, Any]) -> int | None:
    value = params.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput("parameter 'timeout' must be a non-negative integer (microseconds)")
    return value


def _requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("'outputs' must be a list")
    result: list[RequestedOutput] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput("every requested output needs a string 'name'")
        name = item["name"]
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"output '{name}': 'parameters' must be an object")
        if params.get("classification"):
            raise InvalidInput(f"output '{name}': the classification extension is not supported")
        if "shared_memory_region" in params:
            raise InvalidInput(f"output '{name}': shared memory outputs are not supported")
        binary = _flag(params, "binary_data") if "binary_data" in params else None
        result.append(RequestedOutput(name=name, binary=binary))
    return result


# --- responses ---------------------------------------------------------------------------------------------


def _json_data(name: str, datatype: str, arr: np.ndarray) -> Any:
    if datatype == "BYTES":
        try:
            return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidInput(f"output '{name}' holds non-UTF-8 bytes: request it with binary_data") from None
    # orjson serialises contiguous NumPy arrays natively (OPT_SERIALIZE_NUMPY), far faster than tolist().
    return np.ascontiguousarray(arr).reshape(-1)


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, str, np.ndarray, bool]],
) -> tuple[bytes, int | None]:
    """Encode (name, datatype, array, binary?) outputs; return the body and, if binary, the JSON length."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, datatype, arr, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            if datatype == "BYTES":
                blob = _serialize_bytes(arr)
            else:
                blob = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(name, datatype, arr)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
