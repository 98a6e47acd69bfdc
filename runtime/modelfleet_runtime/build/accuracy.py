"""The accuracy gate: the built artifact against the FP32 reference on the same samples, before publishing.

Figures, per output and then the worst over outputs:
- max absolute error: max |candidate - reference|;
- max relative error: max |candidate - reference| / max |reference|, i.e. relative to the output's scale.
  An element-wise ratio would explode on near-zero reference values (logits, embeddings), failing good
  builds for no reason;
- top-1 agreement, for classifier-shaped outputs (2-D [batch, classes], a fixed class count >= 2): the
  fraction of rows whose argmax is the same.
A candidate that produces NaN or Inf where the reference is finite has an infinite error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfleet_runtime.build import BuildFailed, InvalidOptions
from modelfleet_runtime.build.options import BuildOptions, ResolvedGate
from modelfleet_runtime.build.validate import ModelSpec, TensorSpec, concrete_shape

Array = npt.NDArray[Any]
Feeds = dict[str, Array]
Runner = Callable[[Feeds], dict[str, Array]]

SYNTHETIC_SEED = 0
# Integer inputs are usually token or category ids: small ids are valid for any vocabulary.
SYNTHETIC_ID_RANGE = 100


# ---------------------------------------------------------------- samples


def load_calibration(path: Path, spec: ModelSpec) -> Feeds:
    """Read an .npz holding one array per model input, all with the same number of rows."""
    source = f"calibration {path.name}"
    arrays = read_npz(path, source=source)
    names = [t.name for t in spec.inputs]
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        raise InvalidOptions(
            f"{source}: arrays must be named after the model inputs {names}; missing {missing}, unexpected {extra}"
        )
    return input_feeds(arrays, spec, source=source)


def read_npz(path: Path, *, source: str) -> dict[str, Array]:
    """Every array of an .npz (no pickles); InvalidOptions when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except Exception as exc:  # zipfile / format errors
        raise InvalidOptions(f"{source}: not a readable .npz ({type(exc).__name__}: {exc})") from exc


def input_feeds(arrays: dict[str, Array], spec: ModelSpec, *, source: str) -> Feeds:
    """The model inputs' arrays, conformed to their specs and checked to have the same number of rows."""
    feeds: Feeds = {}
    rows = None
    for tensor in spec.inputs:
        array = arrays[tensor.name]
        feeds[tensor.name] = _conform(array, tensor, source=source)
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise InvalidOptions(f"{source}: {tensor.name!r} has {array.shape[0]} rows, others {rows}")
    return feeds


def _conform(array: Array, tensor: TensorSpec, *, source: str) -> Array:
    dims = tensor.shape or ()
    if array.ndim != len(dims):
        raise InvalidOptions(f"{source}: {tensor.name!r} has rank {array.ndim}, the input has rank {len(dims)}")
    for axis, dim in enumerate(dims):
        if axis > 0 and isinstance(dim, int) and dim > 0 and array.shape[axis] != dim:
            raise InvalidOptions(f"{source}: {tensor.name!r} axis {axis} is {array.shape[axis]}, the model fixes {dim}")
    target = np.dtype(tensor.dtype)
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        raise InvalidOptions(f"{source}: {tensor.name!r} is {array.dtype}, the input needs {target}")
    return np.ascontiguousarray(array.astype(target, copy=False))


def synthetic_feeds(spec: ModelSpec, *, options: BuildOptions, rows: int, seed: int = SYNTHETIC_SEED) -> Feeds:
    """Seeded inputs shaped by the specs: normal floats; for integers, masks of ones, zero type ids, and
    ids drawn from the embedding table they index (or SYNTHETIC_ID_RANGE when unknown)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for tensor in spec.inputs:
        shape = concrete_shape(tensor, batch=rows, options=options)
        dtype = np.dtype(tensor.dtype)
        lowered = tensor.name.lower()
        if dtype.kind == "f":
            feeds[tensor.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[tensor.name] = rng.integers(0, 2, shape).astype(dtype)
        elif "mask" in lowered:
            feeds[tensor.name] = np.ones(shape, dtype)
        elif "type" in lowered or "segment" in lowered:
            feeds[tensor.name] = np.zeros(shape, dtype)
        elif "position" in lowered and len(shape) >= 2:
            feeds[tensor.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            high = tensor.id_range or SYNTHETIC_ID_RANGE
            feeds[tensor.name] = rng.integers(0, high, shape).astype(dtype)
    return feeds


def split_batches(feeds: Feeds, *, batch_size: int, min_batch: int) -> list[Feeds]:
    """Cut row-aligned feeds into batches of `batch_size`; a last batch below `min_batch` is dropped."""
    rows = next(iter(feeds.values())).shape[0]
    batches = []
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        if stop - start >= min_batch:
            batches.append({name: array[start:stop] for name, array in feeds.items()})
    return batches


def gate_batches(spec: ModelSpec, *, options: BuildOptions, calibration: Feeds | None) -> list[Feeds]:
    """The samples the gate compares: the calibration data when given, else synthetic; in batches of opt."""
    batch = options.batch
    wanted = options.accuracy.resolved(options.precision).samples
    if calibration is not None:
        rows = next(iter(calibration.values())).shape[0]
        feeds = {name: array[:wanted] for name, array in calibration.items()}
        batches = split_batches(feeds, batch_size=batch.opt, min_batch=batch.min)
        if not batches:
            raise InvalidOptions(f"calibration data has {rows} rows, fewer than the batch profile's min {batch.min}")
        return batches
    rows = math.ceil(wanted / batch.opt) * batch.opt
    return split_batches(synthetic_feeds(spec, options=options, rows=rows), batch_size=batch.opt, min_batch=1)


# ---------------------------------------------------------------- runners


def onnxruntime_runner(path: Path, *, optimize: bool) -> Runner:
    """Run an .onnx file with ONNX Runtime on CPU; `optimize=False` is the reference (no graph rewrites)."""
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session_options.log_severity_level = 3
    session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> dict[str, Array]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    return run


# ---------------------------------------------------------------- comparison


@dataclass(frozen=True)
class OutputFigures:
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None


@dataclass(frozen=True)
class AccuracyReport:
    """Figures over all compared samples; the top-level ones are the worst over outputs."""

    samples: int
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    outputs: dict[str, OutputFigures] = field(default_factory=dict)

    def as_dict(self, *, camel: bool) -> dict[str, Any]:
        """JSON-safe figures (non-finite ones become null and `nonFinite` is set); camelCase for the
        termination message (the operator copies it into status), snake_case for the manifest."""

        def name(snake: str) -> str:
            head, *rest = snake.split("_")
            return head + "".join(part.title() for part in rest) if camel else snake

        def figures(abs_error: float, rel_error: float, top1: float | None) -> dict[str, float | None]:
            return {
                name("max_abs_error"): json_float(abs_error),
                name("max_rel_error"): json_float(rel_error),
                name("top1_agreement"): json_float(top1),
            }

        data: dict[str, Any] = {"samples": self.samples}
        data.update(figures(self.max_abs_error, self.max_rel_error, self.top1_agreement))
        if not (math.isfinite(self.max_abs_error) and math.isfinite(self.max_rel_error)):
            data[name("non_finite")] = True
        data["outputs"] = {
            output: figures(f.max_abs_error, f.max_rel_error, f.top1_agreement) for output, f in self.outputs.items()
        }
        return data


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: tuple[str, ...]
    report: AccuracyReport
    gate: ResolvedGate

    @property
    def message(self) -> str:
        if self.passed:
            return f"accuracy gate passed on {self.report.samples} samples"
        return f"accuracy gate failed on {self.report.samples} samples: " + "; ".join(self.failures)


def json_float(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def compare_outputs(
    references: Sequence[dict[str, Array]],
    candidates: Sequence[dict[str, Array]],
    *,
    classifiers: frozenset[str],
) -> AccuracyReport:
    """Figures over batches of reference and candidate outputs (same order, same output names);
    top-1 agreement for the outputs named in `classifiers`."""
    if not references:
        raise ValueError("no batches to compare")
    names = list(references[0])
    figures: dict[str, OutputFigures] = {}
    for name in names:
        ref_parts, cand_parts = [], []
        for ref, cand in zip(references, candidates, strict=True):
            if name not in cand:
                raise BuildFailed(f"the built artifact has no output {name!r} (outputs: {sorted(cand)})")
            if cand[name].shape != ref[name].shape:
                raise BuildFailed(
                    f"output {name!r}: the built artifact gives shape {cand[name].shape}, "
                    f"the reference {ref[name].shape}"
                )
            ref_parts.append(ref[name])
            cand_parts.append(cand[name])
        figures[name] = _figures(np.concatenate(ref_parts), np.concatenate(cand_parts), classifier=name in classifiers)
    top1 = [f.top1_agreement for f in figures.values() if f.top1_agreement is not None]
    return AccuracyReport(
        samples=sum(next(iter(r.values())).shape[0] for r in references),
        max_abs_error=max(f.max_abs_error for f in figures.values()),
        max_rel_error=max(f.max_rel_error for f in figures.values()),
        top1_agreement=min(top1) if top1 else None,
        outputs=figures,
    )


def _figures(reference: Array, candidate: Array, *, classifier: bool) -> OutputFigures:
    top1 = _top1(reference, candidate) if classifier else None
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    finite = np.isfinite(ref)
    if (finite & ~np.isfinite(cand)).any():
        return OutputFigures(math.inf, math.inf, top1)
    if not finite.any():
        return OutputFigures(0.0, 0.0, None)
    diff = np.abs(cand[finite] - ref[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return OutputFigures(max_abs, max_rel, top1)


def _top1(reference: Array, candidate: Array) -> float | None:
    if reference.ndim != 2 or reference.shape[1] < 2 or reference.dtype.kind != "f" or reference.shape[0] == 0:
        return None
    agree = np.argmax(reference, axis=1) == np.argmax(np.nan_to_num(candidate, nan=-np.inf), axis=1)
    return float(agree.mean())


def check_gate(report: AccuracyReport, gate: ResolvedGate) -> GateResult:
    """Compare figures with thresholds; each failure names the figure, the worst output and the limit."""
    failures: list[str] = []

    def worst(attr: str, *, largest: bool) -> str:
        values = {n: getattr(f, attr) for n, f in report.outputs.items() if getattr(f, attr) is not None}
        pick = max if largest else min
        return pick(values, key=lambda n: values[n]) if values else "?"

    if gate.max_abs_error is not None and not report.max_abs_error <= gate.max_abs_error:
        failures.append(
            f"max absolute error {report.max_abs_error:.6g} > {gate.max_abs_error:.6g} "
            f"(output {worst('max_abs_error', largest=True)!r})"
        )
    if gate.max_rel_error is not None and not report.max_rel_error <= gate.max_rel_error:
        failures.append(
            f"max relative error {report.max_rel_error:.6g} > {gate.max_rel_error:.6g} "
            f"(output {worst('max_rel_error', largest=True)!r})"
        )
    if (
        gate.min_top1_agreement is not None
        and report.top1_agreement is not None
        and not report.top1_agreement >= gate.min_top1_agreement
    ):
        failures.append(
            f"top-1 agreement {report.top1_agreement:.4f} < {gate.min_top1_agreement:.4f} "
            f"(output {worst('top1_agreement', largest=False)!r})"
        )
    return GateResult(passed=not failures, failures=tuple(failures), report=report, gate=gate)


def run_gate(
    *,
    reference: Runner,
    candidate: Runner,
    batches: Sequence[Feeds],
    gate: ResolvedGate,
    classifiers: frozenset[str] = frozenset(),
) -> GateResult:
    """Run both on every batch and check the thresholds."""
    references = [reference(feeds) for feeds in batches]
    candidates = [candidate(feeds) for feeds in batches]
    return check_gate(compare_outputs(references, candidates, classifiers=classifiers), gate)
