"""The response cache's pure parts: the key's fields, the byte-bounded LRU, and the id splice."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from modelfleet_runtime.cache import (
    ENTRY_OVERHEAD,
    CachedResponse,
    ResponseCache,
    build_key,
    engine_identity,
    with_id,
)
from modelfleet_runtime.protocol import encode_infer_response

ENGINE = engine_identity(key="k1", sha256="a" * 64, name="m", version="1")
X = np.arange(6, dtype=np.float32).reshape(2, 3)
OUT = [("y", False)]


def key(inputs: dict[str, np.ndarray], outputs: list[tuple[str, bool]] = OUT, engine: bytes = ENGINE) -> bytes:
    datatypes = {n: "BYTES" if a.dtype.kind == "O" else str(a.dtype) for n, a in inputs.items()}
    return build_key(engine, inputs, datatypes, outputs)


def test_the_same_tensors_give_the_same_key_whatever_their_order_layout_or_byte_order() -> None:
    base = key({"a": X, "b": X + 1})
    assert base == key({"b": X + 1, "a": X})
    assert base == key({"a": np.asfortranarray(X), "b": (X + 1).astype(">f4").astype(np.float32)})
    big_endian = {"a": X.astype(">f4"), "b": (X + 1).astype(">f4")}
    assert build_key(ENGINE, big_endian, {"a": "float32", "b": "float32"}, OUT) == base


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: key({"a": X + np.float32(1e-7), "b": X + 1}), id="one value"),
        pytest.param(lambda: key({"a": X.reshape(3, 2), "b": X + 1}), id="shape"),
        pytest.param(lambda: key({"a": X, "c": X + 1}), id="input name"),
        pytest.param(lambda: key({"a": X, "b": X + 1}, [("y", True)]), id="binary flag"),
        pytest.param(lambda: key({"a": X, "b": X + 1}, [("z", False)]), id="output name"),
        pytest.param(lambda: key({"a": X, "b": X + 1}, [("y", False), ("z", False)]), id="more outputs"),
        pytest.param(
            lambda: key({"a": X, "b": X + 1}, engine=engine_identity(key="k1", sha256="b" * 64, name="m", version="1")),
            id="engine artifact",
        ),
        pytest.param(
            lambda: key({"a": X, "b": X + 1}, engine=engine_identity(key="k2", sha256="a" * 64, name="m", version="1")),
            id="engine key",
        ),
    ],
)
def test_any_difference_in_engine_inputs_or_outputs_changes_the_key(other: Callable[[], bytes]) -> None:
    assert other() != key({"a": X, "b": X + 1})


def test_datatype_and_element_boundaries_are_part_of_the_key() -> None:
    as_int = X.view(np.int32)
    assert build_key(ENGINE, {"a": as_int}, {"a": "INT32"}, OUT) != build_key(ENGINE, {"a": X}, {"a": "FP32"}, OUT)
    one = np.array([b"ab", b"c"], dtype=np.object_)
    two = np.array([b"a", b"bc"], dtype=np.object_)
    assert key({"t": one}) != key({"t": two})
    assert key({"t": one}) == key({"t": np.array([b"ab", b"c"], dtype=np.object_)})


def entry(size: int) -> CachedResponse:
    return CachedResponse(b"x" * (size - ENTRY_OVERHEAD), None)


def test_the_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used() -> None:
    cache = ResponseCache(limit=8000)
    for i in range(8):
        assert cache.put(bytes([i]), entry(1000))
    assert (len(cache), cache.bytes, cache.evictions) == (8, 8000, 0)
    assert cache.get(bytes([0])) is not None  # 0 is now the most recently used; 1 the least
    assert cache.put(b"new", entry(1000))
    assert cache.get(bytes([1])) is None
    assert cache.get(bytes([0])) is not None
    assert (len(cache), cache.bytes, cache.evictions, cache.hits, cache.misses) == (8, 8000, 1, 2, 1)
    assert cache.put(b"half", entry(500)) and cache.put(b"half2", entry(500))
    assert (len(cache), cache.bytes, cache.evictions) == (9, 8000, 2)


def test_an_entry_above_the_fraction_of_the_limit_is_not_stored() -> None:
    cache = ResponseCache(limit=8000)
    assert cache.put(b"a", entry(1000))
    assert not cache.put(b"b", entry(1001))
    assert (len(cache), cache.bytes, cache.evictions) == (1, 1000, 0)


def test_storing_a_key_again_replaces_it_without_counting_twice() -> None:
    cache = ResponseCache(limit=8000)
    cache.put(b"a", entry(1000))
    cache.put(b"a", entry(500))
    assert (len(cache), cache.bytes) == (1, 500)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("request_id", [None, "req-7", 'quote " and \\ ünï'])
def test_the_id_splice_gives_the_bytes_a_fresh_encoding_would(binary: bool, request_id: str | None) -> None:
    outputs = [("y", "FP32", X, binary), ("z", "INT64", np.arange(3), False)]
    args = {"model_name": "m", "model_version": "1", "outputs": outputs}
    stored = CachedResponse(*encode_infer_response(request_id=None, **args))  # type: ignore[arg-type]
    assert with_id(stored, request_id) == encode_infer_response(request_id=request_id, **args)  # type: ignore[arg-type]
