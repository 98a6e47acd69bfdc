"""The engine store: content-addressed directories `<store>/<key>/`, published atomically, verified on read.

Layout (the serving runtime reads it):
    <store>/<key>/manifest.json        {"key", "backend", "artifact", "artifact_sha256", "options": {"batch":
                                        {"min","opt","max"}, ...}, "inputs", "outputs", "precision", ...}
    <store>/<key>/<artifact>           model.onnx (onnxruntime) or engine.plan (tensorrt)
    <store>/timing-cache/<arch>-<trt>.bin
    <store>/.tmp-*                     staging directories of builds in progress (or crashed)

A `<key>` directory appears only by `rename(2)` of a complete, fsynced staging directory, so a reader sees
a whole entry or none. Two builders of one key both build; the second rename fails because the target
exists, and the loser verifies the winner's entry and discards its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfleet_runtime.build import PublishFailed
from modelfleet_runtime.build.fetch import file_sha256

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
_PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class Entry:
    """What is at `<store>/<key>`: a verified manifest, or a problem (None, None when absent)."""

    manifest: dict[str, Any] | None
    problem: str | None


@dataclass(frozen=True)
class Published:
    manifest: dict[str, Any]
    won: bool  # False: another builder published this key first; its entry was verified and kept


def key_dir(store: Path, key: str) -> Path:
    return store / key


def read_entry(store: Path, key: str) -> Entry:
    """Load `<key>/manifest.json` and check the artifact's sha256 against it."""
    directory = key_dir(store, key)
    if not directory.exists():
        return Entry(None, None)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return Entry(None, f"{directory} has no {MANIFEST_NAME}")
    except (OSError, ValueError) as exc:
        return Entry(None, f"{directory / MANIFEST_NAME} is unreadable: {exc}")
    problem = manifest_problem(manifest, key=key)
    if problem is not None:
        return Entry(None, f"{directory / MANIFEST_NAME}: {problem}")
    artifact = directory / manifest["artifact"]
    try:
        digest, _ = file_sha256(artifact)
    except OSError as exc:
        return Entry(None, f"artifact {artifact} is unreadable: {exc}")
    if digest != manifest["artifact_sha256"]:
        return Entry(None, f"artifact {artifact} has sha256 {digest}, the manifest says {manifest['artifact_sha256']}")
    return Entry(manifest, None)


def manifest_problem(manifest: object, *, key: str) -> str | None:
    """Why a manifest cannot be trusted, or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("key") != key:
        return f"key is {manifest.get('key')!r}, not {key!r}"
    artifact = manifest.get("artifact")
    if not isinstance(artifact, str) or not artifact or "/" in artifact or artifact in {".", ".."}:
        return f"artifact {artifact!r} is not a file name"
    if artifact == MANIFEST_NAME:
        return "artifact cannot be the manifest"
    if not isinstance(manifest.get("artifact_sha256"), str):
        return "artifact_sha256 is missing"
    return None


def make_staging(store: Path, key: str) -> Path:
    """A fresh staging directory inside the store, so the final rename stays on one filesystem."""
    store.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=store))


def write_manifest(staging: Path, manifest: dict[str, Any]) -> None:
    path = staging / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")


def build_manifest(
    *,
    key: str,
    artifact: str,
    artifact_sha256: str,
    artifact_bytes: int,
    backend: str,
    backend_version: str,
    architecture: str,
    precision_requested: str,
    precision_effective: str,
    options: dict[str, Any],
    model_digest: str,
    model_uri: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    build_seconds: float,
    accuracy: dict[str, Any],
    details: dict[str, Any],
    versions: dict[str, str | None],
    created: str,
) -> dict[str, Any]:
    """The manifest document; pure, every value passed in."""
    return {
        "schema": MANIFEST_SCHEMA,
        "key": key,
        "artifact": artifact,
        "artifact_sha256": artifact_sha256,
        "artifact_bytes": artifact_bytes,
        "backend": backend,
        "backend_version": backend_version,
        "architecture": architecture,
        "precision": {"requested": precision_requested, "effective": precision_effective},
        "options": options,
        "model_digest": model_digest,
        "model_uri": model_uri,
        "inputs": inputs,
        "outputs": outputs,
        "build_seconds": round(build_seconds, 3),
        "accuracy": accuracy,
        "details": details,
        "versions": versions,
        "modelfleet_version": versions.get("modelfleet"),
        "created": created,
    }


def publish(*, store: Path, key: str, staging: Path) -> Published:
    """Rename `staging` to `<store>/<key>`; if a valid entry is already there, keep it and drop ours.

    A corrupt entry in the way is first renamed aside (atomically), then removed.
    """
    final = key_dir(store, key)
    ours = json.loads((staging / MANIFEST_NAME).read_text())
    _fsync_tree(staging)
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno not in {errno.EEXIST, errno.ENOTEMPTY}:
                raise PublishFailed(f"cannot publish {final}: {exc}") from exc
        else:
            _fsync_dir(store)
            return Published(manifest=ours, won=True)
        entry = read_entry(store, key)
        if entry.manifest is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return Published(manifest=entry.manifest, won=False)
        if entry.problem is None:
            continue  # it vanished (another builder is replacing a corrupt entry): try again
        trash = store / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    raise PublishFailed(f"could not publish {final} after {_PUBLISH_ATTEMPTS} attempts")


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and the directory itself, so a renamed entry is complete after a crash too."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
