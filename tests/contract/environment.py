"""The contract test's environment: pinned binding wheels per TensorRT major, gcc-built stand-in libraries, and
the introspection subprocess that loads them (so the pytest process never does).

`python -m tests.contract.environment` (what `make trt-bindings` runs) installs and builds everything once;
both are cached under ~/.cache/modelfleet (or $MODELFLEET_CACHE), keyed by the pins' and sources' hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# TensorRT versions the contract covers; each has tests/contract/bindings-<version>.txt.
VERSIONS = ("10.16.1.11", "11.4.0.106")
# The wheels are cp311 builds: the subprocess must be a CPython 3.11.
PYTHON_TAG = "3.11"
# The libraries tensorrt.so links against (readelf -d), one stand-in source each.
STUB_LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
ROOTS = {"tensorrt": "tensorrt", "cudart": "cuda.bindings.runtime"}


def cache_root() -> Path:
    return Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet"))


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:12]


def requirements(version: str) -> Path:
    return HERE / f"bindings-{version}.txt"


def _publish(build: Path, final: Path) -> None:
    """Move a finished directory into place; a concurrent builder that won the race is fine."""
    try:
        build.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(build, ignore_errors=True)


def bindings_dir(version: str) -> Path:
    """The wheels of tests/contract/bindings-<version>.txt installed into their own --target dir (idempotent)."""
    pins = requirements(version)
    final = cache_root() / "trt-bindings" / f"{version}-{_digest(pins)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    platform = ["--platform", "manylinux_2_28_x86_64", "--python-version", PYTHON_TAG, "--implementation", "cp"]
    command = [
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
        "--no-deps",
        "--require-hashes",
    ]
    command += ["--only-binary=:all:", "--no-compile", *platform, "--target", str(build), "-r", str(pins)]
    subprocess.run([_pip_python(), *command], check=True)
    _publish(build, final)
    return final


def _pip_python() -> str:
    """An interpreter with pip: this one, else python3 (uv's venvs have no pip; the Makefile bootstraps uv so)."""
    done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False)
    return sys.executable if done.returncode == 0 else "python3"


def stubs_dir(version: str) -> Path:
    """libnvinfer.so.N & co. for TensorRT major N, built with gcc from tests/contract/stubs (idempotent)."""
    major = version.split(".", maxsplit=1)[0]
    sources = [HERE / "stubs" / f"{name}.c" for name in STUB_LIBRARIES]
    final = cache_root() / "trt-stubs" / f"{major}-{_digest(*sources)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    for name, source in zip(STUB_LIBRARIES, sources, strict=True):
        soname = f"lib{name}.so.{major}"
        gcc = ["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", str(build / soname), str(source)]
        subprocess.run(gcc, check=True)
    _publish(build, final)
    return final


def introspect(version: str, imports: list[str]) -> dict[str, Any]:
    """The JSON dump of tests/contract/introspect.py, run against this version's bindings and stand-ins."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(bindings_dir(version)),
        "LD_LIBRARY_PATH": str(stubs_dir(version)),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    request = json.dumps({"roots": ROOTS, "imports": imports})
    script = str(HERE / "introspect.py")
    done = subprocess.run(
        [sys.executable, "-S", script], input=request, capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"introspection of TensorRT {version} failed ({done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["version"] = version
    return result


def main() -> None:
    for version in VERSIONS:
        started = time.monotonic()
        target, stubs = bindings_dir(version), stubs_dir(version)
        print(f"trt-bindings {version}: {target} + {stubs} ({time.monotonic() - started:.1f}s)")


if __name__ == "__main__":
    main()
