"""Hypothesis-generated OIP v2 infer requests, valid and mutated, over real HTTP to real `modelfleet serve`s.

Every OIP datatype and every request field (name, shape, datatype, data, parameters with binary_data_size,
outputs, id, timeout), JSON and binary-extension bodies, gzip too, against five real ONNX models: the
modelzoo classifier and two-input model, and three built here (an Identity per numeric datatype, an
Identity on strings, and an embedding lookup over int64 token ids). Properties, for every request:

- no 5xx and no hang (each request has a client timeout);
- every error is JSON `{"error": str}` with no traceback and no source path;
- a request the generator knows to be a client mistake (wrong datatype, shape, value, field) is a 4xx;
- a valid request is 200, and its outputs equal an in-process NumPy reference (exact for the Identity and
  embedding models, allclose for the MLPs; strings byte-exact).

The seed is fixed (`derandomize=True`), so CI sees the same requests on every run.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from modelfleet_runtime.protocol import DATATYPES
from tests.modelzoo import FEATURES, IR_VERSION, OPSET, classifier_reference, two_io_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

HEADER_LENGTH = "Inference-Header-Content-Length"
# (connect, read) seconds: a request not answered by then is a hang.
CLIENT_TIMEOUT = (10.0, 30.0)
# The protocol's own table: the kitchen model's Identity per datatype checks each entry against ONNX Runtime.
NUMERIC: dict[str, np.dtype[Any]] = {k: v for k, v in DATATYPES.items() if k != "BYTES"}
ALL_DATATYPES = [*NUMERIC, "BYTES", "BF16"]
_ONNX_TYPES = {k: helper.np_dtype_to_tensor_dtype(v) for k, v in NUMERIC.items()} | {"BYTES": TensorProto.STRING}
VOCAB, EMBED = 50, 8
MAX_BATCH = 8
_LEAK = re.compile(r'Traceback|File "|(?:/[\w.-]+)+\.(?:py|cc|cpp|h|hpp)\b|onnxruntime/')
# Client text without path separators, so that an error echoing it cannot look like a leaked source path.
TEXT = st.text(st.characters(exclude_characters="/\\", codec="utf-8"), max_size=8)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- models built here -------------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-fuzz")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, tensors: list[tuple[str, str, str]]) -> Path:
    """(input, output, datatype) triples: each input [batch, n_<input>] -> Identity -> its output."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [x], [y]) for x, y, _ in tensors],
        "identity",
        [helper.make_tensor_value_info(x, _ONNX_TYPES[d], ["batch", f"n_{x}"]) for x, _, d in tensors],
        [helper.make_tensor_value_info(y, _ONNX_TYPES[d], ["batch", f"n_{x}"]) for x, y, d in tensors],
    )
    return _save(graph, path)


def embedding_table() -> np.ndarray:
    # Quarters: every sum of a few of them is exact in FP32, so the reference can be compared exactly.
    return (np.random.default_rng(7).integers(-8, 8, (VOCAB, EMBED)) / 4).astype(np.float32)


def tokens_model(path: Path) -> Path:
    """`input_ids`, `attention_mask` INT64 [batch, seq] -> masked sum of Gather(embedding) FP32 [batch, 8]."""
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["vectors"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["pooled"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", EMBED])],
        initializer=[
            numpy_helper.from_array(embedding_table(), "embedding"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        ],
    )
    return _save(graph, path)


def tokens_reference(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (embedding_table()[ids] * mask[..., None].astype(np.float32)).sum(axis=1, dtype=np.float32)


# --- what each model takes and gives ---------------------------------------------------------------------


Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Tensor:
    """An input: its datatype, its non-batch dims (an int, or a symbol all inputs sharing it agree on)."""

    name: str
    datatype: str
    dims: tuple[int | str, ...]
    elements: st.SearchStrategy[Any] | None = None


@dataclass(frozen=True)
class Case:
    model: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, str], ...]
    reference: Callable[[Arrays], Arrays]
    exact: bool
    min_dim: int = 1
    shared: bool = field(default=False)

    def output_datatype(self, name: str) -> str:
        return dict(self.outputs)[name]


def _identity(prefix_in: str, prefix_out: str) -> Callable[[Arrays], Arrays]:
    return lambda xs: {prefix_out + k.removeprefix(prefix_in): v for k, v in xs.items()}


CASES: dict[str, Case] = {
    "classifier": Case(
        "classifier",
        (Tensor("input", "FP32", (FEATURES,), st.floats(-10, 10, width=32)),),
        (("probabilities", "FP32"),),
        lambda xs: {"probabilities": classifier_reference(xs["input"])},
        exact=False,
    ),
    "two_io": Case(
        "two_io",
        tuple(Tensor(n, "FP32", ("seq",), st.floats(-1e3, 1e3, width=32)) for n in ("a", "b")),
        (("sum", "FP32"), ("dot", "FP32")),
        lambda xs: dict(zip(("sum", "dot"), two_io_reference(xs["a"], xs["b"]), strict=True)),
        exact=False,
        shared=True,
    ),
    "kitchen": Case(
        "kitchen",
        tuple(Tensor(f"x_{d.lower()}", d, (f"n_{d.lower()}",)) for d in NUMERIC),
        tuple((f"y_{d.lower()}", d) for d in NUMERIC),
        _identity("x_", "y_"),
        exact=True,
        min_dim=0,
    ),
    "strings": Case(
        "strings",
        (Tensor("text", "BYTES", ("n",)),),
        (("text_out", "BYTES"),),
        lambda xs: {"text_out": xs["text"]},
        exact=True,
        min_dim=0,
    ),
    "tokens": Case(
        "tokens",
        (
            Tensor("input_ids", "INT64", ("seq",), st.integers(-VOCAB, VOCAB - 1)),
            Tensor("attention_mask", "INT64", ("seq",), st.integers(0, 1)),
        ),
        (("pooled", "FP32"),),
        lambda xs: {"pooled": tokens_reference(xs["input_ids"], xs["attention_mask"])},
        exact=True,
        shared=True,
    ),
}


# --- servers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_servers(
    session_servers: ServerFactory, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ServerProcess]:
    """One server per case (started together, then awaited), plus `tokens_batched` with a long queue delay."""
    root = tmp_path_factory.mktemp("fuzz-models")
    paths = {
        "classifier": models["classifier"],
        "two_io": models["two_io"],
        "kitchen": identity_model(root / "kitchen.onnx", [(f"x_{d.lower()}", f"y_{d.lower()}", d) for d in NUMERIC]),
        "strings": identity_model(root / "strings.onnx", [("text", "text_out", "BYTES")]),
        "tokens": tokens_model(root / "tokens.onnx"),
    }
    common = {"max_batch_size": str(MAX_BATCH), "max_request_bytes": str(1 << 20)}
    servers = {name: session_servers(path, name, wait_ready=False, **common) for name, path in paths.items()}
    servers["tokens_batched"] = session_servers(
        paths["tokens"], "tokens", wait_ready=False, max_queue_delay_microseconds="40000", **common
    )
    for server in servers.values():
        server.wait_ready()
    return servers


class Fleet:
    """The fuzzed servers and a keep-alive session to each (a short repr keeps hypothesis' reports readable)."""

    def __init__(self, servers: dict[str, ServerProcess]) -> None:
        self.servers = servers
        self.sessions = {name: requests.Session() for name in servers}

    def __repr__(self) -> str:
        return f"Fleet({', '.join(self.servers)})"

    def send(self, model: str, request: Request, *, server: str | None = None) -> requests.Response:
        name = server or model
        return send(self.sessions[name], self.servers[name], model, request)


@pytest.fixture(scope="module")
def fleet(fuzz_servers: dict[str, ServerProcess]) -> Iterator[Fleet]:
    made = Fleet(fuzz_servers)
    yield made
    for session in made.sessions.values():
        session.close()


# --- requests ------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """A request under construction: the JSON document and the binary tensors, in input order."""

    doc: dict[str, Any]
    blobs: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    gzip: bool = False
    arrays: Arrays = field(default_factory=dict)

    def encode(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if self.raw is not None:
            body = self.raw
        else:
            header = json.dumps(self.doc).encode()
            body = header + b"".join(self.blobs.values())
            if self.blobs:
                headers.setdefault(HEADER_LENGTH, str(len(header)))
        if self.gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        headers.setdefault("Content-Type", "application/octet-stream" if self.blobs else "application/json")
        return body, headers


_WIDTHS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}


def element(datatype: str) -> st.SearchStrategy[Any]:
    dtype = NUMERIC.get(datatype)
    if datatype == "BOOL":
        return st.booleans()
    if dtype is not None and dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    if dtype is not None:
        return st.floats(allow_nan=False, allow_infinity=False, width=_WIDTHS[dtype.itemsize])
    raise ValueError(datatype)


def to_array(datatype: str, values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        arr = np.empty(len(values), dtype=np.object_)
        arr[:] = values
        return arr.reshape(shape)
    return np.array(values, dtype=NUMERIC[datatype]).reshape(shape)


def bytes_wire(arr: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in arr.reshape(-1))


def wire(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return bytes_wire(arr)
    return np.ascontiguousarray(arr, dtype=NUMERIC[datatype].newbyteorder("<")).tobytes()


def json_data(datatype: str, arr: np.ndarray, nested: bool) -> Any:
    if datatype == "BYTES":
        flat = [x.decode("utf-8") for x in arr.reshape(-1)]
        return np.array(flat, dtype=object).reshape(arr.shape).tolist() if nested and arr.size else flat
    return arr.tolist() if nested else arr.reshape(-1).tolist()


@st.composite
def tensor_values(draw: st.DrawFn, tensor: Tensor, count: int, binary: bool) -> list[Any]:
    if tensor.datatype == "BYTES":
        # An ONNX string tensor holds UTF-8 text (ONNX Runtime takes nothing else), any text at all, NUL too;
        # bytes that are not UTF-8 are a client mistake (`not_utf8`).
        items = st.text(max_size=12 if binary else 8).map(lambda s: s.encode("utf-8"))
        return draw(st.lists(items, min_size=count, max_size=count))
    items = element(tensor.datatype) if tensor.elements is None else tensor.elements
    return draw(st.lists(items, min_size=count, max_size=count))


@st.composite
def valid_requests(draw: st.DrawFn, case: Case) -> Request:
    batch = draw(st.integers(1, 3))
    symbols: dict[str, int] = {}
    request = Request(doc={"inputs": []})
    for tensor in case.inputs:
        dims = tuple(
            d if isinstance(d, int) else symbols.setdefault(d, draw(st.integers(case.min_dim, 4))) for d in tensor.dims
        )
        shape = (batch, *dims)
        binary = draw(st.booleans())
        arr = to_array(tensor.datatype, draw(tensor_values(tensor, math.prod(shape), binary)), shape)
        request.arrays[tensor.name] = arr
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(shape), "datatype": tensor.datatype}
        if binary:
            request.blobs[tensor.name] = wire(tensor.datatype, arr)
            entry["parameters"] = {"binary_data_size": len(request.blobs[tensor.name])}
        else:
            entry["data"] = json_data(tensor.datatype, arr, draw(st.booleans()))
        request.doc["inputs"].append(entry)
    request.doc["inputs"] = draw(st.permutations(request.doc["inputs"]))
    # Binary blobs follow the order of the inputs that carry them.
    order = [e["name"] for e in request.doc["inputs"]]
    request.blobs = {n: request.blobs[n] for n in order if n in request.blobs}
    _draw_outputs(draw, case, request)
    if draw(st.booleans()):
        request.doc["id"] = draw(st.text(max_size=16))
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["binary_data_output"] = draw(st.booleans())
    if draw(st.booleans()):
        params["timeout"] = draw(st.integers(30_000_000, 2**40))
    empty_parameters = draw(st.booleans())
    if params or empty_parameters:
        request.doc["parameters"] = params
    _binary_out_for_raw_bytes(request)
    request.gzip = draw(st.integers(0, 5)) == 5
    return request


def _binary_out_for_raw_bytes(request: Request) -> None:
    """Bytes that are not UTF-8 cannot be JSON text: such a request asks for binary outputs (as it must)."""
    for arr in request.arrays.values():
        if arr.dtype == object and any(_not_utf8(x) for x in arr.reshape(-1)):
            request.doc.setdefault("parameters", {})["binary_data_output"] = True
            for out in request.doc.get("outputs") or []:
                out.pop("parameters", None)


def _not_utf8(item: bytes) -> bool:
    try:
        item.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _draw_outputs(draw: st.DrawFn, case: Case, request: Request) -> None:
    if draw(st.booleans()):
        return
    names = draw(st.lists(st.sampled_from([n for n, _ in case.outputs]), min_size=1, unique=True))
    outputs: list[dict[str, Any]] = []
    for name in names:
        item: dict[str, Any] = {"name": name}
        flag = draw(st.sampled_from([None, True, False]))
        if flag is not None:
            item["parameters"] = {"binary_data": flag}
        outputs.append(item)
    request.doc["outputs"] = outputs


# --- mutations: each makes a valid request into a client mistake (or into arbitrary bytes) ------------------

Mutation = Callable[[st.DrawFn, Case, Request], bool]  # returns: must the server refuse it with a 4xx?


def _some_input(draw: st.DrawFn, request: Request) -> dict[str, Any]:
    entry: dict[str, Any] = draw(st.sampled_from(request.doc["inputs"]))
    return entry


def _json_inputs(request: Request) -> list[dict[str, Any]]:
    return [e for e in request.doc["inputs"] if "data" in e and math.prod(e["shape"]) > 0]


def wrong_datatype(draw: st.DrawFn, case: Case, request: Request) -> bool:
    entry = _some_input(draw, request)
    entry["datatype"] = draw(st.sampled_from([d for d in ALL_DATATYPES if d != entry["datatype"]]))
    return True


def garbage_datatype(draw: st.DrawFn, case: Case, request: Request) -> bool:
    entry = _some_input(draw, request)
    entry["datatype"] = draw(json_values.filter(lambda v: v not in ALL_DATATYPES))
    return True


def bad_shape(draw: st.DrawFn, case: Case, request: Request) -> bool:
    entry = _some_input(draw, request)
    shape = list(entry["shape"])
    entry["shape"] = draw(
        st.sampled_from(
            [
                shape + [2],
                shape[:-1],
                shape[:-1] + [shape[-1] * 2 + 1],
                shape[:-1] + [-shape[-1] - 1],
                [1] * 65,
                [0, 2**62],
                [0, 2**40, 2**40],
                [2**63],
                [str(d) for d in shape],
                [float(d) for d in shape],
                [True] * len(shape),
                shape[0],
                None,
            ]
        )
    )
    return True


def bad_value(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """A value OIP does not allow for the datatype: no silent coercion of strings, nulls or fractions."""
    entries = _json_inputs(request)
    if not entries:
        return wrong_datatype(draw, case, request)
    entry = draw(st.sampled_from(entries))
    flat = np.array(entry["data"], dtype=object).reshape(-1).tolist()
    dtype = NUMERIC.get(entry["datatype"])
    choices: list[Any] = [None, {"x": 1}, [[1, 2]]]
    if entry["datatype"] == "BYTES":
        choices += [1, 2.5, True]
    else:
        choices += ["1", "abc", ""]
    if dtype is not None and dtype.kind in "iu":
        choices += [1.5, -0.25, int(np.iinfo(dtype).max) + 1, int(np.iinfo(dtype).min) - 1]
    flat[draw(st.integers(0, len(flat) - 1))] = draw(st.sampled_from(choices))
    entry["data"] = flat
    return True


def drop_field(draw: st.DrawFn, case: Case, request: Request) -> bool:
    entry = _some_input(draw, request)
    key = draw(st.sampled_from(["name", "datatype", "shape", "data" if "data" in entry else "parameters"]))
    del entry[key]
    if key == "parameters":
        request.blobs.pop(entry["name"], None)
    return True


def wrong_inputs(draw: st.DrawFn, case: Case, request: Request) -> bool:
    how = draw(st.sampled_from(["unknown", "missing", "duplicate", "none", "empty"]))
    inputs = request.doc["inputs"]
    if how == "unknown":
        extra = dict(inputs[0], name=draw(TEXT.filter(lambda n: n not in case_names(case))))
        extra.pop("parameters", None)
        extra.setdefault("data", [0] * math.prod(extra["shape"]))
        inputs.append(extra)
    elif how == "missing":
        gone = inputs.pop(draw(st.integers(0, len(inputs) - 1)))
        request.blobs.pop(gone["name"], None)
    elif how == "duplicate":
        inputs.append(dict(inputs[0]))
    else:
        request.doc["inputs"] = [] if how == "empty" else None
        request.blobs.clear()
    return True


def case_names(case: Case) -> set[str]:
    return {t.name for t in case.inputs}


def bad_fields(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """A top-level or per-tensor field of the wrong type: id, parameters, timeout, outputs."""
    where = draw(st.sampled_from(["id", "parameters", "timeout", "binary_output", "outputs", "output", "tparams"]))
    doc = request.doc
    if where == "id":
        doc["id"] = draw(st.sampled_from([1, 2.5, True, ["x"], {"a": 1}]))
    elif where == "parameters":
        doc["parameters"] = draw(st.sampled_from(["x", 3, True]))
    elif where == "timeout":
        doc.setdefault("parameters", {})["timeout"] = draw(st.sampled_from([-1, "10", 1.5, True, [1], {"us": 1}]))
    elif where == "binary_output":
        doc.setdefault("parameters", {})["binary_data_output"] = draw(st.sampled_from(["yes", 1, None, [True]]))
    elif where == "outputs":
        doc["outputs"] = draw(st.sampled_from([{"name": "x"}, "x", [1], [{"name": 3}], [{}]]))
    elif where == "output":
        name = case.outputs[0][0]
        doc["outputs"] = draw(
            st.sampled_from(
                [
                    [{"name": "no_such_output"}],
                    [{"name": name, "parameters": {"classification": 3}}],
                    [{"name": name, "parameters": {"binary_data": "yes"}}],
                    [{"name": name, "parameters": {"shared_memory_region": "r"}}],
                    [{"name": name, "parameters": "x"}],
                ]
            )
        )
    else:
        entry = _some_input(draw, request)
        entry["parameters"] = draw(st.sampled_from(["x", 7, {"shared_memory_region": "r"}]))
        request.blobs.pop(entry["name"], None)
    return True


def binary_lie(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """The binary extension misused: sizes, header length, trailing bytes, BYTES length prefixes."""
    how = draw(st.sampled_from(["size", "header", "trailing", "no_header", "prefix"]))
    entry = _some_input(draw, request)
    if how == "size":
        entry.pop("data", None)
        size = len(request.blobs.get(entry["name"], b""))
        entry["parameters"] = {
            "binary_data_size": draw(st.sampled_from([size + 1, size * 2 + 3, -1, 2**62, "8", True]))
        }
        request.blobs.setdefault(entry["name"], b"")
    elif how == "header":
        request.headers[HEADER_LENGTH] = draw(st.sampled_from(["0", "-5", "abc", "99999999", "1.5", "", "+3", "3 3"]))
        request.blobs.setdefault("_pad", b"\0")
    elif how == "trailing":
        request.blobs["_extra"] = draw(st.binary(min_size=1, max_size=16))
    elif how == "no_header":  # binary_data_size in a plain JSON body
        entry.pop("data", None)
        entry["parameters"] = {"binary_data_size": 0}
        request.raw = json.dumps(request.doc).encode()
    else:
        entry.pop("data", None)
        entry["datatype"] = "BYTES"
        count = math.prod(entry["shape"]) if isinstance(entry["shape"], list) else 1
        blob = struct.pack("<I", 1000) + b"abc" if count else b"\x01"
        request.blobs[entry["name"]] = blob
        entry["parameters"] = {"binary_data_size": len(blob)}
    return True


def token_out_of_range(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """A model error from a value (Gather index out of range): still the client's mistake."""
    where = draw(st.integers(0, request.arrays["input_ids"].size - 1))
    poison(request, where, draw(st.sampled_from(BAD_TOKENS)))
    return True


BAD_TOKENS = [VOCAB, VOCAB + 1, 10**9, -VOCAB - 1, -(2**62)]


def poison(request: Request, where: int, token: int) -> None:
    arr = request.arrays["input_ids"].copy()
    arr.reshape(-1)[where] = token
    _replace(request, "input_ids", arr)


def not_utf8(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """Bytes a string tensor cannot hold, sent with the binary extension: refused, never altered."""
    arr = request.arrays["text"].copy()
    if arr.size == 0:
        return False
    bad = draw(st.sampled_from([b"\x80", b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"]))
    arr.reshape(-1)[draw(st.integers(0, arr.size - 1))] = bad
    next(e for e in request.doc["inputs"] if e["name"] == "text").pop("data", None)  # JSON cannot carry them
    _replace(request, "text", arr)
    return True


def mismatched_dims(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """Inputs that disagree on a shared dynamic dimension (seq): the model would fail on them."""
    name = case.inputs[-1].name
    arr = request.arrays[name]
    _replace(request, name, np.concatenate([arr, arr[:, :1]], axis=1))
    return True


def _replace(request: Request, name: str, arr: np.ndarray) -> None:
    request.arrays[name] = arr
    entry = next(e for e in request.doc["inputs"] if e["name"] == name)
    entry["shape"] = list(arr.shape)
    datatype = entry["datatype"]
    if "data" in entry:
        entry["data"] = json_data(datatype, arr, nested=False)
    else:
        request.blobs[name] = wire(datatype, arr)
        entry["parameters"] = {"binary_data_size": len(request.blobs[name])}


def batch_too_large(draw: st.DrawFn, case: Case, request: Request) -> bool:
    for name, arr in list(request.arrays.items()):
        _replace(request, name, np.concatenate([arr] * (MAX_BATCH + 1), axis=0))
    return True


def gzip_corrupt(draw: st.DrawFn, case: Case, request: Request) -> bool:
    body, headers = request.encode()
    request.raw = gzip.compress(body)[: draw(st.integers(1, 12))] + b"\xff" * 4
    request.headers = {**headers, "Content-Encoding": draw(st.sampled_from(["gzip", "deflate", "br", "x-unknown"]))}
    request.gzip = False
    return True


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def garbage_anywhere(draw: st.DrawFn, case: Case, request: Request) -> bool:
    """Any JSON value at any field, or a body that is not a request at all: no 5xx, whatever it means."""
    how = draw(st.sampled_from(["field", "tensor_field", "body_json", "body_bytes", "truncated"]))
    if how == "field":
        request.doc[draw(st.sampled_from(["inputs", "outputs", "id", "parameters", "extra"]))] = draw(json_values)
    elif how == "tensor_field":
        entry = _some_input(draw, request)
        entry[draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))] = draw(json_values)
    elif how == "body_json":
        request.raw = json.dumps(draw(json_values)).encode()
    elif how == "body_bytes":
        request.raw = draw(st.binary(max_size=64))
    else:
        body, headers = request.encode()
        request.raw, request.headers = body[: draw(st.integers(0, max(len(body) - 1, 0)))], headers
        request.gzip = False
    return False


COMMON_MUTATIONS: list[Mutation] = [
    wrong_datatype,
    garbage_datatype,
    bad_shape,
    bad_value,
    drop_field,
    wrong_inputs,
    bad_fields,
    binary_lie,
    batch_too_large,
    gzip_corrupt,
    garbage_anywhere,
]
MODEL_MUTATIONS: dict[str, list[Mutation]] = {
    "tokens": [token_out_of_range, mismatched_dims],
    "two_io": [mismatched_dims],
    "strings": [not_utf8],
}


@st.composite
def mutated_requests(draw: st.DrawFn, case: Case, mutation: Mutation) -> tuple[Request, bool]:
    request = draw(valid_requests(case))
    return request, mutation(draw, case, request)


# --- sending and checking ------------------------------------------------------------------------------------


def send(session: requests.Session, server: ServerProcess, model: str, request: Request) -> requests.Response:
    body, headers = request.encode()
    try:
        return session.post(f"{server.url}/v2/models/{model}/infer", data=body, headers=headers, timeout=CLIENT_TIMEOUT)
    except requests.Timeout:
        pytest.fail(f"no answer within {CLIENT_TIMEOUT[1]} s (a hang): {body[:300]!r}")


def assert_clean_error(response: requests.Response) -> None:
    """An error is JSON {"error": str}, and it shows neither a traceback nor a source path."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.status_code,
        response.text,
    )
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], str), body
    assert not _LEAK.search(body["error"]), body["error"]


def assert_answered_well(response: requests.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_clean_error(response)


def decode_response(response: requests.Response) -> dict[str, tuple[str, list[int], Any]]:
    """{output name: (datatype, shape, values)}; values are a NumPy array (binary) or JSON data."""
    length = response.headers.get(HEADER_LENGTH)
    content = response.content
    doc = json.loads(content[: int(length)] if length else content)
    offset = int(length or 0)
    out: dict[str, tuple[str, list[int], Any]] = {}
    for item in doc["outputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[item["name"]] = (item["datatype"], item["shape"], item["data"])
            continue
        blob = content[offset : offset + size]
        offset += size
        out[item["name"]] = (item["datatype"], item["shape"], _from_wire(item["datatype"], blob))
    assert not length or offset == len(content), "trailing bytes after the last binary output"
    return out


def _from_wire(datatype: str, blob: bytes) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(blob, dtype=NUMERIC[datatype].newbyteorder("<"))
    items: list[bytes] = []
    offset = 0
    while offset < len(blob):
        (n,) = struct.unpack_from("<I", blob, offset)
        items.append(blob[offset + 4 : offset + 4 + n])
        offset += 4 + n
    arr = np.empty(len(items), dtype=np.object_)
    arr[:] = items
    return arr


def as_array(datatype: str, values: Any, shape: list[int]) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.reshape(shape)
    if datatype == "BYTES":
        flat = np.array(values, dtype=object).reshape(-1)
        assert all(isinstance(x, str) for x in flat), f"BYTES output holds non-strings: {values!r}"
        return to_array("BYTES", [x.encode("utf-8") for x in flat], tuple(shape))
    flat = np.array(values, dtype=object).reshape(-1)
    assert all(x is not None for x in flat), f"null in a {datatype} output: {values!r}"
    return np.array(flat.tolist(), dtype=NUMERIC[datatype]).reshape(shape)


def wanted_outputs(case: Case, request: Request) -> list[str]:
    requested = request.doc.get("outputs")
    return [o["name"] for o in requested] if requested else [n for n, _ in case.outputs]


def assert_matches_reference(case: Case, request: Request, response: requests.Response) -> None:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:500]}"
    doc_id = request.doc.get("id")
    got = decode_response(response)
    assert list(got) == wanted_outputs(case, request)
    header = json.loads(response.content[: int(response.headers.get(HEADER_LENGTH) or len(response.content))])
    assert header["model_name"] == case.model
    if doc_id is not None:
        assert header["id"] == doc_id
    expected = case.reference(request.arrays)
    for name, (datatype, shape, values) in got.items():
        want = expected[name]
        assert datatype == case.output_datatype(name)
        assert shape == list(want.shape), (name, shape, want.shape)
        arr = as_array(datatype, values, shape)
        if datatype == "BYTES":
            assert arr.reshape(-1).tolist() == want.reshape(-1).tolist(), name
        elif case.exact:
            np.testing.assert_array_equal(arr, want.astype(arr.dtype), err_msg=name)
        else:
            np.testing.assert_allclose(arr, want, rtol=1e-4, atol=1e-5, err_msg=name)


# --- the properties ------------------------------------------------------------------------------------------

MODELS = list(CASES)


@pytest.mark.parametrize("model", MODELS)
@FUZZ
@given(data=st.data())
def test_valid_requests_get_the_reference_outputs(model: str, data: st.DataObject, fleet: Fleet) -> None:
    case = CASES[model]
    request = data.draw(valid_requests(case), label="request")
    response = fleet.send(model, request)
    assert_answered_well(response)
    assert_matches_reference(case, request, response)


MUTATIONS = [(m, f) for m in MODELS for f in COMMON_MUTATIONS + MODEL_MUTATIONS.get(m, [])]


@pytest.mark.parametrize(("model", "mutation"), MUTATIONS, ids=[f"{m}-{f.__name__}" for m, f in MUTATIONS])
@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_mutated_requests_get_a_clean_4xx(model: str, mutation: Mutation, data: st.DataObject, fleet: Fleet) -> None:
    case = CASES[model]
    request, must_refuse = data.draw(mutated_requests(case, mutation), label="request, must refuse")
    response = fleet.send(model, request)
    assert_answered_well(response)
    if must_refuse:
        assert 400 <= response.status_code < 500, f"{response.status_code} {response.text[:300]}"


@settings(FUZZ, max_examples=40)
@given(datatype=st.sampled_from([d for d in ALL_DATATYPES if d != "FP32"]), binary=st.booleans(), data=st.data())
def test_every_datatype_to_the_wrong_model_is_a_clean_4xx(
    datatype: str,
    binary: bool,
    data: st.DataObject,
    fleet: Fleet,
) -> None:
    """Every OIP datatype, BF16 included, sent to an FP32 input: refused by name, never computed."""
    count = FEATURES
    if binary:
        width = 2 if datatype == "BF16" else (4 if datatype == "BYTES" else NUMERIC[datatype].itemsize)
        blob = data.draw(st.binary(min_size=count * width, max_size=count * width))
        request = Request(
            doc={"inputs": [{"name": "input", "shape": [1, count], "datatype": datatype}]}, blobs={"input": blob}
        )
        request.doc["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    else:
        strategy = TEXT if datatype == "BYTES" else (st.floats(-2, 2) if datatype == "BF16" else element(datatype))
        values = data.draw(st.lists(strategy, min_size=count, max_size=count))
        request = Request(
            doc={"inputs": [{"name": "input", "shape": [1, count], "datatype": datatype, "data": values}]}
        )
    response = fleet.send("classifier", request)
    assert_answered_well(response)
    assert 400 <= response.status_code < 500, (datatype, response.status_code, response.text[:300])


@settings(FUZZ, max_examples=30)
@given(
    values=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5]), min_size=1, max_size=6).filter(
        lambda v: any(not math.isfinite(x) for x in v)
    ),
    datatype=st.sampled_from(["FP16", "FP32", "FP64"]),
    binary_out=st.booleans(),
)
def test_non_finite_floats_are_exact_in_binary_and_never_null_in_json(
    values: list[float],
    datatype: str,
    binary_out: bool,
    fleet: Fleet,
) -> None:
    """NaN and infinities sent in binary come back bit-exact in binary; in JSON they are an error or not null."""
    case = CASES["kitchen"]
    request = Request(doc={"inputs": []}, blobs={})
    for tensor in case.inputs:
        wanted = values if tensor.datatype == datatype else [0] * len(values)
        arr = np.array(wanted, dtype=NUMERIC[tensor.datatype]).reshape(1, -1)
        request.arrays[tensor.name] = arr
        request.blobs[tensor.name] = wire(tensor.datatype, arr)
        request.doc["inputs"].append(
            {
                "name": tensor.name,
                "shape": list(arr.shape),
                "datatype": tensor.datatype,
                "parameters": {"binary_data_size": len(request.blobs[tensor.name])},
            }
        )
    request.doc["outputs"] = [{"name": f"y_{datatype.lower()}", "parameters": {"binary_data": binary_out}}]
    response = fleet.send("kitchen", request)
    assert_answered_well(response)
    if binary_out or response.status_code == 200:
        assert response.status_code == 200, response.text[:300]
        (_, shape, got) = decode_response(response)[f"y_{datatype.lower()}"]
        arr = as_array(datatype, got, shape)
        assert arr.tobytes() == request.arrays[f"x_{datatype.lower()}"].tobytes()


@settings(FUZZ, max_examples=15)
@given(data=st.data())
def test_a_bad_request_fails_alone_in_its_batch(data: st.DataObject, fleet: Fleet) -> None:
    """Requests sent together share a batch (40 ms queue delay); one out-of-range token id fails only itself."""
    case = CASES["tokens"]
    server = fleet.servers["tokens_batched"]
    seq = data.draw(st.integers(1, 4), label="seq")
    batch = [data.draw(_fixed_seq_request(case, seq), label="request") for _ in range(6)]
    bad = set(data.draw(st.lists(st.integers(0, len(batch) - 1), min_size=1, max_size=2, unique=True), label="bad"))
    for i in bad:
        where = data.draw(st.integers(0, batch[i].arrays["input_ids"].size - 1), label="where")
        poison(batch[i], where, data.draw(st.sampled_from(BAD_TOKENS), label="token"))
    bodies = [r.encode() for r in batch]
    url = f"{server.url}/v2/models/tokens/infer"
    with ThreadPoolExecutor(len(batch)) as pool:
        responses = list(
            pool.map(lambda b: requests.post(url, data=b[0], headers=b[1], timeout=CLIENT_TIMEOUT), bodies)
        )
    for i, (request, response) in enumerate(zip(batch, responses, strict=True)):
        if i not in bad:
            assert_matches_reference(case, request, response)
    for i in bad:
        assert_answered_well(responses[i])
        assert 400 <= responses[i].status_code < 500, responses[i].text[:300]


@st.composite
def _fixed_seq_request(draw: st.DrawFn, case: Case, seq: int) -> Request:
    """A tokens request of a given sequence length, so that concurrent ones can share a batch."""
    request = draw(valid_requests(case))
    for name in ("input_ids", "attention_mask"):
        arr = request.arrays[name]
        _replace(request, name, np.tile(arr, (1, -(-seq // arr.shape[1])))[:, :seq])
    return request
