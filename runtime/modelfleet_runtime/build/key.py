"""The engine cache key: one function, imported by both the build Job and the operator so they never drift."""

from __future__ import annotations

import hashlib
import json
import re

from modelfleet_runtime.build.options import BuildOptions, normalize_sha256

# Bump when the meaning of a key changes (what goes in, or how an artifact is laid out), so old
# entries are simply never hit again instead of being misread.
KEY_SCHEMA = 2  # 2: precision through the model (build/precision.py), no TensorRT precision flags

_ARCHITECTURE = re.compile(r"^(sm\d{2,3}|cpu)$")


def normalize_architecture(value: str) -> str:
    """`sm80`, `SM_80`, `8.0` -> `sm80`; `cpu` stays. Raises ValueError on anything else."""
    text = value.strip().lower().replace("_", "")
    if re.fullmatch(r"\d+\.\d", text):
        major, minor = text.split(".")
        text = f"sm{major}{minor}"
    if not _ARCHITECTURE.match(text):
        raise ValueError(f"architecture must be smXY (e.g. sm80) or cpu, got {value!r}")
    return text


def key_material(*, model_digest: str, options: BuildOptions, architecture: str, backend_version: str) -> str:
    """The canonical JSON that is hashed; exposed so a surprising key can be explained."""
    if not backend_version.strip():
        raise ValueError("backend_version must not be empty")
    material = {
        "schema": KEY_SCHEMA,
        "model_sha256": normalize_sha256(model_digest),
        "options": options.normalized(),
        "architecture": normalize_architecture(architecture),
        "backend_version": backend_version.strip(),
    }
    return json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def engine_key(*, model_digest: str, options: BuildOptions, architecture: str, backend_version: str) -> str:
    """sha256 (hex) over the model digest, the normalized options, the architecture and the backend version.

    `options.backend` must be resolved (not `auto`) and a calibration digest known, else ValueError.
    """
    material = key_material(
        model_digest=model_digest, options=options, architecture=architecture, backend_version=backend_version
    )
    return hashlib.sha256(material.encode("ascii")).hexdigest()
