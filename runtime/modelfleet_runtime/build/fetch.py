"""Turn a model or calibration URI into local bytes with a verified sha256: builds are keyed by content."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from modelfleet_runtime.build import DigestMismatch, FetchFailed, InvalidOptions
from modelfleet_runtime.build.options import normalize_sha256

# A single ONNX file cannot exceed 2 GiB (protobuf); larger models keep weights as external data, which a
# single download cannot carry anyway. The cap keeps a wrong URL from filling the build pod's disk.
DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetched:
    """A local file and the sha256 of its bytes."""

    path: Path
    sha256: str
    size: int
    downloaded: bool


def file_sha256(path: Path) -> tuple[str, int]:
    """Streaming sha256 and size of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fetch(
    uri: str,
    *,
    expected_sha256: str | None,
    workdir: Path,
    what: str = "model",
    sha_flag: str = "--model-sha256",
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    timeout_seconds: float = 60.0,
) -> Fetched:
    """Resolve `uri` (a path, `file:///...`, or `http(s)://...` with a required sha256) to a local file.

    Raises FetchFailed when the bytes cannot be had, DigestMismatch when a sha256 is required but absent,
    or when the bytes do not match it.
    """
    expected = None
    if expected_sha256 is not None:
        try:
            expected = normalize_sha256(expected_sha256)
        except ValueError as exc:
            raise InvalidOptions(f"{sha_flag}: {exc}") from exc
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme in {"http", "https"}:
        if expected is None:
            raise DigestMismatch(f"{what} {uri}: a downloaded {what} needs {sha_flag} to pin its content")
        fetched = _download(uri, workdir=workdir, what=what, max_bytes=max_bytes, timeout_seconds=timeout_seconds)
    else:
        fetched = _local(_local_path(uri, parsed, what=what), what=what)
    if expected is not None and fetched.sha256 != expected:
        if fetched.downloaded:
            fetched.path.unlink(missing_ok=True)
        raise DigestMismatch(
            f"{what} {uri}: sha256 mismatch: expected {expected}, got {fetched.sha256} ({fetched.size} bytes)"
        )
    return fetched


def _local_path(uri: str, parsed: urllib.parse.SplitResult, *, what: str) -> Path:
    if parsed.scheme.lower() == "file":
        if parsed.netloc not in {"", "localhost"}:
            raise FetchFailed(f"{what} {uri}: file URIs must be local (file:///path)")
        return Path(urllib.parse.unquote(parsed.path))
    if "://" in uri:
        raise FetchFailed(
            f"{what} {uri}: unsupported URI scheme {parsed.scheme!r}; use a path, file:// or https://"
            " (the operator mounts pvc:// volumes as paths)"
        )
    return Path(uri)


def _local(path: Path, *, what: str) -> Fetched:
    if not path.exists():
        raise FetchFailed(f"{what} {path}: no such file")
    if not path.is_file():
        raise FetchFailed(f"{what} {path}: not a regular file")
    try:
        digest, size = file_sha256(path)
    except OSError as exc:
        raise FetchFailed(f"{what} {path}: cannot read: {exc}") from exc
    return Fetched(path=path, sha256=digest, size=size, downloaded=False)


def _download(uri: str, *, workdir: Path, what: str, max_bytes: int, timeout_seconds: float) -> Fetched:
    name = Path(urllib.parse.urlsplit(uri).path).name or what
    fd, tmp = tempfile.mkstemp(prefix=f"download-{what}-", suffix=f"-{name}", dir=workdir)
    path = Path(tmp)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(uri, timeout=timeout_seconds) as response:
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > max_bytes:
                raise FetchFailed(f"{what} {uri}: {announced} bytes is over the {max_bytes}-byte download cap")
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchFailed(f"{what} {uri}: over the {max_bytes}-byte download cap")
                digest.update(chunk)
                out.write(chunk)
    except FetchFailed:
        path.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise FetchFailed(f"{what} {uri}: download failed: {exc}") from exc
    return Fetched(path=path, sha256=digest.hexdigest(), size=size, downloaded=True)
