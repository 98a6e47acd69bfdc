"""The TensorRT 10 build path: ONNX -> a serialized engine for one GPU architecture and TensorRT version.

Written against the TensorRT 10 Python API (`tensorrt`, from the `gpu` extra) and cuda-python for device
memory. It cannot run on the CI machine, which has neither a GPU nor TensorRT: everything here is imported
lazily, CI covers the ONNX Runtime path, and this path is exercised on a GPU machine. The pure part
(`build_profile_shapes`, `timing_cache_path`, `check_precision`) is tested on CPU.

What it does:
- `trt.Builder` -> `create_network(0)` (explicit batch is the only mode in TensorRT 10) ->
  `trt.OnnxParser.parse_from_file` (handles external weights), every parser error reported with its node;
- one optimization profile: the batch profile on axis 0, `--shape` ranges on the other dynamic axes;
- precision flags: FP16; INT8 (+FP16 for layers without INT8 kernels) from an entropy calibrator over the
  calibration data, or from the model's own Q/DQ nodes; FP8 (+FP16) only from FP8 Q/DQ models on sm89+.
  The implicit-quantization calibrator is deprecated since TensorRT 10.1 in favour of Q/DQ models (e.g.
  from TensorRT Model Optimizer) but still works throughout 10.x;
- a timing cache per architecture and TensorRT version, `<store>/timing-cache/<arch>-<version>.bin`,
  loaded before and saved (atomically) after the build, so rebuilds of similar models skip layer timing;
- the WORKSPACE memory pool limit and the builder optimization level (0-5) from the options;
- `build_serialized_network`, whose failure reports the builder's own error lines.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet_runtime.build import BuildFailed, InvalidOptions, Unsupported
from modelfleet_runtime.build.accuracy import Array, Feeds, Runner, split_batches
from modelfleet_runtime.build.options import BuildOptions
from modelfleet_runtime.build.ort import Built
from modelfleet_runtime.build.validate import ModelSpec, concrete_shape, dynamic_axes

log = logging.getLogger(__name__)

ARTIFACT_NAME = "engine.plan"
CALIBRATION_CACHE_NAME = "calibration.cache"

Shape = tuple[int, ...]


def backend_version() -> str:
    import tensorrt

    return str(tensorrt.__version__)


def timing_cache_path(store: Path, *, architecture: str, version: str) -> Path:
    return store / "timing-cache" / f"{architecture}-{version}.bin"


def sm_number(architecture: str) -> int:
    """`sm89` -> 89; 0 for `cpu`."""
    return int(architecture[2:]) if architecture.startswith("sm") else 0


def check_precision(*, spec: ModelSpec, options: BuildOptions, architecture: str) -> None:
    """Refuse what TensorRT cannot build here, before any GPU time is spent."""
    if architecture == "cpu":
        raise Unsupported("the tensorrt backend needs a GPU architecture (smXY), not cpu")
    if options.precision == "fp8":
        if sm_number(architecture) < 89:
            raise Unsupported(f"fp8 needs sm89 or newer (Ada, Hopper), not {architecture}")
        if not spec.has_fp8:
            raise Unsupported("fp8 needs a model with FP8 Q/DQ nodes (e.g. from TensorRT Model Optimizer)")
    if options.precision == "int8" and options.calibration is None and not spec.has_qdq:
        raise Unsupported("int8 on tensorrt needs --calibration data or a model with Q/DQ nodes")


def build_profile_shapes(spec: ModelSpec, options: BuildOptions) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes per input: batch profile on axis 0, --shape (or fixed dims) on the rest."""
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    batch = options.batch
    for tensor in spec.inputs:
        open_axes = dynamic_axes(tensor)
        if open_axes and tensor.name not in options.shapes:
            raise InvalidOptions(
                f"input {tensor.name!r} has dynamic axes {open_axes}: TensorRT needs their range, "
                f"give --shape {tensor.name}=MIN:OPT:MAX (non-batch dims, comma-separated)"
            )
        shapes[tensor.name] = (
            concrete_shape(tensor, batch=batch.min, options=options, point="min"),
            concrete_shape(tensor, batch=batch.opt, options=options, point="opt"),
            concrete_shape(tensor, batch=batch.max, options=options, point="max"),
        )
    return shapes


def build_tensorrt(
    *,
    model_path: Path,
    spec: ModelSpec,
    options: BuildOptions,
    architecture: str,
    out_dir: Path,
    store: Path,
    calibration: Feeds | None,
) -> Built:
    """Build `out_dir/engine.plan` with TensorRT 10 (see the module docstring)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise Unsupported("the tensorrt backend needs the tensorrt package (the `gpu` extra)") from exc
    check_precision(spec=spec, options=options, architecture=architecture)
    profile_shapes = build_profile_shapes(spec, options)
    version = str(trt.__version__)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailed(f"TensorRT's ONNX parser failed with {len(errors)} error(s): " + " | ".join(errors))

    config = builder.create_builder_config()
    if options.tensorrt.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.tensorrt.workspace_mib << 20)
    config.builder_optimization_level = options.tensorrt.builder_optimization_level

    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        low, mid, high = profile_shapes[name]
        profile.set_shape(name, low, mid, high)
    config.add_optimization_profile(profile)

    flags, quantization = _set_precision(trt, config=config, options=options, spec=spec)
    calibrator = None
    if quantization == "calibrator":
        assert calibration is not None  # check_precision guarantees it
        calibrator = _make_calibrator(
            trt,
            batches=_calibration_batches(
                calibration, options=options, opt_shapes={n: s[1] for n, s in profile_shapes.items()}
            ),
            cache_file=out_dir / CALIBRATION_CACHE_NAME,
        )
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)

    cache_file = timing_cache_path(store, architecture=architecture, version=version)
    timing_cache = _load_timing_cache(config, cache_file)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.free()
    if serialized is None:
        raise BuildFailed(
            "TensorRT could not build the engine: " + (" | ".join(logger.errors[-5:]) or "no error logged")
        )
    artifact = out_dir / ARTIFACT_NAME
    with artifact.open("wb") as out:
        out.write(memoryview(serialized))  # IHostMemory exposes the buffer protocol
    _save_timing_cache(config, cache_file)
    return Built(
        artifact=artifact,
        effective_precision=options.precision,
        details={
            "flags": flags,
            "quantization": quantization,
            "builderOptimizationLevel": options.tensorrt.builder_optimization_level,
            "workspaceMiB": options.tensorrt.workspace_mib,
            "profile": {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in profile_shapes.items()},
            "timingCache": str(cache_file.relative_to(store)),
        },
    )


def _set_precision(trt: Any, *, config: Any, options: BuildOptions, spec: ModelSpec) -> tuple[list[str], str | None]:
    flags: list[str] = []
    quantization = None
    if options.precision in {"fp16", "int8", "fp8"}:
        # For int8/fp8 too: layers without int8/fp8 kernels fall back to fp16 instead of fp32.
        flags.append("FP16")
    if options.precision == "int8":
        flags.append("INT8")
        quantization = "qdq-in-model" if spec.has_qdq else "calibrator"
    if options.precision == "fp8":
        flags.append("FP8")
        quantization = "qdq-in-model"
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    return flags, quantization


def _describe_parser_error(error: Any) -> str:
    """One parser error: code, node index, and (TensorRT 10) node name and operator when known."""
    parts = [str(error.code()).split(".")[-1], f"node {error.node()}"]
    for attribute in ("node_name", "node_operator"):
        getter = getattr(error, attribute, None)
        value = getter() if callable(getter) else None
        if value:
            parts.append(f"{attribute.replace('_', ' ')} {value}")
    return f"{' '.join(parts)}: {error.desc()}"


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps error lines for the failure message."""

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.INFO:
                log.debug("tensorrt: %s", msg)

    return _Logger()


def _load_timing_cache(config: Any, path: Path) -> Any:
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a truncated or foreign cache file must not fail the build
        cache = None
    if cache is None and blob:
        log.warning("timing cache %s is unreadable; starting a new one", path)
        cache = config.create_timing_cache(b"")
    if blob and cache is not None:
        log.info("timing cache: loaded %d bytes from %s", len(blob), path)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write the grown cache atomically: concurrent builds of one architecture share the file."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(memoryview(cache.serialize()))
    os.replace(tmp, path)


def _calibration_batches(calibration: Feeds, *, options: BuildOptions, opt_shapes: dict[str, Shape]) -> list[Feeds]:
    """Calibration runs at the profile's opt shapes, so the data must have them (batches of opt rows)."""
    for name, array in calibration.items():
        if tuple(array.shape[1:]) != opt_shapes[name][1:]:
            raise InvalidOptions(
                f"calibration {name!r} rows have shape {tuple(array.shape[1:])}; TensorRT calibrates at the "
                f"profile's opt shape {opt_shapes[name][1:]}"
            )
    batches = split_batches(calibration, batch_size=options.batch.opt, min_batch=options.batch.opt)
    if not batches:
        raise InvalidOptions(f"calibration data needs at least batch-opt={options.batch.opt} rows")
    return batches


# ---------------------------------------------------------------- calibration (cuda-python device memory)


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _cuda_check(result: Any) -> Any:
    """cuda-python calls return (error, *values)."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BuildFailed(f"CUDA error: {err}")
    return values[0] if len(values) == 1 else None


class _DeviceBuffers:
    """Device copies of one calibration batch, freed explicitly."""

    def __init__(self) -> None:
        self._pointers: list[int] = []

    def upload(self, array: Array) -> int:
        cudart = _cudart()
        array = np.ascontiguousarray(array)
        pointer = int(_cuda_check(cudart.cudaMalloc(max(array.nbytes, 1))))
        self._pointers.append(pointer)
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _cuda_check(cudart.cudaMemcpy(pointer, array.ctypes.data, array.nbytes, kind))
        return pointer

    def free(self) -> None:
        cudart = _cudart()
        for pointer in self._pointers:
            cudart.cudaFree(pointer)
        self._pointers.clear()


def _make_calibrator(trt: Any, *, batches: Sequence[Feeds], cache_file: Path) -> Any:
    """An IInt8EntropyCalibrator2 over in-memory batches; it always calibrates (no cache read), and writes
    the calibration table next to the engine for inspection."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._buffers = _DeviceBuffers()
            self._batch_size = next(iter(batches[0].values())).shape[0]

        def get_batch_size(self) -> int:
            return int(self._batch_size)

        def get_batch(self, names: list[str]) -> list[int] | None:
            feeds = next(self._batches, None)
            self._buffers.free()  # the previous batch has been consumed
            if feeds is None:
                return None
            return [self._buffers.upload(feeds[name]) for name in names]

        def read_calibration_cache(self) -> bytes | None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_file.write_bytes(bytes(cache))

        def free(self) -> None:
            self._buffers.free()

    return _Calibrator()


def engine_runner(artifact: Path) -> Runner:
    """Run the built engine on the GPU for the accuracy gate, with the serving runtime's own TensorRT backend
    (modelfleet_runtime.backends.tensorrt): the gate checks the engine the way it will be served."""
    from modelfleet_runtime.backends.tensorrt import TensorRTBackend

    try:
        backend = TensorRTBackend(artifact)
    except RuntimeError as exc:
        raise BuildFailed(f"the built engine cannot be loaded: {exc}") from exc

    def run(feeds: Feeds) -> dict[str, Array]:
        return backend.infer(feeds)

    return run
