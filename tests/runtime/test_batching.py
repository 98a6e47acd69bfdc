"""Pure batching at its edges: a model without a batch axis, a request of exactly the maximum, 1-D tensors."""

from __future__ import annotations

import numpy as np
import pytest

from modelfleet_runtime.backends.base import TensorSpec
from modelfleet_runtime.batching import (
    BatchMismatch,
    ModelSignature,
    batch_key,
    merge,
    plan_batch,
    split,
    supports_batching,
    validate_inputs,
    validate_outputs,
)
from modelfleet_runtime.protocol import InvalidInput

BATCHED = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 2)),), max_batch_size=8
)
UNBATCHED = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (3, 4)),), outputs=(TensorSpec("y", "FP32", (3, 2)),), max_batch_size=0
)
ONE_D = ModelSignature(
    inputs=(TensorSpec("ids", "INT64", (-1,)),), outputs=(TensorSpec("score", "FP32", (-1,)),), max_batch_size=4
)


def rows(n: int, width: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.zeros((n, width), dtype=np.float32)}


def test_a_request_of_exactly_the_maximum_batch_is_accepted_one_more_is_refused() -> None:
    assert validate_inputs(rows(8), BATCHED) == 8
    with pytest.raises(InvalidInput, match="input 'x' has batch size 9, above the maximum 8"):
        validate_inputs(rows(9), BATCHED)
    with pytest.raises(InvalidInput, match="empty batch dimension"):
        validate_inputs(rows(0), BATCHED)


def test_a_model_without_a_batch_axis_takes_its_exact_shape_as_one_request() -> None:
    assert not UNBATCHED.batched and BATCHED.batched
    assert validate_inputs({"x": np.zeros((3, 4), dtype=np.float32)}, UNBATCHED) == 1
    with pytest.raises(InvalidInput, match=r"has shape \[4, 4\], the model expects \[3, 4\]"):
        validate_inputs({"x": np.zeros((4, 4), dtype=np.float32)}, UNBATCHED)
    assert not supports_batching(UNBATCHED.inputs, UNBATCHED.outputs)
    assert supports_batching(BATCHED.inputs, BATCHED.outputs)
    assert not supports_batching((TensorSpec("s", "FP32", ()),), ())


def test_one_dimensional_tensors_batch_split_and_merge_by_row() -> None:
    a, b = {"ids": np.array([1, 2], dtype=np.int64)}, {"ids": np.array([3], dtype=np.int64)}
    assert validate_inputs(a, ONE_D) == 2
    assert batch_key(a, ONE_D) == batch_key(b, ONE_D) == ((),)
    merged = merge([a, b], ["ids"])
    assert merged["ids"].tolist() == [1, 2, 3]
    parts = split({"score": np.array([0.1, 0.2, 0.3], dtype=np.float32)}, [2, 1])
    assert [p["score"].tolist() for p in parts] == [pytest.approx([0.1, 0.2]), pytest.approx([0.3])]
    with pytest.raises(BatchMismatch, match="expected 3 rows"):
        split({"score": np.array(1.0, dtype=np.float32)}, [2, 1])
    with pytest.raises(BatchMismatch, match="expected 3 rows"):
        split({"score": np.zeros(4, dtype=np.float32)}, [2, 1])


def test_a_single_request_passes_through_merge_and_split_unchanged() -> None:
    request = rows(2)
    assert merge([request], ["x"])["x"] is request["x"]
    out = {"y": np.ones((2, 2), dtype=np.float32)}
    assert split(out, [2])[0]["y"] is out["y"]


def test_inputs_are_named_typed_and_agree_on_their_batch() -> None:
    two = ModelSignature(
        inputs=(TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP32", (-1, 2))), outputs=(), max_batch_size=8
    )
    with pytest.raises(InvalidInput, match="input 'b' has batch size 3 but input 'a' has 2"):
        validate_inputs({"a": np.zeros((2, 2), np.float32), "b": np.zeros((3, 2), np.float32)}, two)
    with pytest.raises(InvalidInput, match="unknown input 'z'; the model's inputs are x"):
        validate_inputs({**rows(1), "z": np.zeros(1)}, BATCHED)
    with pytest.raises(InvalidInput, match=r"missing input 'x' \(FP32 \[-1, 4\]\)"):
        validate_inputs({}, BATCHED)
    with pytest.raises(InvalidInput, match="datatype FP64, the model expects FP32"):
        validate_inputs({"x": np.zeros((1, 4))}, BATCHED)
    with pytest.raises(InvalidInput, match=r"shape \[1, 4, 1\]"):
        validate_inputs({"x": np.zeros((1, 4, 1), np.float32)}, BATCHED)
    with pytest.raises(InvalidInput, match="unknown output 'z'; the model's outputs are y"):
        validate_outputs(["y", "z"], BATCHED)
    assert BATCHED.output("y") == BATCHED.outputs[0] and BATCHED.output("z") is None


def test_axes_named_alike_must_agree_across_inputs() -> None:
    named = ModelSignature(
        inputs=(
            TensorSpec("a", "FP32", (-1, -1), ("batch", "seq")),
            TensorSpec("b", "FP32", (-1, -1), (None, "seq")),
        ),
        outputs=(),
        max_batch_size=8,
    )
    ok = {"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 5), np.float32)}
    assert validate_inputs(ok, named) == 1
    bad = {"a": np.zeros((1, 5), np.float32), "b": np.zeros((1, 6), np.float32)}
    with pytest.raises(InvalidInput, match="input 'b' has 6 along axis 1 but input 'a' has 5 along axis 1"):
        validate_inputs(bad, named)


def test_a_batch_reaching_exactly_the_maximum_goes_at_once() -> None:
    same = lambda *sizes: [(s, "k") for s in sizes]  # noqa: E731
    assert plan_batch(same(4, 4), max_batch_size=8, preferred=frozenset(), delay_expired=False) == 2
    assert plan_batch(same(4, 3), max_batch_size=8, preferred=frozenset(), delay_expired=False) == 0
    assert plan_batch(same(4, 3), max_batch_size=8, preferred=frozenset(), delay_expired=True) == 2
    assert plan_batch(same(8), max_batch_size=8, preferred=frozenset(), delay_expired=False) == 1
    # the next request does not fit: what is gathered goes at once
    assert plan_batch(same(4, 5), max_batch_size=8, preferred=frozenset(), delay_expired=False) == 1
    assert plan_batch([(1, "k"), (1, "other")], max_batch_size=8, preferred=frozenset(), delay_expired=False) == 1
    assert plan_batch(same(1, 1, 1), max_batch_size=8, preferred=frozenset({2}), delay_expired=False) == 2


def test_mismatches_are_refused_whichever_way_they_go() -> None:
    big = ModelSignature(
        inputs=(TensorSpec("a", "FP32", (-1, -1), (None, "seq")), TensorSpec("b", "FP32", (-1, -1), (None, "seq"))),
        outputs=(),
        max_batch_size=1000,
    )
    # sizes above CPython's small-int cache: equal values that are not the same object
    same = {"a": np.zeros((300, 300), np.float32), "b": np.zeros((300, 300), np.float32)}
    assert validate_inputs(same, big) == 300
    with pytest.raises(InvalidInput, match="input 'b' has 2 along axis 1 but input 'a' has 3"):
        validate_inputs({"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 2), np.float32)}, big)
    with pytest.raises(InvalidInput, match="input 'b' has batch size 2 but input 'a' has 3"):
        validate_inputs({"a": np.zeros((3, 1), np.float32), "b": np.zeros((2, 1), np.float32)}, big)
    with pytest.raises(InvalidInput, match="datatype BOOL, the model expects FP32"):
        validate_inputs({"x": np.zeros((1, 4), dtype=bool)}, BATCHED)
    with pytest.raises(InvalidInput, match=r"has shape \[4\], the model expects \[-1, 4\]"):
        validate_inputs({"x": np.zeros(4, np.float32)}, BATCHED)
    with pytest.raises(BatchMismatch, match="expected 3 rows"):
        split({"y": np.zeros((2, 3), np.float32)}, [2, 1])
    assert [p["y"].shape for p in split({"y": np.zeros((300, 2), np.float32)}, [299, 1])] == [(299, 2), (1, 2)]
    assert [p["y"].shape for p in split({"y": np.zeros((3, 2), np.float32)}, [2, 1])] == [(2, 2), (1, 2)]


def test_outputs_are_found_by_exact_name() -> None:
    assert BATCHED.output("a") is None
    assert BATCHED.output("".join(["y"])) == BATCHED.outputs[0]  # an equal name, not the same string object


def test_signatures_are_immutable_and_a_batch_of_one_still_batches() -> None:
    assert ModelSignature(inputs=(), outputs=(), max_batch_size=1).batched
    assert supports_batching(ONE_D.inputs, ONE_D.outputs)
    with pytest.raises(AttributeError):
        BATCHED.max_batch_size = 2  # type: ignore[misc]


def test_two_dimensional_requests_merge_along_rows_and_keys_tell_shapes_apart() -> None:
    merged = merge([rows(2), rows(1)], ["x"])
    assert merged["x"].shape == (3, 4)
    assert batch_key(rows(1, 5), BATCHED) != batch_key(rows(1, 6), BATCHED)


def test_the_queue_head_decides_what_joins_it() -> None:
    key = batch_key(rows(1), BATCHED)
    equal_key = batch_key(rows(1), BATCHED)  # equal, not the same tuple
    assert plan_batch([(4, key), (4, equal_key)], max_batch_size=8, preferred=frozenset(), delay_expired=False) == 2
    assert plan_batch([(1, "k"), (1, "a")], max_batch_size=8, preferred=frozenset(), delay_expired=True) == 1
    # nothing behind a request of another shape joins, even if its shape matches the head again
    assert plan_batch([(1, "k"), (1, "o"), (1, "k")], max_batch_size=8, preferred=frozenset(), delay_expired=True) == 1
    assert plan_batch([], max_batch_size=8, preferred=frozenset(), delay_expired=True) == 0
    assert plan_batch([], max_batch_size=8, preferred=frozenset(), delay_expired=False) == 0
    # a head above the maximum (never admitted, but planned safely) goes alone at once
    assert plan_batch([(10, "k")], max_batch_size=8, preferred=frozenset(), delay_expired=False) == 1
