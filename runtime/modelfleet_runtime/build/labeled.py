"""The labeled accuracy gate: top-1 accuracy of the built artifact and of the FP32 reference on labeled data.

The drift gate (accuracy.py) says how far the artifact strays from the reference; this one says what that
costs a user: the fraction of an evaluation set's samples each classifies correctly, and the drop between
the two (reference - artifact, absolute: 0.005 is half a point). The evaluation .npz holds one array per
model input (rows = samples) and `labels`, one integer class id per sample. The scored output is the model's
classifier-shaped one ([batch, classes]), or the one `--evaluation-output` names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelfleet_runtime.build import BuildFailed, InvalidOptions
from modelfleet_runtime.build.accuracy import Array, Feeds, Runner, input_feeds, read_npz
from modelfleet_runtime.build.options import BatchProfile, BuildOptions
from modelfleet_runtime.build.validate import ModelSpec, TensorSpec

LABELS = "labels"
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class LabeledSet:
    """Model inputs and the class id of each row."""

    feeds: Feeds
    labels: Labels

    @property
    def samples(self) -> int:
        return int(self.labels.shape[0])


def classifier_output(spec: ModelSpec, wanted: str | None = None) -> TensorSpec:
    """The output the gate scores: `wanted`, or else the model's only classifier-shaped output."""
    described = ", ".join(f"{t.name!r} {list(t.shape or [])}" for t in spec.outputs)
    if wanted is not None:
        chosen = next((t for t in spec.outputs if t.name == wanted), None)
        if chosen is None:
            raise InvalidOptions(f"--evaluation-output {wanted!r}: the model has no such output (outputs: {described})")
        if not chosen.classifier_shaped:
            raise InvalidOptions(
                f"--evaluation-output {wanted!r} is {list(chosen.shape or [])}, not [batch, classes] with a fixed"
                " class count >= 2"
            )
        return chosen
    qualified = [t for t in spec.outputs if t.classifier_shaped]
    if len(qualified) == 1:
        return qualified[0]
    if not qualified:
        raise InvalidOptions(
            "the labeled gate scores a classifier output ([batch, classes], a fixed class count >= 2); "
            f"none of the model's outputs qualifies: {described}"
        )
    names = [t.name for t in qualified]
    raise InvalidOptions(f"several outputs are classifier-shaped {names}; name one with --evaluation-output")


def class_count(output: TensorSpec) -> int:
    dims = output.shape or ()
    if not output.classifier_shaped or not isinstance(dims[1], int):
        raise InvalidOptions(f"output {output.name!r} is not classifier-shaped")
    return dims[1]


def load_evaluation(path: Path, spec: ModelSpec, *, classes: int) -> LabeledSet:
    """Read the evaluation .npz; InvalidOptions names the array that is missing, unexpected or wrong."""
    source = f"evaluation {path.name}"
    names = [t.name for t in spec.inputs]
    if LABELS in names:
        raise InvalidOptions(f"{source}: the model has an input named {LABELS!r}, the name the class ids need")
    arrays = read_npz(path, source=source)
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names and n != LABELS]
    if missing or extra:
        raise InvalidOptions(
            f"{source}: arrays must be named after the model inputs {names} plus {LABELS!r}; "
            f"missing {missing}, unexpected {extra}"
        )
    feeds = input_feeds(arrays, spec, source=source)
    rows = int(next(iter(feeds.values())).shape[0])
    return LabeledSet(feeds=feeds, labels=_labels(arrays.get(LABELS), rows=rows, classes=classes, source=source))


def _labels(array: Array | None, *, rows: int, classes: int, source: str) -> Labels:
    if array is None:
        raise InvalidOptions(f"{source}: no {LABELS!r} array (integer class ids, one per sample)")
    if array.dtype.kind not in "iu":
        raise InvalidOptions(f"{source}: {LABELS!r} is {array.dtype}; class ids must be integers")
    if array.ndim != 1 or array.shape[0] != rows:
        raise InvalidOptions(
            f"{source}: {LABELS!r} has shape {list(array.shape)}, expected [{rows}] (one class id per input row)"
        )
    if rows == 0:
        raise InvalidOptions(f"{source}: no samples")
    outside = array[(array < 0) | (array >= classes)]
    if outside.size:
        raise InvalidOptions(
            f"{source}: {LABELS!r} holds {outside.size} class ids outside 0..{classes - 1} "
            f"(the output has {classes} classes), e.g. {int(outside[0])}"
        )
    return array.astype(np.int64)


def predictions(runner: Runner, data: LabeledSet, *, output: TensorSpec, batch: BatchProfile) -> Labels:
    """The argmax class of every sample, run in batches of the profile's opt. A last batch below the
    profile's min is padded with copies of its last row (TensorRT refuses smaller ones); only real rows count."""
    classes = class_count(output)
    parts = []
    for start in range(0, data.samples, batch.opt):
        stop = min(start + batch.opt, data.samples)
        rows = stop - start
        feeds = {name: array[start:stop] for name, array in data.feeds.items()}
        if rows < batch.min:
            feeds = {
                name: np.concatenate([a, np.repeat(a[-1:], batch.min - rows, axis=0)]) for name, a in feeds.items()
            }
        outputs = runner(feeds)
        if output.name not in outputs:
            raise BuildFailed(f"the labeled gate's output {output.name!r} is missing (outputs: {sorted(outputs)})")
        scores = np.asarray(outputs[output.name])[:rows]
        if scores.shape != (rows, classes):
            raise BuildFailed(f"output {output.name!r} gives shape {list(scores.shape)}, expected [{rows}, {classes}]")
        parts.append(np.argmax(np.nan_to_num(scores.astype(np.float64), nan=-np.inf), axis=1))
    return np.concatenate(parts).astype(np.int64)


@dataclass(frozen=True)
class EvaluationReport:
    """Top-1 accuracy of reference and artifact on the same labeled samples, and the limit on the drop."""

    samples: int
    output: str
    reference_correct: int
    correct: int
    max_accuracy_drop: float

    @property
    def reference_accuracy(self) -> float:
        return self.reference_correct / self.samples

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples

    @property
    def accuracy_drop(self) -> float:
        """reference - artifact, from the counts (one division: a drop of exactly the limit passes)."""
        return (self.reference_correct - self.correct) / self.samples

    @property
    def passed(self) -> bool:
        return self.accuracy_drop <= self.max_accuracy_drop

    @property
    def message(self) -> str:
        relation = "<=" if self.passed else ">"
        return (
            f"top-1 accuracy {self.accuracy:.4f} on {self.samples} labeled samples, {self.reference_accuracy:.4f} "
            f"for the fp32 reference: a drop of {self.accuracy_drop * 100:.2f} points {relation} "
            f"{self.max_accuracy_drop * 100:.2f}"
        )

    def as_dict(self, *, camel: bool) -> dict[str, Any]:
        """camelCase for the termination message (status copies it), snake_case for the manifest."""
        return {
            "samples": self.samples,
            ("referenceAccuracy" if camel else "reference_accuracy"): self.reference_accuracy,
            "accuracy": self.accuracy,
            ("accuracyDrop" if camel else "accuracy_drop"): self.accuracy_drop,
            ("maxAccuracyDrop" if camel else "max_accuracy_drop"): self.max_accuracy_drop,
            "output": self.output,
        }


def run_evaluation(
    *,
    reference: Runner,
    candidate: Runner,
    data: LabeledSet,
    output: TensorSpec,
    batch: BatchProfile,
    max_accuracy_drop: float,
) -> EvaluationReport:
    """Score both runners on every labeled sample."""
    ref = predictions(reference, data, output=output, batch=batch)
    cand = predictions(candidate, data, output=output, batch=batch)
    return EvaluationReport(
        samples=data.samples,
        output=output.name,
        reference_correct=int((ref == data.labels).sum()),
        correct=int((cand == data.labels).sum()),
        max_accuracy_drop=max_accuracy_drop,
    )


def check(
    evaluation: tuple[LabeledSet, TensorSpec], reference: Runner, candidate: Runner, options: BuildOptions
) -> EvaluationReport:
    """The labeled gate of a build: score both on the set, with the options' batch profile and drop limit."""
    data, output = evaluation
    return run_evaluation(
        reference=reference,
        candidate=candidate,
        data=data,
        output=output,
        batch=options.batch,
        max_accuracy_drop=options.accuracy.max_accuracy_drop,
    )
