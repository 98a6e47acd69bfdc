"""Refuse to start beside two ONNX Runtime distributions: they share one `onnxruntime/` folder (issue 17).

`onnxruntime` (CPU) and `onnxruntime-gpu` both install the import package `onnxruntime`; with both present,
`import onnxruntime` is whichever wrote its files last, `pip check` says nothing, and a GPU pod silently
serves on CPU. `modelfleet serve` and `modelfleet build` call `check_onnxruntime()` first.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Mapping

GPU_DISTRIBUTION = "onnxruntime-gpu"
CPU_DISTRIBUTION = "onnxruntime"


class ConflictingDistributions(RuntimeError):
    """More than one installed distribution provides the `onnxruntime` package."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_conflict(versions: Mapping[str, str]) -> str | None:
    """The error for these installed distributions of the `onnxruntime` package (name -> version), or None.

    Pure: `installed_onnxruntime_distributions()` gives the real input. onnxruntime-gpu is the one to keep
    when it is there (a GPU build also serves on CPU); uninstalling any of them removes the shared files,
    so the one kept is reinstalled.
    """
    found = {_normalize(n): v for n, v in versions.items()}
    if len(found) < 2:
        return None
    keep = GPU_DISTRIBUTION if GPU_DISTRIBUTION in found else min(found)
    drop = sorted(n for n in found if n != keep)
    extra = (
        f"modelfleet's `gpu` extra; CPU-only serving keeps {CPU_DISTRIBUTION}, the `runtime` extra, instead"
        if keep == GPU_DISTRIBUTION
        else "modelfleet's `runtime` extra"
    )
    listed = ", ".join(f"{n} {v}" for n, v in sorted(found.items()))
    return (
        f"{listed} are installed together: they share the `onnxruntime` import package, so the build that "
        "`import onnxruntime` loads depends on install order (a GPU pod may silently serve on CPU). "
        f"Uninstall {' and '.join(drop)} and reinstall {keep} (uninstalling removes the shared files): "
        f"pip uninstall -y {' '.join(sorted(found))} && pip install {keep}=={found[keep]} "
        f"({extra})"
    )


def installed_onnxruntime_distributions() -> dict[str, str]:
    """The installed distributions that provide the top-level `onnxruntime` package, with their versions."""
    out: dict[str, str] = {}
    for name in importlib.metadata.packages_distributions().get("onnxruntime", ()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def check_onnxruntime() -> None:
    """Raise `ConflictingDistributions` when two ONNX Runtime distributions are installed."""
    problem = onnxruntime_conflict(installed_onnxruntime_distributions())
    if problem is not None:
        raise ConflictingDistributions(problem)


def main() -> int:
    """`python -m modelfleet_runtime.selfcheck`: the images run it at build time."""
    try:
        check_onnxruntime()
    except ConflictingDistributions as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    found = installed_onnxruntime_distributions()
    print("ONNX Runtime: " + (", ".join(f"{n} {v}" for n, v in sorted(found.items())) or "none installed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
