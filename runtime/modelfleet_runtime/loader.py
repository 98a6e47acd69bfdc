"""Resolve `--model` (an .onnx file or an engine-store directory) into a loaded `Backend` and its limits.

Engine-store contract (written by `modelfleet build`): the directory holds `manifest.json` with at least
`{"key", "backend": "onnxruntime"|"tensorrt", "artifact": <file in the dir>, "artifact_sha256",
"options": {"batch": {"min", "opt", "max"}, "shapes": {name: {"min", "opt", "max"}}, ...}}`.
The batch profile's max caps maxBatchSize; `shapes[name].opt` and `.max` (non-batch dimensions, axis 1
onwards) size the warm-up of other dynamic axes, and `.max` the timing that decides inline compute.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelfleet_runtime.backends.base import Backend, TensorSpec
from modelfleet_runtime.build import cpu
from modelfleet_runtime.settings import ServeSettings

MANIFEST = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt")


class ModelLoadError(Exception):
    """The model cannot be served: a bad path, manifest or artifact. The message says which."""


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ModelSource:
    """Where the artifact is and what the store says about it; built without touching any runtime."""

    backend: str
    artifact: Path
    sha256: str | None = None
    key: str | None = None
    batch: BatchProfile | None = None
    opt_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    max_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    architecture: str | None = None  # what the store entry was built for (smXY or cpu)


def _profile(raw: Any) -> BatchProfile | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelLoadError("manifest options.batch must be an object with min/opt/max")
    try:
        hi = int(raw["max"])
        lo, opt = int(raw.get("min", 1)), int(raw.get("opt", hi))
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"manifest options.batch {raw!r} needs integer min/opt/max") from None
    if not 1 <= lo <= opt <= hi:
        raise ModelLoadError(f"manifest options.batch needs 1 <= min <= opt <= max, got {raw!r}")
    return BatchProfile(min=lo, opt=opt, max=hi)


def _check_int8_portability(manifest: dict[str, Any], manifest_path: Path, *, this_cpu: str) -> None:
    """Refuse an int8 artifact whose results depend on the CPU class when this CPU's class differs."""
    details = manifest.get("details")
    if not isinstance(details, dict) or details.get("int8Portable") is not False:
        return
    gated_on = str(details.get("cpuInt8Kernel"))
    if not cpu.same_int8_results(gated_on, this_cpu):
        raise ModelLoadError(
            f"{manifest_path}: the artifact keeps the model's own int8 weights and was gated on a CPU of int8 "
            f"kernel class {gated_on!r}; this CPU is {this_cpu!r}, where its int8 products "
            f"{'saturate' if cpu.u8s8_saturates(this_cpu) else 'do not saturate'}, so the gate's verdict does "
            "not hold here: serve it on a node of the class it was built on"
        )


def _shapes(shapes: dict[str, Any], which: str, manifest_path: Path) -> dict[str, list[int]]:
    """Non-batch dimensions (axis 1 onwards) at `which` (opt or max), as the builder records them."""
    try:
        return {
            name: [int(d) for d in spec[which]]
            for name, spec in shapes.items()
            if isinstance(spec, dict) and isinstance(spec.get(which), list)
        }
    except (TypeError, ValueError):
        raise ModelLoadError(f"{manifest_path}: options.shapes {which} dimensions must be integers") from None


def with_served_shapes(source: ModelSource, settings: ServeSettings) -> ModelSource:
    """A bare .onnx takes its opt/max shapes from the `shapes` setting; a store entry keeps its manifest's."""
    if source.opt_shapes or source.max_shapes or not settings.shapes:
        return source
    return replace(
        source,
        opt_shapes={name: list(b.opt) for name, b in settings.shapes.items()},
        max_shapes={name: list(b.max) for name, b in settings.shapes.items()},
    )


def shapes_known(specs: Sequence[TensorSpec], max_shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether every dynamic non-batch axis of every input has a max: then timing at the max shapes holds."""
    for spec in specs:
        bounds = max_shapes.get(spec.name, ())
        for axis, dim in enumerate(spec.shape[1:]):
            if dim == -1 and not (axis < len(bounds) and bounds[axis] > 0):
                return False
    return True


def build_model_source(path: Path) -> ModelSource:
    """Read `path`: an .onnx file serves with ONNX Runtime; a directory must be an engine-store entry."""
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelLoadError(f"{path} is not an .onnx file (or an engine-store directory)")
        return ModelSource(backend="onnxruntime", artifact=path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is a directory without {MANIFEST}: not an engine-store entry") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {manifest_path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{manifest_path} must hold a JSON object")
    backend = manifest.get("backend")
    if backend not in BACKENDS:
        raise ModelLoadError(f"{manifest_path}: backend must be one of {BACKENDS}, got {backend!r}")
    artifact = manifest.get("artifact")
    if not isinstance(artifact, str) or not artifact or Path(artifact).name != artifact:
        raise ModelLoadError(f"{manifest_path}: artifact must be a file name inside the directory, got {artifact!r}")
    options = manifest.get("options") or {}
    if not isinstance(options, dict):
        raise ModelLoadError(f"{manifest_path}: options must be an object")
    shapes = options.get("shapes") or {}
    if not isinstance(shapes, dict):
        raise ModelLoadError(f"{manifest_path}: options.shapes must be an object")
    opt_shapes, max_shapes = _shapes(shapes, "opt", manifest_path), _shapes(shapes, "max", manifest_path)
    _check_int8_portability(manifest, manifest_path, this_cpu=cpu.this_cpu())
    sha = manifest.get("artifact_sha256")
    return ModelSource(
        backend=backend,
        artifact=path / artifact,
        sha256=sha if isinstance(sha, str) else None,
        key=manifest.get("key") if isinstance(manifest.get("key"), str) else None,
        batch=_profile(options.get("batch")),
        opt_shapes=opt_shapes,
        max_shapes=max_shapes,
        architecture=manifest.get("architecture") if isinstance(manifest.get("architecture"), str) else None,
    )


def gpu_expected(settings: ServeSettings, source: ModelSource) -> bool:
    """Whether this pod should compute on a GPU: its architecture (the setting, else the store's) is smXY."""
    return (settings.architecture or source.architecture or "").startswith("sm")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_warmup_batch_sizes(
    *, max_batch_size: int, preferred: Sequence[int], profile: BatchProfile | None, mode: str
) -> list[int]:
    """The batch sizes warmed up before ready: every size, or the profile's interesting ones."""
    lowest = profile.min if profile else 1
    if mode == "all":
        return list(range(lowest, max_batch_size + 1))
    sizes = {lowest, max_batch_size, *preferred}
    if profile:
        sizes |= {profile.min, profile.opt, profile.max}
    power = 1
    while power < max_batch_size:
        sizes.add(power)
        power *= 2
    return sorted(s for s in sizes if lowest <= s <= max_batch_size)


def load_backend(source: ModelSource, settings: ServeSettings) -> Backend:
    """Verify the artifact and open it with the backend the store names (blocking: call from a thread)."""
    if not source.artifact.is_file():
        raise ModelLoadError(f"artifact {source.artifact} does not exist")
    if settings.verify_artifact and source.sha256:
        actual = file_sha256(source.artifact)
        if actual != source.sha256:
            raise ModelLoadError(f"artifact {source.artifact} has sha256 {actual}, the manifest says {source.sha256}")
    if source.backend == "tensorrt":
        from modelfleet_runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(source.artifact)
    from modelfleet_runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtOptions

    return OnnxRuntimeBackend(
        source.artifact,
        OrtOptions(
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            allow_spinning=settings.ort_allow_spinning,
            optimization_level=settings.graph_optimization_level,
            providers=tuple(settings.providers),
            io_binding=settings.io_binding,
            gpu_expected=gpu_expected(settings, source),
        ),
    )
