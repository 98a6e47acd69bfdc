"""ONNX Runtime backend: providers tried in the order TensorRT, CUDA, CPU, with tuned session options."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet_runtime.backends.base import TensorSpec, run_warmup

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})

# ONNX Runtime type strings ("tensor(float)") to OIP datatypes.
ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class OrtOptions:
    """The knobs `ServeSettings` passes to ONNX Runtime."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    optimization_level: str = "all"
    providers: tuple[str, ...] = ()
    io_binding: str = "auto"
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


def choose_providers(available: Sequence[str], requested: Sequence[str] = ()) -> list[str]:
    """Requested providers (or TensorRT, CUDA, CPU) in order, keeping those this ONNX Runtime build has.

    CPU is always appended last as the fallback ONNX Runtime needs for nodes other providers cannot run.
    """
    wanted = list(requested) or list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _dim(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else -1


def _spec(node: Any) -> TensorSpec:
    datatype = ORT_TYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor '{node.name}' has type {node.type}, which the server cannot carry")
    return TensorSpec(name=node.name, datatype=datatype, shape=tuple(_dim(d) for d in node.shape))


class OnnxRuntimeBackend:
    """One `InferenceSession`; `infer` may run in several threads (ONNX Runtime's Run is thread-safe)."""

    def __init__(self, path: Path, options: OrtOptions | None = None) -> None:
        import onnxruntime as ort

        self._options = options or OrtOptions()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self._options.optimization_level]
        opts.intra_op_num_threads = self._options.intra_op_threads
        opts.inter_op_num_threads = self._options.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads burn the cores the HTTP loop and the other batch need.
        spin = "1" if self._options.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        opts.log_severity_level = 3

        providers = choose_providers(ort.get_available_providers(), self._options.providers)
        provider_args = [(p, dict(self._options.provider_options.get(p, {}))) for p in providers]
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=provider_args)
        self.providers: list[str] = list(self._session.get_providers())
        self._inputs = tuple(_spec(n) for n in self._session.get_inputs())
        self._outputs = tuple(_spec(n) for n in self._session.get_outputs())
        self._output_names = [s.name for s in self._outputs]
        on_gpu = bool(self.providers) and self.providers[0] in GPU_PROVIDERS
        mode = self._options.io_binding
        self.io_binding = mode == "on" or (mode == "auto" and on_gpu)
        self._device = "cuda" if on_gpu else "cpu"
        log.info("onnxruntime session on %s (io_binding=%s)", ", ".join(self.providers), self.io_binding)

    @property
    def platform(self) -> str:
        return "onnxruntime_onnx"

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def max_batch_size(self) -> int | None:
        return None

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._infer_bound(inputs)
        results = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))

    def _infer_bound(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # I/O binding lets ONNX Runtime copy inputs to the device once and allocate outputs there, instead
        # of the extra staging copies `run` makes with GPU providers.
        binding = self._session.io_binding()
        for name, arr in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._output_names:
            binding.bind_output(name, self._device)
        self._session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, results, strict=True))

    def warmup(self, batch_sizes: Sequence[int], *, iterations: int, dims: Mapping[str, Sequence[int]]) -> None:
        run_warmup(self, batch_sizes, iterations=iterations, dims=dims)

    def close(self) -> None:
        # Sessions free their memory when dropped; nothing to release explicitly.
        pass
