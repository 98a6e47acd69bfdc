"""Check an ONNX model before spending minutes on a build: checker, opset, and a batch axis on every input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.checker
import onnx.defs
import onnx.helper
import onnx.shape_inference

from modelfleet_runtime.build import InvalidModel, InvalidOptions
from modelfleet_runtime.build.options import BuildOptions

# TensorRT 10's ONNX parser starts at opset 9; the top is what this onnx release knows.
MIN_OPSET = 9

# A dynamic non-batch axis with no --shape gets this length in synthetic samples (ONNX Runtime path only;
# TensorRT needs an explicit range to build a profile).
DEFAULT_DYNAMIC_DIM = 16

_OIP_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: numpy dtype name and dims (int fixed, str symbolic, None unknown)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None
    id_range: int | None = None  # integer input used as Gather indices into a table of this many rows

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol datatype name (FP32, INT64, ...)."""
        return _OIP_DATATYPES.get(self.dtype, self.dtype.upper())

    @property
    def classifier_shaped(self) -> bool:
        """2-D [batch, classes] with a fixed class count (a symbolic axis 1 is a sequence, not classes)."""
        dims = self.shape or ()
        return len(dims) == 2 and isinstance(dims[1], int) and dims[1] >= 2

    def manifest_entry(self) -> dict[str, object]:
        shape = None if self.shape is None else [d if isinstance(d, int) else -1 for d in self.shape]
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


@dataclass(frozen=True)
class ModelSpec:
    """What the build needs to know about a valid model."""

    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    has_qdq: bool
    has_fp8: bool

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


def validate_model(path: Path, *, options: BuildOptions) -> ModelSpec:
    """Load and check the model; InvalidModel (or InvalidOptions for --shape) names what is wrong."""
    model = load_model(path)
    try:
        # Checking by path handles external data and models over 2 GiB.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModel(f"model {path.name} fails onnx.checker: {_one_line(exc)}") from exc
    except Exception as exc:  # the checker raises bare RuntimeErrors for some malformed graphs
        raise InvalidModel(f"model {path.name} fails onnx.checker: {type(exc).__name__}: {_one_line(exc)}") from exc
    opset = default_opset(model)
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise InvalidModel(f"model {path.name}: opset {opset} is outside the supported range {MIN_OPSET}..{top}")
    spec = build_model_spec(model, opset=opset)
    check_batch_axes(spec, options=options)
    check_shapes(spec, options=options)
    return spec


def load_model(path: Path) -> onnx.ModelProto:
    """Parse the protobuf, turning a truncated or corrupted file into a clear InvalidModel."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidModel(f"model {path}: cannot read: {exc}") from exc
    if size == 0:
        raise InvalidModel(f"model {path.name} is empty (0 bytes)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, or external-data errors
        raise InvalidModel(
            f"model {path.name} ({size} bytes) is not a readable ONNX file; truncated or corrupted? "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from exc
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModel(f"model {path.name} ({size} bytes) has no graph; truncated or not an ONNX model?")
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in {"", "ai.onnx"}:
            return int(entry.version)
    raise InvalidModel("model imports no version of the default ONNX opset")


def build_model_spec(model: onnx.ModelProto, *, opset: int) -> ModelSpec:
    """Inputs (initializers excluded: old exporters list them as inputs), outputs, and quantization hints."""
    initializers = {init.name: init for init in model.graph.initializer}
    tables = _gather_tables(model, initializers)
    inputs = tuple(
        _tensor_spec(v, kind="input", id_range=tables.get(v.name))
        for v in model.graph.input
        if v.name not in initializers
    )
    if not inputs:
        raise InvalidModel("model has no inputs")
    outputs = tuple(_tensor_spec(v, kind="output") for v in model.graph.output)
    ops = {node.op_type for node in model.graph.node}
    fp8_types = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    has_fp8 = any(init.data_type in fp8_types for init in model.graph.initializer) or any(
        attr.name == "output_dtype" and attr.i in fp8_types
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
        for attr in node.attribute
    )
    has_qdq = "QuantizeLinear" in ops and "DequantizeLinear" in ops
    return ModelSpec(opset=opset, inputs=inputs, outputs=outputs, has_qdq=has_qdq, has_fp8=has_fp8)


def _gather_tables(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto]) -> dict[str, int]:
    """Graph inputs used directly as row indices of an initializer (embedding tables): input -> rows.
    Synthetic ids drawn from that range look like real tokens instead of the first few (special) ones."""
    tables: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in initializers:
            continue
        axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
        dims = initializers[node.input[0]].dims
        if axis == 0 and dims:
            rows = int(dims[0])
            tables[node.input[1]] = min(rows, tables.get(node.input[1], rows))
    return tables


def _tensor_spec(value: onnx.ValueInfoProto, *, kind: str, id_range: int | None = None) -> TensorSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        raise InvalidModel(f"{kind} {value.name!r} is not a tensor ({value.type.WhichOneof('value')})")
    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError) as exc:
        name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise InvalidModel(f"{kind} {value.name!r} has element type {name}, which the build cannot feed") from exc
    if not tensor.HasField("shape"):
        return TensorSpec(name=value.name, dtype=dtype, shape=None, id_range=id_range)
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        which = dim.WhichOneof("value")
        dims.append(dim.dim_value if which == "dim_value" else dim.dim_param if which == "dim_param" else None)
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims), id_range=id_range)


def check_batch_axes(spec: ModelSpec, *, options: BuildOptions) -> None:
    """Axis 0 of every input is the batch axis: dynamic, or fixed and the batch profile pinned to it."""
    batch = options.batch
    for tensor in spec.inputs:
        if tensor.shape is None:
            raise InvalidModel(f"input {tensor.name!r} has no shape in the model; a batch axis (axis 0) is needed")
        if not tensor.shape:
            raise InvalidModel(f"input {tensor.name!r} is a scalar; every input needs a batch axis (axis 0)")
        first = tensor.shape[0]
        if isinstance(first, int) and first > 0 and not batch.min == batch.opt == batch.max == first:
            raise InvalidModel(
                f"input {tensor.name!r}: axis 0 is fixed to {first}, so it cannot serve batches "
                f"{batch.min}..{batch.max}; export the model with a dynamic batch axis, or build with "
                f"--batch-min {first} --batch-opt {first} --batch-max {first}"
            )


def check_shapes(spec: ModelSpec, *, options: BuildOptions) -> None:
    """Every --shape names an input, has its non-batch rank, and agrees with its fixed dims."""
    names = [t.name for t in spec.inputs]
    for name, shape in options.shapes.items():
        if name not in names:
            raise InvalidOptions(f"--shape names {name!r}, which is not a model input (inputs: {', '.join(names)})")
        dims = spec.input(name).shape or ()
        rest = dims[1:]
        if len(shape.min) != len(rest):
            raise InvalidOptions(
                f"--shape {name}: gives {len(shape.min)} non-batch dims, but input {name!r} has {len(rest)}"
            )
        for axis, dim in enumerate(rest, start=1):
            if isinstance(dim, int) and dim > 0:
                given = {shape.min[axis - 1], shape.opt[axis - 1], shape.max[axis - 1]}
                if given != {dim}:
                    raise InvalidOptions(f"--shape {name}: axis {axis} is fixed to {dim} in the model")


def dynamic_axes(tensor: TensorSpec) -> list[int]:
    """Non-batch axes whose length the model leaves open."""
    dims = tensor.shape or ()
    return [axis for axis, dim in enumerate(dims) if axis > 0 and not (isinstance(dim, int) and dim > 0)]


def concrete_shape(tensor: TensorSpec, *, batch: int, options: BuildOptions, point: str = "opt") -> tuple[int, ...]:
    """A concrete shape for `tensor` at `batch`: fixed dims kept, dynamic ones from --shape (`point` of
    min/opt/max) or DEFAULT_DYNAMIC_DIM."""
    dims = tensor.shape or ()
    given = options.shapes.get(tensor.name)
    out = [batch]
    for axis, dim in enumerate(dims[1:], start=1):
        if given is not None:
            out.append(getattr(given, point)[axis - 1])
        elif isinstance(dim, int) and dim > 0:
            out.append(dim)
        else:
            out.append(DEFAULT_DYNAMIC_DIM)
    return tuple(out)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."
