"""Pure batching: validate requests against the model, merge them along the batch axis, split results back.

No I/O and no clocks here; `batcher.py` is the asyncio loop that uses these. A request may carry a batch
dimension above 1: merging concatenates along axis 0 and splitting slices the same row ranges back, so
each request gets exactly its own rows. Requests whose non-batch dimensions differ (a dynamic sequence axis,
say) cannot share a batch; `batch_key` tells them apart and `plan_batch` never mixes them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modelfleet_runtime.backends.base import TensorSpec
from modelfleet_runtime.protocol import InvalidInput, datatype_of


@dataclass(frozen=True)
class ModelSignature:
    """What requests are validated against. `max_batch_size` 0 means the model has no batch axis."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


def supports_batching(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    """A model batches when every input and output has a dynamic leading axis."""
    return all(len(s.shape) >= 1 and s.shape[0] == -1 for s in (*inputs, *outputs))


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate_inputs(inputs: Mapping[str, np.ndarray], signature: ModelSignature) -> int:
    """Check names, datatypes and shapes; return the request's batch size (1 for unbatched models).

    Raises `InvalidInput` with a message naming the offending tensor.
    """
    expected = {spec.name: spec for spec in signature.inputs}
    for name in inputs:
        if name not in expected:
            raise InvalidInput(f"unknown input '{name}'; the model's inputs are {', '.join(expected)}")
    batch: int | None = None
    batch_from = ""
    for spec in signature.inputs:
        arr = inputs.get(spec.name)
        if arr is None:
            raise InvalidInput(f"missing input '{spec.name}' ({spec.datatype} {_fmt(spec.shape)})")
        got = datatype_of(arr.dtype)
        if got != spec.datatype:
            raise InvalidInput(f"input '{spec.name}' has datatype {got}, the model expects {spec.datatype}")
        if arr.ndim != len(spec.shape) or any(
            want not in (-1, have) for want, have in zip(spec.shape, arr.shape, strict=True)
        ):
            raise InvalidInput(f"input '{spec.name}' has shape {_fmt(arr.shape)}, the model expects {_fmt(spec.shape)}")
        if signature.batched:
            rows = arr.shape[0]
            if rows < 1:
                raise InvalidInput(f"input '{spec.name}' has an empty batch dimension")
            if batch is None:
                batch, batch_from = rows, spec.name
            elif rows != batch:
                raise InvalidInput(f"input '{spec.name}' has batch size {rows} but input '{batch_from}' has {batch}")
    _check_named_dims(inputs, signature)
    if not signature.batched:
        return 1
    assert batch is not None
    if batch > signature.max_batch_size:
        raise InvalidInput(f"input '{batch_from}' has batch size {batch}, above the maximum {signature.max_batch_size}")
    return batch


def _check_named_dims(inputs: Mapping[str, np.ndarray], signature: ModelSignature) -> None:
    """Axes the model names alike (a shared `seq`, say) must agree across inputs, or the model fails on them."""
    first: dict[str, tuple[int, str, int]] = {}
    for spec in signature.inputs:
        shape = inputs[spec.name].shape
        for axis, dim in enumerate(spec.dim_names):
            if dim is None:
                continue
            size, other, other_axis = first.setdefault(dim, (shape[axis], spec.name, axis))
            if size != shape[axis]:
                raise InvalidInput(
                    f"input '{spec.name}' has {shape[axis]} along axis {axis} but input '{other}' has {size} along "
                    f"axis {other_axis}; the model names both '{dim}', so they must be equal"
                )


def validate_outputs(names: Iterable[str], signature: ModelSignature) -> None:
    known = [spec.name for spec in signature.outputs]
    for name in names:
        if name not in known:
            raise InvalidInput(f"unknown output '{name}'; the model's outputs are {', '.join(known)}")


def batch_key(inputs: Mapping[str, np.ndarray], signature: ModelSignature) -> Hashable:
    """Requests with equal keys can be concatenated: same non-batch dimensions for every input."""
    return tuple(inputs[spec.name].shape[1:] for spec in signature.inputs)


def merge(requests: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Concatenate along axis 0, in request order. A single request is passed through without a copy."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in names}


class BatchMismatch(ValueError):
    """The model returned outputs that cannot be split back over the requests of its batch."""


def split(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Slice each output's rows back to the requests in order: request i gets its `sizes[i]` rows."""
    total = sum(sizes)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise BatchMismatch(
                f"output '{name}' has shape {_fmt(arr.shape)}, expected {total} rows for the batch's requests"
            )
    if len(sizes) == 1:
        return [dict(outputs)]
    parts: list[dict[str, np.ndarray]] = []
    offset = 0
    for size in sizes:
        parts.append({name: arr[offset : offset + size] for name, arr in outputs.items()})
        offset += size
    return parts


def plan_batch(
    queued: Iterable[tuple[int, Hashable]],
    *,
    max_batch_size: int,
    preferred: frozenset[int],
    delay_expired: bool,
) -> int:
    """How many queued requests (from the head) to dispatch now; 0 means wait for more.

    Triton's dynamic batcher semantics over (batch size, key) pairs in queue order:
    - the batch grows from the head while keys match and the total stays <= max_batch_size;
    - if some prefix totals a preferred size, send the largest such prefix at once;
    - else if the batch cannot grow any more (max reached, or the next request does not fit or has a
      different shape), send it at once;
    - else send everything gathered once the oldest request has waited the max queue delay.
    """
    total = 0
    count = 0
    best_preferred = 0
    head_key: Hashable = None
    blocked = False
    for size, key in queued:
        if count == 0:
            head_key = key
        elif key != head_key or total + size > max_batch_size:
            blocked = True
            break
        total += size
        count += 1
        if total in preferred:
            best_preferred = count
        if total >= max_batch_size:
            blocked = True
            break
    if count == 0:
        return 0
    if best_preferred:
        return best_preferred
    if blocked or delay_expired:
        return count
    return 0
