"""ONNX Runtime backend: providers tried in the order TensorRT (beside TensorRT 10), CUDA, CPU, tuned options.

Two things ONNX Runtime's Python API does not do for us: string tensors go in as `str` (it turns `bytes`
into their repr, and takes no byte strings at all, so BYTES elements must be UTF-8), and its errors say
nothing of whose fault they are. An error caused by the request's values (ONNX Runtime's INVALID_ARGUMENT,
or a kernel's FAIL on values it cannot compute with) becomes `InvalidInput` naming the input, with ONNX
Runtime's source paths and C++ signatures taken out; anything else stays a server fault.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet_runtime.backends.base import CPU_PROVIDER, ExecutionProvider, TensorSpec, run_warmup
from modelfleet_runtime.protocol import InvalidInput

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER)
# ONNX Runtime's TensorRT provider links libnvinfer.so.10 (every onnxruntime-gpu up to 1.31 at least).
ORT_TENSORRT_MAJOR = 10
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
    gpu_expected: bool = False  # the pod serves a GPU architecture: a CPU provider is then a fault


def preferred_providers(tensorrt_version: str | None) -> tuple[str, ...]:
    """The default order: TensorRT, CUDA, CPU; TensorRT only beside the TensorRT major ONNX Runtime's provider
    loads (it cannot load beside TensorRT 11, and would only log an error block on every session)."""
    major = (tensorrt_version or "").split(".")[0]
    if major.isdigit() and int(major) == ORT_TENSORRT_MAJOR:
        return PREFERRED_PROVIDERS
    return tuple(p for p in PREFERRED_PROVIDERS if p != "TensorrtExecutionProvider")


def _installed_tensorrt() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        return None


def choose_providers(available: Sequence[str], requested: Sequence[str] = ()) -> list[str]:
    """Requested providers (or `preferred_providers`) in order, keeping those this ONNX Runtime build has.

    CPU is always appended last as the fallback ONNX Runtime needs for nodes other providers cannot run.
    """
    wanted = list(requested) or list(preferred_providers(_installed_tensorrt()))
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def requested_provider(requested: Sequence[str], chosen: Sequence[str], *, gpu_expected: bool) -> str:
    """The provider the backend asks for first: the first GPU one wanted when a GPU is expected (whether or not
    this ONNX Runtime build has it), else the first one `choose_providers` kept."""
    if gpu_expected:
        gpu = [p for p in list(requested) or list(preferred_providers(_installed_tensorrt())) if p in GPU_PROVIDERS]
        if gpu:
            return gpu[0]
    return chosen[0]


def wants_gpu(options: OrtOptions, available: Sequence[str]) -> bool:
    """A GPU provider is expected, asked for by name, or offered by this ONNX Runtime build."""
    return options.gpu_expected or any(p in GPU_PROVIDERS for p in (*options.providers, *available))


def preload_gpu_libraries(ort: Any) -> str:
    """Call `onnxruntime.preload_dlls()` (ORT >= 1.21), which loads the CUDA and cuDNN libraries of the nvidia-*
    pip wheels, which the providers' own loader does not search; returns how it went. Never raises."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        log.warning("onnxruntime %s has no preload_dlls() (ORT >= 1.21 has it)", getattr(ort, "__version__", "?"))
        return "unavailable"
    try:
        preload()
    except Exception as exc:
        log.warning("onnxruntime.preload_dlls() failed, the GPU providers may not load: %s", exc)
        return f"failed: {exc}"
    return "ran"


def fallback_message(ep: ExecutionProvider, *, available: Sequence[str], build: str, preload: str) -> str | None:
    """The warning when the first GPU provider asked for is not the one computing, or None."""
    if ep.requested not in GPU_PROVIDERS or ep.active == ep.requested:
        return None
    if ep.requested not in available:
        why = (
            f"this ONNX Runtime ({build}) has no {ep.requested}, only {', '.join(available)}: "
            "install modelfleet's `gpu` extra (onnxruntime-gpu) and not onnxruntime"
        )
    else:
        why = (
            f"{build} has it but it did not load (its CUDA, cuDNN or TensorRT libraries are missing or of another "
            f"major version: see ONNX Runtime's own log above; preload_dlls: {preload})"
        )
    return f"serving on {ep.active}; asked for {ep.requested}: {why}"


def _build_name(ort: Any) -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info

        name = str(info.package_name)
    except (ImportError, AttributeError):
        name = "onnxruntime"
    return f"{name} {getattr(ort, '__version__', '?')}"


def _dim(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else -1


def _spec(node: Any) -> TensorSpec:
    datatype = ORT_TYPES.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor '{node.name}' has type {node.type}, which the server cannot carry")
    return TensorSpec(
        name=node.name,
        datatype=datatype,
        shape=tuple(_dim(d) for d in node.shape),
        dim_names=tuple(d if isinstance(d, str) and d else None for d in node.shape),
    )


# --- strings -----------------------------------------------------------------------------------------------


def to_ort_strings(name: str, arr: np.ndarray) -> np.ndarray:
    """A BYTES array (object array of bytes) as the object array of `str` ONNX Runtime takes, byte-exact."""
    flat = arr.reshape(-1)
    try:
        text = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError:
        index = next(i for i, x in enumerate(flat) if isinstance(x, bytes) and not _is_utf8(x))
        raise InvalidInput(
            f"input '{name}': element {index} is not valid UTF-8; ONNX Runtime takes string tensors as UTF-8 text"
        ) from None
    out = np.empty(len(text), dtype=np.object_)
    out[:] = text
    return out.reshape(arr.shape)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- errors ------------------------------------------------------------------------------------------------

_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
# ORT_ENFORCE's "<file>:<line> <C++ signature> <condition> was false. "; the message after it is the useful part.
_SOURCE = re.compile(r"\S*onnxruntime_src\S*:\d+ (?:[^()]*\([^()]*\)(?: const)? )?(?:.*? was false\. )?")
_PATH = re.compile(r"(?:/[\w.+-]+){2,}")
_ALLOCATION = re.compile(r"alloc|out of memory", re.IGNORECASE)
_FOR_INPUT = re.compile(r"for input: (\S+)")
MESSAGE_LIMIT = 300


def clean_ort_message(text: str) -> str:
    """ONNX Runtime's message for a client: no error-code prefix, no source paths, signatures or long tails."""
    text = _PREFIX.sub("", text)
    text = _NODE.sub(lambda m: f"{m[1]} node" + (f" '{m[2]}'" if m[2] else "") + ": ", text)
    text = _PATH.sub("<path>", _SOURCE.sub("", text))
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."


def is_input_error(exc: BaseException) -> bool:
    """Whether ONNX Runtime failed because of the values it was given rather than the server's state."""
    if not type(exc).__module__.endswith("onnxruntime_pybind11_state"):
        return False
    kind = type(exc).__name__
    if kind == "InvalidArgument":
        return True
    # A kernel's own check (a broadcast, a reshape) fails as FAIL while running its node; so does an
    # allocation that did not fit, which is the server's problem.
    message = str(exc)
    return kind == "Fail" and "while running" in message and not _ALLOCATION.search(message)


def input_error(exc: BaseException, input_names: Sequence[str]) -> InvalidInput:
    """The client's error for an ONNX Runtime failure on its values, naming the input where it can."""
    detail = clean_ort_message(str(exc))
    named = _FOR_INPUT.search(str(exc))
    blamed = [named[1]] if named and named[1] in input_names else list(input_names)
    if len(blamed) == 1:
        return InvalidInput(f"input '{blamed[0]}' was rejected by the model: {detail}")
    quoted = ", ".join(f"'{n}'" for n in blamed)
    return InvalidInput(f"inputs {quoted} were rejected by the model: {detail}")


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

        available = list(ort.get_available_providers())
        providers = choose_providers(available, self._options.providers)
        preload = preload_gpu_libraries(ort) if wants_gpu(self._options, available) else "not needed"
        provider_args = [(p, dict(self._options.provider_options.get(p, {}))) for p in providers]
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=provider_args)
        self.providers: list[str] = list(self._session.get_providers())
        self._requested = requested_provider(
            self._options.providers, providers, gpu_expected=self._options.gpu_expected
        )
        warning = fallback_message(
            self.execution_provider, available=available, build=_build_name(ort), preload=preload
        )
        if warning is not None:
            log.warning("%s", warning)
        self._inputs = tuple(_spec(n) for n in self._session.get_inputs())
        self._outputs = tuple(_spec(n) for n in self._session.get_outputs())
        self._output_names = [s.name for s in self._outputs]
        self._input_names = [s.name for s in self._inputs]
        self._strings = frozenset(s.name for s in self._inputs if s.datatype == "BYTES")
        # Errors caused by a request are the client's (InvalidInput); ONNX Runtime need not log each one.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
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

    @property
    def execution_provider(self) -> ExecutionProvider:
        # Read each time: ONNX Runtime's run() may switch a session to its fallback providers after an EP failure.
        active = next(iter(self._session.get_providers()), CPU_PROVIDER)
        return ExecutionProvider(active=active, requested=self._requested, gpu_expected=self._options.gpu_expected)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: to_ort_strings(n, a) if n in self._strings else a for n, a in inputs.items()}
        try:
            if self.io_binding:
                return self._infer_bound(feeds)
            results = self._session.run(self._output_names, feeds, self._run_options)
        except UnicodeDecodeError:
            raise RuntimeError("the model made a string that is not UTF-8, which ONNX Runtime cannot return") from None
        except Exception as exc:
            if is_input_error(exc):
                raise input_error(exc, self._input_names) from None
            raise
        return dict(zip(self._output_names, results, strict=True))

    def _infer_bound(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # I/O binding lets ONNX Runtime copy inputs to the device once and allocate outputs there, instead
        # of the extra staging copies `run` makes with GPU providers.
        binding = self._session.io_binding()
        for name, arr in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._output_names:
            binding.bind_output(name, self._device)
        self._session.run_with_iobinding(binding, self._run_options)
        results = binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, results, strict=True))

    def warmup(self, batch_sizes: Sequence[int], *, iterations: int, dims: Mapping[str, Sequence[int]]) -> None:
        run_warmup(self, batch_sizes, iterations=iterations, dims=dims)

    def close(self) -> None:
        # Sessions free their memory when dropped; nothing to release explicitly.
        pass
