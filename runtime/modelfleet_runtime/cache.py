"""A response cache with Triton's semantics: identical requests to the same engine get the stored response bytes.

The key is a BLAKE2b-256 digest of the engine's identity (store key and artifact sha256, model name and
version), every input tensor (name, datatype, shape, raw bytes; sorted by name, since the order inputs are
sent in changes nothing in the response) and the requested outputs with their binary flags, in the order
asked (the response lists them in that order). Every field is length-prefixed, so no two requests share a
byte stream. The request id and timeout are not in the key (as in Triton): the id is spliced into the stored
response, which is kept without one. Inputs that differ only in how they were sent (JSON or binary) hit the
same entry: they are the same tensors.

The LRU is bounded by bytes: each entry costs its response bytes plus `ENTRY_OVERHEAD`; an entry larger than
`MAX_ENTRY_FRACTION` of the limit is not stored, so one large response cannot flush the cache. The cache is
used only from the event loop thread (lookups and inserts never await), so it needs no lock; the key may be
computed in the decode thread (hashlib releases the GIL on large buffers).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import orjson

# Bytes charged per entry besides the response: the 32-byte key, the OrderedDict node, the entry object.
ENTRY_OVERHEAD = 256
MAX_ENTRY_FRACTION = 0.125
_WIRE = {k: np.dtype(k).newbyteorder("<") for k in "?bBhHiIlLqQefd"}


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """An encoded response without an id: the body and, for a binary response, its JSON header length."""

    body: bytes
    header_length: int | None

    @property
    def cost(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD


def with_id(response: CachedResponse, request_id: str | None) -> tuple[bytes, int | None]:
    """The stored response as sent to a request with `request_id`: the id is the header's last key, as
    `encode_infer_response` writes it, so the bytes equal a freshly encoded response's."""
    if request_id is None:
        return response.body, response.header_length
    end = len(response.body) if response.header_length is None else response.header_length
    header = response.body[: end - 1] + b',"id":' + orjson.dumps(request_id) + b"}"
    if response.header_length is None:
        return header, None
    return header + response.body[end:], len(header)


def _field(digest: hashlib.blake2b, data: bytes | memoryview) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _tensor_bytes(arr: np.ndarray) -> bytes | memoryview:
    if arr.dtype.kind == "O":  # BYTES: every element length-prefixed, as on the wire
        return b"".join(struct.pack("<Q", len(x)) + x for x in arr.reshape(-1))
    wire = _WIRE.get(arr.dtype.char, arr.dtype)
    contiguous = np.ascontiguousarray(arr, dtype=wire)
    return contiguous.reshape(-1).view(np.uint8).data


def build_key(
    engine: bytes, inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str], outputs: Iterable[tuple[str, bool]]
) -> bytes:
    """The cache key of a validated request: `datatypes` names each input's OIP datatype."""
    digest = hashlib.blake2b(digest_size=32)
    _field(digest, engine)
    for name in sorted(inputs):
        arr = inputs[name]
        _field(digest, name.encode())
        _field(digest, datatypes[name].encode())
        _field(digest, struct.pack(f"<{arr.ndim}Q", *arr.shape))
        _field(digest, _tensor_bytes(arr))
    for name, binary in outputs:
        _field(digest, name.encode())
        _field(digest, b"\x01" if binary else b"\x00")
    return digest.digest()


def engine_identity(*, key: str | None, sha256: str, name: str, version: str) -> bytes:
    """What makes responses of one engine differ from another's: a new artifact is a new namespace."""
    return orjson.dumps({"key": key, "sha256": sha256, "name": name, "version": version})


class ResponseCache:
    """An LRU of encoded responses bounded by `limit` bytes (responses + per-entry overhead)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.max_entry = int(limit * MAX_ENTRY_FRACTION)
        self._entries: OrderedDict[bytes, CachedResponse] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedResponse | None:
        """The stored response (now the most recently used), counting a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, response: CachedResponse) -> bool:
        """Store a successful response, evicting least recently used entries; False if it is too large."""
        if response.cost > self.max_entry:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.cost
        while self._entries and self.bytes + response.cost > self.limit:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.cost
            self.evictions += 1
        self._entries[key] = response
        self.bytes += response.cost
        return True
