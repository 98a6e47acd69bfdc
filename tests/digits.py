"""Real labeled data for the labeled accuracy gate: scikit-learn's bundled digits, an MLP trained on them, as ONNX."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.modelzoo import OPSET, _save

INPUT = "pixels"
OUTPUT = "logits"
PIXELS = 64  # 8 x 8 images
CLASSES = 10
HIDDEN = 32
SEED = 0


@dataclass(frozen=True)
class Digits:
    """The trained weights and the held-out split (never seen in training)."""

    weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    test_x: np.ndarray
    test_y: np.ndarray
    sklearn_accuracy: float


def train_digits() -> Digits:
    """An MLP (64 -> 32 relu -> 10) trained with scikit-learn on 70 % of the digits; 540 samples held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values 0..16 -> 0..1
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", max_iter=400, random_state=SEED)
    with warnings.catch_warnings():  # "not converged": it classifies 97-98 % of the held-out digits right
        warnings.simplefilter("ignore")
        mlp.fit(train_x, train_y)
    w1, w2 = (w.astype(np.float32) for w in mlp.coefs_)
    b1, b2 = (b.astype(np.float32) for b in mlp.intercepts_)
    return Digits((w1, b1, w2, b2), test_x, test_y.astype(np.int64), float(mlp.score(test_x, test_y)))


def digits_model(path: Path, weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> Path:
    """The MLP by hand with onnx.helper: `pixels` FP32 [batch, 64] -> `logits` FP32 [batch, 10]."""
    names = ("w1", "b1", "w2", "b2")
    nodes = [
        helper.make_node("MatMul", [INPUT, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", PIXELS])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(weights, names, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-tests")
    return _save(model, path)


def perturbed(weights: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], scale: float) -> tuple[np.ndarray, ...]:
    """The same MLP with seeded noise of `scale` times each weight's spread: a worse classifier."""
    rng = np.random.default_rng(SEED)
    return tuple((w + rng.normal(0, scale * float(w.std()), w.shape)).astype(np.float32) for w in weights)


def write_evaluation(path: Path, digits: Digits, **override: np.ndarray) -> Path:
    """The held-out split as the labeled gate's .npz (`pixels` and `labels`), with arrays replaced or added."""
    arrays: dict[str, Any] = {INPUT: digits.test_x, "labels": digits.test_y, **override}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
