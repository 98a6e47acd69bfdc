"""Native TensorRT 10 backend: deserialize a plan, set input shapes per batch, execute_async_v3 on a stream.

Written against the TensorRT 10 Python API (`trt.Runtime`, `deserialize_cuda_engine`,
`create_execution_context`, named I/O tensors via `num_io_tensors` / `get_tensor_name` / `get_tensor_mode`,
`set_input_shape`, `set_tensor_address`, `execute_async_v3`) and cuda-python's runtime bindings for device
memory and the stream. Both are imported lazily so this module imports on machines without them.

It cannot run here: this machine and CI have no GPU. It is exercised on a GPU machine by
tests/runtime/test_tensorrt_backend.py, which builds an engine from an ONNX model and compares outputs with
ONNX Runtime; that test skips with its reason where tensorrt or a CUDA device is missing.

Device buffers are allocated once at the profile's maximum shapes and reused, so a batch costs one
host-to-device copy per input, the launch, and one device-to-host copy per output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet_runtime.backends.base import ExecutionProvider, TensorSpec, run_warmup

log = logging.getLogger(__name__)

# TensorRT DataType names -> OIP datatypes (BF16/FP8/INT4 have no NumPy dtype and are refused at load).
TRT_TYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


def _cudart() -> Any:
    from modelfleet_runtime.cuda import cudart

    return cudart()


def _check(result: Any) -> Any:
    """cuda-python calls return (error, *values); raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    cudart = _cudart()
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class TensorRTBackend:
    """One engine, one execution context and one CUDA stream; `infer` runs in a single executor thread."""

    def __init__(self, path: Path, *, device: int = 0) -> None:
        import tensorrt as trt

        self._trt = trt
        cudart = _cudart()
        self._cudart = cudart
        _check(cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(
                f"TensorRT {trt.__version__} could not deserialize {path}: built by another TensorRT version "
                "or for another GPU architecture?"
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of device memory?)")
        self._stream = _check(cudart.cudaStreamCreate())

        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._max_shapes: dict[str, tuple[int, ...]] = {}
        self._np_types: dict[str, np.dtype[Any]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype_name = engine.get_tensor_dtype(name).name
            datatype = TRT_TYPES.get(dtype_name)
            if datatype is None:
                raise RuntimeError(f"tensor '{name}' has TensorRT type {dtype_name}, which the server cannot carry")
            self._np_types[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name=name, datatype=datatype, shape=shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                # Profile 0: (min, opt, max) shapes; the max sizes the reusable device buffer.
                _, _, max_shape = engine.get_tensor_profile_shape(name, 0)
                self._max_shapes[name] = tuple(int(d) for d in max_shape)
            else:
                outputs.append(spec)
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._profile_max_batch = min((s[0] for s in self._max_shapes.values() if s), default=None)

        # Output buffers are sized by the shapes TensorRT infers for the maximal inputs.
        for name, shape in self._max_shapes.items():
            if not self._context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT rejected the profile max shape {shape} for input '{name}'")
        for spec in outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output '{spec.name}' has a data-dependent shape {shape}: not supported")
            self._max_shapes[spec.name] = shape
        self._buffers: dict[str, int] = {}
        for name, shape in self._max_shapes.items():
            nbytes = max(1, math.prod(shape)) * self._np_types[name].itemsize
            self._buffers[name] = _check(cudart.cudaMalloc(nbytes))
            # Addresses never change: bind them once for every later execute_async_v3.
            if not self._context.set_tensor_address(name, self._buffers[name]):
                raise RuntimeError(f"TensorRT rejected the device address for tensor '{name}'")
        log.info(
            "TensorRT %s engine %s: %d inputs, %d outputs, profile max batch %s",
            trt.__version__,
            path,
            len(inputs),
            len(outputs),
            self._profile_max_batch,
        )

    @property
    def platform(self) -> str:
        return "tensorrt_plan"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def max_batch_size(self) -> int | None:
        return self._profile_max_batch

    @property
    def execution_provider(self) -> ExecutionProvider:
        return ExecutionProvider(active="TensorRT", requested="TensorRT", gpu_expected=True)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        # Keep host arrays alive until the stream has consumed them.
        staged: list[np.ndarray] = []
        for spec in self._inputs:
            arr = np.ascontiguousarray(inputs[spec.name], dtype=self._np_types[spec.name])
            limit = self._max_shapes[spec.name]
            if any(have > cap for have, cap in zip(arr.shape, limit, strict=True)):
                raise ValueError(f"input '{spec.name}' shape {arr.shape} exceeds the engine profile max {limit}")
            if not self._context.set_input_shape(spec.name, arr.shape):
                raise ValueError(f"TensorRT rejected shape {arr.shape} for input '{spec.name}'")
            staged.append(arr)
            _check(cudart.cudaMemcpyAsync(self._buffers[spec.name], arr.ctypes.data, arr.nbytes, h2d, self._stream))
        results: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(spec.name))
            results[spec.name] = np.empty(shape, dtype=self._np_types[spec.name])
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, out in results.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name], out.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        del staged
        return results

    def warmup(self, batch_sizes: Sequence[int], *, iterations: int, dims: Mapping[str, Sequence[int]]) -> None:
        run_warmup(self, batch_sizes, iterations=iterations, dims=dims)

    def close(self) -> None:
        for ptr in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self._stream)
