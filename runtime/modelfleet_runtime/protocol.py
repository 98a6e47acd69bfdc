"""Open Inference Protocol v2 on the wire: JSON and binary tensors to NumPy and back; {"error": ...} errors.

The binary tensor extension follows Triton's: a request or response whose body is a JSON header followed by
raw tensor bytes carries `Inference-Header-Content-Length: <JSON length>`; a tensor sent that way has
`parameters.binary_data_size` instead of `data`. Outputs come back binary when the request asks for it
per output (`parameters.binary_data`) or for all (`parameters.binary_data_output`). BYTES tensors use
Triton's 4-byte little-endian length prefix per element; a BYTES tensor decodes to an object array of
`bytes` (JSON strings as their UTF-8), whatever the backend then needs.

JSON data is strict, as OIP is: BOOL takes true/false, integer types JSON integers, floating types JSON
numbers, BYTES strings; nothing is coerced. JSON cannot carry NaN or infinities, so floating outputs holding
them are written as the tokens `NaN`, `Infinity` and `-Infinity`, as Triton writes them (and its clients
read them); binary outputs carry them exactly.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"
# NumPy's own limit on dimensions; no model in ONNX Runtime or TensorRT (8) comes near it.
MAX_DIMS = 64
# The product of a shape's non-zero dimensions: no request body could carry more elements, and with it
# every shape (zero-size ones included) is one NumPy and ONNX Runtime can represent.
MAX_ELEMENTS = 2**40
# Client text echoed in an error message (names, values) is cut to this many characters.
ECHO_LIMIT = 100
# Tensor names are echoed whole in messages, so they are bounded too; real models' names are far shorter.
MAX_NAME_LENGTH = 1024

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


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """Client-supplied text for an error message: strings as-is, anything else as its repr, cut to `limit`."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


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
    deadline_s: float | None = None  # the client's own deadline (gRPC), on top of the queue policy


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {shown(repr(value))}") from None
    if not 0 < length <= body_length:
        raise InvalidInput(f"{HEADER_LENGTH} {length} is outside the body of {body_length} bytes")
    return length


def _shape_of(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
    if len(raw) > MAX_DIMS:
        raise InvalidInput(f"input '{name}': shape has {len(raw)} dimensions, above the limit of {MAX_DIMS}")
    if any(d < 0 for d in raw):
        raise InvalidInput(f"input '{name}': shape {shown(raw)} has a negative dimension")
    if math.prod(d for d in raw if d) > MAX_ELEMENTS:
        raise InvalidInput(f"input '{name}': shape {shown(raw)} has a dimension too large to represent")
    return tuple(raw)


def _name_of(kind: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise InvalidInput(f"every {kind} needs a string 'name'")
    if len(raw) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{kind} name {shown(raw)} is above the limit of {MAX_NAME_LENGTH} characters")
    return raw


def _datatype_of_input(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or raw not in DATATYPES:
        supported = ", ".join(DATATYPES)
        raise InvalidInput(f"input '{name}': unsupported datatype {shown(repr(raw), 40)} (supported: {supported})")
    return raw


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


# The JSON element types each datatype takes (OIP's JSON is typed; nothing is coerced) and their wording.
_JSON_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "BOOL": (frozenset({bool}), "true or false"),
    **{t: (frozenset({int}), "JSON integers") for t in DATATYPES if t[0] in "IU"},
    **{t: (frozenset({int, float}), "JSON numbers") for t in DATATYPES if t.startswith("FP")},
    "BYTES": (frozenset({str}), "strings"),
}
_JSON_NAMES = {
    bool: "true/false",
    int: "an integer",
    float: "a floating-point number",
    str: "a string",
    dict: "an object",
}


def _leaves(data: list[Any]) -> Iterator[Any]:
    """Every non-list element of nested lists, in order."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _leaf_types(data: list[Any]) -> set[type]:
    """The types of every leaf of nested lists: one C-speed pass per list, a Python step only per nested list."""
    types: set[type] = set()
    stack = [data]
    while stack:
        items = stack.pop()
        found = set(map(type, items))
        if list in found:
            found.discard(list)
            stack.extend(x for x in items if type(x) is list)
        types |= found
    return types


def _check_json_types(name: str, datatype: str, data: list[Any]) -> None:
    allowed, wording = _JSON_TYPES[datatype]
    wrong = _leaf_types(data) - allowed
    if wrong:
        example = next(x for x in _leaves(data) if type(x) in wrong)
        kind = _JSON_NAMES.get(type(example), "null" if example is None else type(example).__name__)
        value = shown(orjson.dumps(example).decode(), 40)
        raise InvalidInput(f"input '{name}': {datatype} data must be {wording}, found {kind} ({value})")


def _bytes_from_json(name: str, shape: tuple[int, ...], data: list[Any]) -> np.ndarray:
    try:
        # Every leaf is a str (checked before): a non-str element here is a list NumPy could not make an axis of.
        flat = np.array(data, dtype=np.object_).reshape(-1)
        if any(type(x) is not str for x in flat):
            raise ValueError("ragged")
    except ValueError:
        raise InvalidInput(f"input '{name}': 'data' is a ragged nested list") from None
    if flat.size != math.prod(shape):
        raise InvalidInput(f"input '{name}': {flat.size} elements in 'data' for shape {list(shape)}")
    flat[:] = [x.encode("utf-8") for x in flat]
    return flat.reshape(shape)


def _numbers_from_json(name: str, datatype: str, shape: tuple[int, ...], data: list[Any]) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # a float too large for its type becomes inf: refused just below
            arr = np.array(data, dtype=DATATYPES[datatype])
    except OverflowError:
        raise InvalidInput(f"input '{name}': a value in 'data' is out of range for {datatype}") from None
    except ValueError:
        raise InvalidInput(f"input '{name}': 'data' is a ragged nested list") from None
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"input '{name}': a value in 'data' is out of range for {datatype}")
    count = math.prod(shape)
    if arr.size != count:
        raise InvalidInput(f"input '{name}': {arr.size} elements in 'data' for shape {list(shape)} ({count})")
    return arr.reshape(shape)


def _from_json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list, got {_JSON_NAMES.get(type(data), 'null')}")
    _check_json_types(name, datatype, data)
    if datatype == "BYTES":
        return _bytes_from_json(name, shape, data)
    return _numbers_from_json(name, datatype, shape, data)


def tensor_from_raw(name: str, datatype: str, shape: tuple[int, ...], blob: memoryview) -> np.ndarray:
    """One input's raw bytes (REST binary data, gRPC raw_input_contents) as an array of its shape."""
    if datatype == "BYTES":
        return _bytes_from_binary(name, blob, math.prod(shape)).reshape(shape)
    dtype = _WIRE_DTYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(blob) != expected:
        raise InvalidInput(
            f"input '{name}': {len(blob)} bytes of binary data, but shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(blob, dtype=dtype).reshape(shape)


def tensor_to_raw(datatype: str, arr: np.ndarray) -> bytes:
    """An output's raw bytes: little-endian row-major, BYTES elements length-prefixed (Triton's format)."""
    if datatype == "BYTES":
        return _serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[datatype]).tobytes()


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
        if not isinstance(raw, dict):
            raise InvalidInput("every input must be an object")
        name = _name_of("input", raw.get("name"))
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears twice")
        datatype = _datatype_of_input(name, raw.get("datatype"))
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
            inputs[name] = tensor_from_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
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
        if not isinstance(item, dict):
            raise InvalidInput("every requested output must be an object")
        name = _name_of("output", item.get("name"))
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


def _nonfinite_json(flat: np.ndarray) -> orjson.Fragment:
    """A float array with NaN or infinities as JSON text with Triton's tokens for them."""
    text = flat.astype(str)
    text[np.isnan(flat)] = "NaN"
    text[np.isposinf(flat)] = "Infinity"
    text[np.isneginf(flat)] = "-Infinity"
    return orjson.Fragment(("[" + ",".join(text.tolist()) + "]").encode())


def _json_data(name: str, datatype: str, arr: np.ndarray) -> Any:
    if datatype == "BYTES":
        try:
            return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        except UnicodeDecodeError:
            raise InvalidInput(f"output '{name}' holds non-UTF-8 bytes: request it with binary_data") from None
    # orjson serialises contiguous NumPy arrays natively (OPT_SERIALIZE_NUMPY), far faster than tolist().
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return _nonfinite_json(flat)  # orjson would write null, which reads back as no value at all
    return flat


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
            blob = tensor_to_raw(datatype, arr)
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
