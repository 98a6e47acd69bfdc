"""The TensorRT build path: a strongly typed network from the prepared ONNX -> a serialized engine for one GPU.

Written against the TensorRT 10.x and 11.x Python APIs (`tensorrt`, from the `gpu` extra); a contract test
(tests/runtime/test_tensorrt_contract.py) imports the real bindings of both majors and checks every member used
here. It cannot run on the CI machine, which has no GPU: everything is imported lazily, and the pure part
(`build_profile_shapes`, `network_flags`, `timing_cache_path`, `check_precision`) is tested on CPU.

What it does:
- `trt.Builder` -> `create_network(flags)`: strongly typed (10.x: the STRONGLY_TYPED creation flag; 11.x:
  always). Precision comes from the model: build/precision.py made the fp16 or Q/DQ ONNX before any
  architecture's build, so no precision builder flags and no calibrator (both gone in 11.x) are used;
- `trt.OnnxParser.parse_from_file` (handles external weights), every parser error reported with its node;
- one optimization profile: the batch profile on axis 0, `--shape` ranges on the other dynamic axes;
- a timing cache per architecture and TensorRT version, `<store>/timing-cache/<arch>-<version>.bin`,
  loaded before and saved (atomically) after the build, so rebuilds of similar models skip layer timing;
- the WORKSPACE memory pool limit and the builder optimization level (0-5) from the options;
- `build_serialized_network`, whose failure reports the builder's own error lines.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from modelfleet_runtime.build import BuildFailed, InvalidOptions, Unsupported
from modelfleet_runtime.build.accuracy import Array, Feeds, Runner
from modelfleet_runtime.build.options import BuildOptions
from modelfleet_runtime.build.ort import Built
from modelfleet_runtime.build.precision import Prepared
from modelfleet_runtime.build.validate import ModelSpec, concrete_shape, dynamic_axes

log = logging.getLogger(__name__)

ARTIFACT_NAME = "engine.plan"

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
    if options.precision == "fp8" and sm_number(architecture) < 89:
        raise Unsupported(f"fp8 needs sm89 or newer (Ada, Hopper), not {architecture}")
    if options.precision == "fp8" and spec.has_qdq and not spec.has_fp8:
        raise Unsupported("fp8 asked for a model whose Q/DQ nodes are not FP8")
    if options.precision in ("int8", "fp8") and options.calibration is None and not spec.has_qdq:
        raise Unsupported(
            f"{options.precision} on tensorrt needs --calibration data (for its Q/DQ ranges) or a model with Q/DQ nodes"
        )


def network_flags(trt: Any) -> int:
    """Strongly typed: precision from the model's types and Q/DQ. 11.x networks always are (and may have
    dropped the flag); 10.x needs the STRONGLY_TYPED creation flag."""
    if int(str(trt.__version__).split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


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
    spec: ModelSpec,
    options: BuildOptions,
    architecture: str,
    out_dir: Path,
    store: Path,
    prepared: Prepared,
) -> Built:
    """Build `out_dir/engine.plan` from `prepared.path` as a strongly typed network (see the module docstring)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise Unsupported("the tensorrt backend needs the tensorrt package (the `gpu` extra)") from exc
    check_precision(spec=spec, options=options, architecture=architecture)
    profile_shapes = build_profile_shapes(spec, options)
    version = str(trt.__version__)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(prepared.path)):
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

    cache_file = timing_cache_path(store, architecture=architecture, version=version)
    timing_cache = _load_timing_cache(config, cache_file)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
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
            "stronglyTyped": True,
            "quantization": "qdq-in-model" if spec.has_qdq else ("prepared" if prepared.key else None),
            "builderOptimizationLevel": options.tensorrt.builder_optimization_level,
            "workspaceMiB": options.tensorrt.workspace_mib,
            "profile": {n: {"min": s[0], "opt": s[1], "max": s[2]} for n, s in profile_shapes.items()},
            "timingCache": str(cache_file.relative_to(store)),
        },
    )


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
