"""`modelfleet build`: fetch, key, cache check, validate, build, accuracy gate, atomic publish, result line.

Run by the operator's build Jobs inside the runtime image, so the engine is built by the very TensorRT or
ONNX Runtime that serves it. Progress goes to stderr, one line per step with its duration; the result is
one JSON line on stdout and in the termination-message file the operator reads. Exit codes: see
`modelfleet_runtime.build` (0 built or cache hit, 2 options, 3 fetch, 4 digest, 5 model, 6 unsupported,
7 build, 8 accuracy gate, 9 publish, 1 internal error).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet_runtime.build import (
    AccuracyGateFailed,
    BuildError,
    InvalidOptions,
    PublishFailed,
    Unsupported,
)
from modelfleet_runtime.build.key import engine_key, normalize_architecture
from modelfleet_runtime.build.options import (
    BuildOptions,
    ResolvedBackend,
    add_option_arguments,
    options_from_namespace,
)
from modelfleet_runtime.selfcheck import ConflictingDistributions, check_onnxruntime

if TYPE_CHECKING:
    from modelfleet_runtime.build.accuracy import Feeds
    from modelfleet_runtime.build.labeled import LabeledSet
    from modelfleet_runtime.build.precision import Prepared
    from modelfleet_runtime.build.validate import ModelSpec, TensorSpec

log = logging.getLogger("modelfleet.build")

DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
STEPS = ("resolve", "fetch", "cache", "validate", "prepare", "build", "accuracy", "publish")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfleet build",
        description="Build an engine for one architecture into the content-addressed engine store.",
    )
    parser.add_argument(
        "--model", required=True, metavar="URI", help="path, file:///path or https://... (+ --model-sha256)"
    )
    parser.add_argument("--model-sha256", metavar="HEX", help="expected sha256 of the model (required for https)")
    parser.add_argument("--store", required=True, type=Path, metavar="DIR", help="engine store root")
    parser.add_argument(
        "--architecture",
        metavar="smXY|cpu",
        help="target architecture; detected from the GPU when there is one, else this, else cpu",
    )
    parser.add_argument(
        "--termination-log",
        type=Path,
        metavar="PATH",
        help=f"where to write the one-line JSON result (default {DEFAULT_TERMINATION_LOG} when it exists)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_option_arguments(parser)
    return parser


# ---------------------------------------------------------------- environment


def detect_gpu_architecture() -> str | None:
    """The GPU's compute capability as smXY, from nvidia-smi or else cuda-python; None without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            done = subprocess.run(
                [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            caps = {line.strip() for line in done.stdout.splitlines() if line.strip()}
            if len(caps) > 1:
                raise Unsupported(f"the build machine has GPUs of several architectures {sorted(caps)}; expose one")
            if caps:
                return normalize_architecture(caps.pop())
    return _cuda_python_architecture()


def _cuda_python_architecture() -> str | None:
    from modelfleet_runtime.cuda import device_architecture

    return device_architecture()


def resolve_architecture(flag: str | None, detected: str | None) -> str:
    """Detected GPU wins; a flag that contradicts it is refused (a wrongly keyed engine would never load).
    `cpu` may always be asked for: CPU artifacts build anywhere."""
    wanted = None
    if flag is not None:
        try:
            wanted = normalize_architecture(flag)
        except ValueError as exc:
            raise InvalidOptions(f"--architecture: {exc}") from exc
    if wanted == "cpu":
        return "cpu"
    if detected is not None:
        if wanted is not None and wanted != detected:
            raise Unsupported(f"--architecture {wanted}, but this machine's GPU is {detected}")
        return detected
    return wanted or "cpu"


def resolve_backend(options: BuildOptions, *, architecture: str, gpu_present: bool) -> ResolvedBackend:
    """`auto`: TensorRT when it is importable and a GPU is present, else ONNX Runtime."""
    trt_importable = importlib.util.find_spec("tensorrt") is not None
    if options.backend == "auto":
        return "tensorrt" if trt_importable and gpu_present and architecture != "cpu" else "onnxruntime"
    if options.backend == "tensorrt":
        if not gpu_present or architecture == "cpu":
            raise Unsupported("the tensorrt backend needs a GPU on the build machine and a smXY architecture")
        if not trt_importable:
            raise Unsupported("the tensorrt backend needs the tensorrt package (the `gpu` extra)")
    return options.backend


def backend_version(backend: ResolvedBackend) -> str:
    if backend == "tensorrt":
        from modelfleet_runtime.build import trt

        return trt.backend_version()
    from modelfleet_runtime.build import ort

    return ort.backend_version()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("modelfleet", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---------------------------------------------------------------- progress and result


class Progress:
    """One stderr line per step: number, name, duration, and a short note (or the failure)."""

    def __init__(self) -> None:
        self.index = 0

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        self.index += 1
        notes: list[str] = []
        begun = time.monotonic()
        try:
            yield notes
        except BaseException as exc:
            reason = exc.reason if isinstance(exc, BuildError) else type(exc).__name__
            log.info(
                "[%d/%d] %-8s failed after %.2fs (%s)",
                self.index,
                len(STEPS),
                name,
                time.monotonic() - begun,
                reason,
            )
            raise
        log.info("[%d/%d] %-8s %.2fs  %s", self.index, len(STEPS), name, time.monotonic() - begun, "; ".join(notes))


@dataclass
class Result:
    """The one-line JSON the operator reads from the termination message."""

    phase: str = "Failed"
    key: str | None = None
    cache_hit: bool = False
    architecture: str | None = None
    backend: str | None = None
    backend_version: str | None = None
    precision: str | None = None
    effective_precision: str | None = None
    artifact: str | None = None
    accuracy: dict[str, Any] | None = None
    build_seconds: float | None = None
    reason: str | None = None
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Compact JSON under Kubernetes' 4096-byte limit: the message and then the per-output figures
        are cut first."""
        data = {
            "phase": self.phase,
            "key": self.key,
            "cacheHit": self.cache_hit,
            "architecture": self.architecture,
            "backend": self.backend,
            "backendVersion": self.backend_version,
            "precision": self.precision,
            "effectivePrecision": self.effective_precision,
            "artifact": self.artifact,
            "accuracy": self.accuracy,
            "buildSeconds": None if self.build_seconds is None else round(self.build_seconds, 3),
            "reason": self.reason,
            "message": self.message,
            **self.extra,
        }
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        if len(text.encode()) > TERMINATION_LIMIT and isinstance(data["accuracy"], dict):
            data["accuracy"] = {k: v for k, v in data["accuracy"].items() if k != "outputs"}
            text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        while len(text.encode()) > TERMINATION_LIMIT and data["message"]:
            message = str(data["message"])
            data["message"] = message[: max(0, len(message) - (len(text.encode()) - TERMINATION_LIMIT) - 8)] + "..."
            if len(message) <= 3:
                data["message"] = None
            text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return text


def write_result(result: Result, termination_log: Path | None) -> None:
    line = result.to_json()
    print(line, flush=True)
    path = termination_log
    if path is None and DEFAULT_TERMINATION_LOG.exists():
        path = DEFAULT_TERMINATION_LOG
    if path is not None:
        try:
            path.write_text(line)
        except OSError as exc:
            log.warning("cannot write the termination message to %s: %s", path, exc)


# ---------------------------------------------------------------- the build


@dataclass(frozen=True)
class Request:
    model_uri: str
    model_sha256: str | None
    store: Path
    architecture_flag: str | None
    options: BuildOptions


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(verbose=args.verbose)
    result = Result()
    try:
        request = Request(
            model_uri=args.model,
            model_sha256=args.model_sha256,
            store=args.store,
            architecture_flag=args.architecture,
            options=options_from_namespace(args),
        )
        run(request, result)
        code = 0
    except BuildError as exc:
        result.phase, result.reason, result.message = "Failed", exc.reason, str(exc)
        log.error("build failed (%s): %s", exc.reason, exc)
        code = exc.exit_code
    except Exception as exc:
        result.phase, result.reason, result.message = (
            "Failed",
            "InternalError",
            f"{type(exc).__name__}: {exc}",
        )
        log.exception("build failed with an unexpected error")
        code = 1
    write_result(result, args.termination_log)
    return code


def _configure_logging(*, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,  # libraries' INFO chatter stays out
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("modelfleet").setLevel(logging.DEBUG if verbose else logging.INFO)


def run(request: Request, result: Result) -> None:
    """The steps; fills `result` as it learns things, so a failure still reports what was known."""
    from modelfleet_runtime.build import store as store_mod
    from modelfleet_runtime.build.fetch import fetch

    progress = Progress()
    options = request.options
    result.precision = options.precision
    store = request.store

    with progress.step("resolve") as notes:
        try:
            check_onnxruntime()
        except ConflictingDistributions as exc:
            raise Unsupported(f"this image cannot build: {exc}") from None
        detected = detect_gpu_architecture()
        architecture = resolve_architecture(request.architecture_flag, detected)
        backend = resolve_backend(options, architecture=architecture, gpu_present=detected is not None)
        options = options.with_backend(backend)
        version = backend_version(backend)
        result.architecture, result.backend, result.backend_version = architecture, backend, version
        notes.append(f"architecture {architecture} ({'detected' if detected else 'no GPU'}), {backend} {version}")

    try:
        store.mkdir(parents=True, exist_ok=True)
        workspace = tempfile.TemporaryDirectory(prefix=".work-", dir=store)
    except OSError as exc:
        raise PublishFailed(f"the engine store {store} is not writable: {exc}") from exc
    with workspace as work:
        workdir = Path(work)
        with progress.step("fetch") as notes:
            model = fetch(request.model_uri, expected_sha256=request.model_sha256, workdir=workdir)
            notes.append(f"model {model.size} bytes sha256 {model.sha256[:12]}")
            calibration_path = None
            if options.calibration is not None:
                calibration = fetch(
                    options.calibration.path,
                    expected_sha256=options.calibration.sha256,
                    workdir=workdir,
                    what="calibration",
                    sha_flag="--calibration-sha256",
                )
                options = options.with_calibration_digest(calibration.sha256)
                calibration_path = calibration.path
                notes.append(f"calibration sha256 {calibration.sha256[:12]}")
            options, evaluation_path = _fetch_evaluation(options, workdir=workdir, notes=notes)
            key = engine_key(
                model_digest=model.sha256, options=options, architecture=architecture, backend_version=version
            )
            result.key = key
            notes.append(f"key {key}")

        with progress.step("cache") as notes:
            entry = store_mod.read_entry(store, key)
            if entry.manifest is not None:
                notes.append(f"cache hit: {store_mod.key_dir(store, key)}")
                _fill_from_manifest(result, entry.manifest)
                return
            if entry.problem is not None:
                log.warning("replacing a broken store entry: %s", entry.problem)
                notes.append("broken entry, rebuilding")
            else:
                notes.append("miss")

        _build_and_publish(
            request=request,
            options=options,
            result=result,
            progress=progress,
            architecture=architecture,
            model_path=model.path,
            model_digest=model.sha256,
            calibration_path=calibration_path,
            evaluation_path=evaluation_path,
            workdir=workdir,
            key=key,
        )


def _build_and_publish(
    *,
    request: Request,
    options: BuildOptions,
    result: Result,
    progress: Progress,
    architecture: str,
    model_path: Path,
    model_digest: str,
    calibration_path: Path | None,
    workdir: Path,
    key: str,
    evaluation_path: Path | None = None,
) -> None:
    from modelfleet_runtime.build import accuracy, ort
    from modelfleet_runtime.build import store as store_mod
    from modelfleet_runtime.build.fetch import file_sha256
    from modelfleet_runtime.build.labeled import check as labeled_check
    from modelfleet_runtime.build.validate import validate_model

    store = request.store
    with progress.step("validate") as notes:
        spec = validate_model(model_path, options=options)
        calibration = None if calibration_path is None else accuracy.load_calibration(calibration_path, spec)
        evaluation = None if evaluation_path is None else _load_evaluation(evaluation_path, spec, options)
        notes.append(
            f"opset {spec.opset}; inputs "
            + ", ".join(f"{t.name} {t.datatype}{list(t.shape or [])}" for t in spec.inputs)
            + ("; Q/DQ model" if spec.has_qdq else "")
        )

    with progress.step("prepare") as notes:
        prepared = _prepare(
            options, spec=spec, architecture=architecture, model_path=model_path, model_digest=model_digest,
            store=store, workdir=workdir, calibration=calibration, evaluation=evaluation,
        )  # fmt: skip
        result.extra.update(prepared.as_details())
        notes.append(_prepared_note(prepared))

    staging = store_mod.make_staging(store, key)
    try:
        with progress.step("build") as notes:
            built_started = time.monotonic()
            if options.backend == "tensorrt":
                from modelfleet_runtime.build import trt

                built = trt.build_tensorrt(
                    spec=spec,
                    options=options,
                    architecture=architecture,
                    out_dir=staging,
                    store=store,
                    prepared=prepared,
                )
                candidate = trt.engine_runner(built.artifact)
            else:
                built = ort.build_onnxruntime(
                    model_path=model_path,
                    prepared=prepared.path,
                    spec=spec,
                    options=options,
                    architecture=architecture,
                    out_dir=staging,
                    workdir=workdir,
                    calibration=calibration,
                )
                candidate = ort.candidate_runner(built.artifact)
            build_seconds = time.monotonic() - built_started
            result.effective_precision = built.effective_precision
            notes.append(f"{built.artifact.name} {built.effective_precision} {_short(built.details)}")

        with progress.step("accuracy") as notes:
            gate = options.accuracy.resolved(options.precision)
            reference = accuracy.onnxruntime_runner(model_path, optimize=False)
            batches = accuracy.gate_batches(spec, options=options, calibration=calibration)
            outcome = accuracy.run_gate(
                reference=reference,
                candidate=candidate,
                batches=batches,
                gate=gate,
                classifiers=frozenset(t.name for t in spec.outputs if t.classifier_shaped),
            )
            labeled = None if evaluation is None else labeled_check(evaluation, reference, candidate, options)
            result.accuracy = outcome.report.as_dict(camel=True)
            notes.append(outcome.message)
            if labeled is not None:
                result.accuracy["evaluation"] = labeled.as_dict(camel=True)
                notes.append(labeled.message)
            failures = [outcome.message] if not outcome.passed else []
            failures += [labeled.message] if labeled is not None and not labeled.passed else []
            if failures:
                raise AccuracyGateFailed("; ".join(failures) + "; nothing was published")

        with progress.step("publish") as notes:
            digest, size = file_sha256(built.artifact)
            manifest = store_mod.build_manifest(
                key=key,
                artifact=built.artifact.name,
                artifact_sha256=digest,
                artifact_bytes=size,
                backend=options.backend,
                backend_version=result.backend_version or "",
                architecture=architecture,
                precision_requested=options.precision,
                precision_effective=built.effective_precision,
                options=options.model_dump(mode="json"),
                model_digest=model_digest,
                model_uri=request.model_uri,
                inputs=[t.manifest_entry() for t in spec.inputs],
                outputs=[t.manifest_entry() for t in spec.outputs],
                build_seconds=build_seconds,
                accuracy={
                    "gate": gate.model_dump(),
                    **outcome.report.as_dict(camel=False),
                    **({} if labeled is None else {"evaluation": labeled.as_dict(camel=False)}),
                },
                details={**built.details, **prepared.as_details()},
                versions=package_versions(),
                created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            )
            store_mod.write_manifest(staging, manifest)
            published = store_mod.publish(store=store, key=key, staging=staging)
            notes.append(
                f"{store_mod.key_dir(store, key)}"
                + ("" if published.won else " (another builder published it first; kept theirs)")
            )
            _fill_from_manifest(result, published.manifest)
            result.cache_hit = False
    finally:
        store_mod.discard(staging)  # gone already when published


def _fill_from_manifest(result: Result, manifest: dict[str, Any]) -> None:
    result.phase = "Ready"
    result.cache_hit = True
    result.artifact = manifest.get("artifact")
    precision = manifest.get("precision") or {}
    result.effective_precision = precision.get("effective")
    result.build_seconds = manifest.get("build_seconds")
    details = manifest.get("details") or {}
    result.extra.update({k: details[k] for k in ("cpuInt8Kernel", "int8Portable", "prepared") if k in details})
    figures = manifest.get("accuracy") or {}
    result.accuracy = {
        "samples": figures.get("samples"),
        "maxAbsError": figures.get("max_abs_error"),
        "maxRelError": figures.get("max_rel_error"),
        "top1Agreement": figures.get("top1_agreement"),
    }
    if isinstance(figures.get("evaluation"), dict):
        result.accuracy["evaluation"] = _evaluation_from_manifest(figures["evaluation"])


def _evaluation_from_manifest(figures: dict[str, Any]) -> dict[str, Any]:
    """The labeled gate's manifest figures (snake_case) as the result JSON's (camelCase)."""
    names = ("samples", "reference_accuracy", "accuracy", "accuracy_drop", "max_accuracy_drop", "output")
    return {_camel(name): figures.get(name) for name in names}


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def _fetch_evaluation(options: BuildOptions, *, workdir: Path, notes: list[str]) -> tuple[BuildOptions, Path | None]:
    """Fetch the labeled gate's .npz like the calibration data; its digest enters the options (and the key)."""
    from modelfleet_runtime.build.fetch import fetch

    wanted = options.accuracy.evaluation
    if wanted is None:
        return options, None
    fetched = fetch(
        wanted.path, expected_sha256=wanted.sha256, workdir=workdir, what="evaluation", sha_flag="--evaluation-sha256"
    )
    notes.append(f"evaluation sha256 {fetched.sha256[:12]}")
    return options.with_evaluation_digest(fetched.sha256), fetched.path


def _load_evaluation(path: Path, spec: ModelSpec, options: BuildOptions) -> tuple[LabeledSet, TensorSpec]:
    """The labeled set and the output it scores; InvalidOptions before any build time is spent."""
    from modelfleet_runtime.build import labeled

    output = labeled.classifier_output(spec, options.accuracy.evaluation_output)
    return labeled.load_evaluation(path, spec, classes=labeled.class_count(output)), output


def prepares(options: BuildOptions, *, architecture: str) -> bool:
    """Whether this build compiles build/precision.py's model: TensorRT at every precision but fp32; ONNX
    Runtime for fp16 on a GPU target and for int8 with the `qdq` method."""
    if options.precision == "fp32":
        return False
    if options.backend == "tensorrt":
        return True
    if options.precision == "fp16":
        return architecture != "cpu"
    return options.precision == "int8" and options.onnxruntime.quantization == "qdq"


def _prepare(
    options: BuildOptions,
    *,
    spec: ModelSpec,
    architecture: str,
    model_path: Path,
    model_digest: str,
    store: Path,
    workdir: Path,
    calibration: Feeds | None,
    evaluation: tuple[LabeledSet, TensorSpec] | None,
) -> Prepared:
    from modelfleet_runtime.build import precision

    if not prepares(options, architecture=architecture):
        return precision.Prepared(path=model_path)
    if options.backend == "tensorrt":
        from modelfleet_runtime.build import trt

        trt.check_precision(spec=spec, options=options, architecture=architecture)  # before any work
    return precision.prepare(
        model_path=model_path, model_digest=model_digest, spec=spec, options=options, store=store,
        workdir=workdir, calibration=calibration, evaluation=evaluation,
    )  # fmt: skip


def _prepared_note(prepared: Prepared) -> str:
    if prepared.key is None:
        return "the model as it is"
    state = "cache hit" if prepared.cache_hit else "made and gated on the CPU"
    return f"{(prepared.details or {}).get('scheme')} {state}: prepared/{prepared.key[:16]}"


def _short(details: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, dict))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
