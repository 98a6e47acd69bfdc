"""The `Backend` protocol every model runtime implements, and the tensor specs it publishes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from modelfleet_runtime.protocol import DATATYPES


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: OIP datatype and shape, -1 for a dynamic dimension (batch axis included).

    `dim_names` gives each axis's symbolic name where the model declares one (ONNX `dim_param`): axes of
    the same name must have the same size in a request, whichever inputs they are on.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    dim_names: tuple[str | None, ...] = ()

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class ExecutionProvider:
    """What a backend computes on (`active`) and what it asked for first (`requested`).

    ONNX Runtime names its providers (`CUDAExecutionProvider`, ...); the native TensorRT backend reports
    `TensorRT` for both. `gpu_expected` is whether this pod should compute on a GPU (see `ServeSettings.
    architecture`): then `active` being the CPU provider is the fault the operator reports as ServingOnCPU.
    """

    active: str
    requested: str
    gpu_expected: bool = False

    @property
    def on_cpu(self) -> bool:
        return self.active == CPU_PROVIDER

    def parameters(self) -> dict[str, Any]:
        """The OIP `parameters` of the model metadata that carry it."""
        return {
            "execution_provider": self.active,
            "requested_execution_provider": self.requested,
            "gpu_expected": self.gpu_expected,
        }


class Backend(Protocol):
    """Runs a model on a dict of NumPy arrays; `infer` runs in executor threads, one per instance."""

    @property
    def platform(self) -> str:
        """Triton-style platform name reported in model metadata, e.g. `onnxruntime_onnx`."""
        ...

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def max_batch_size(self) -> int | None:
        """The largest batch the model can take (e.g. a TensorRT profile max), or None when unbounded."""
        ...

    @property
    def execution_provider(self) -> ExecutionProvider:
        """What it computes on now (ONNX Runtime may fall back to another provider while it runs)."""
        ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def warmup(self, batch_sizes: Sequence[int], *, iterations: int, dims: Mapping[str, Sequence[int]]) -> None:
        """Run every batch size `iterations` times so first requests do not pay for allocation or tuning."""
        ...

    def close(self) -> None: ...


def build_warmup_inputs(
    specs: Sequence[TensorSpec], batch: int, dims: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Zero-filled inputs of batch size `batch`; other dynamic axes take `dims[name]` or 1.

    `dims[name]` lists an input's non-batch dimensions (axis 1 onwards), as the engine store's
    `options.shapes[name].opt` does. Zeros are valid for every datatype (token id 0 is [PAD] in BERT
    vocabularies, for example).
    """
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        wanted = list(dims.get(spec.name, ()))
        shape = []
        for axis, dim in enumerate(spec.shape):
            if axis == 0 and dim == -1:
                shape.append(batch)
            elif dim == -1:
                shape.append(int(wanted[axis - 1]) if axis - 1 < len(wanted) and wanted[axis - 1] > 0 else 1)
            else:
                shape.append(dim)
        if spec.datatype == "BYTES":
            arr = np.empty(shape, dtype=np.object_)
            arr.fill(b"")
            feeds[spec.name] = arr
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def run_warmup(
    backend: Backend, batch_sizes: Sequence[int], *, iterations: int, dims: Mapping[str, Sequence[int]]
) -> None:
    """The shared warm-up loop: each size, `iterations` times, checking outputs carry the batch."""
    batched = all(spec.shape and spec.shape[0] == -1 for spec in backend.inputs)
    for batch in batch_sizes if batched else [1]:
        feeds = build_warmup_inputs(backend.inputs, batch, dims)
        for _ in range(iterations):
            outputs = backend.infer(feeds)
            missing = [spec.name for spec in backend.outputs if spec.name not in outputs]
            if missing:
                raise RuntimeError(f"warm-up at batch {batch}: the model returned no {missing}")
