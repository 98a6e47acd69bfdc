"""cuda-python's runtime module in one place: `cuda.bindings.runtime` (cuda-python >= 12.6), else `cuda.cudart`.

cuda-python 13 removed the old `cuda.cudart` module; 12.6 to 12.9 have both. Everything that needs the CUDA
runtime API (the TensorRT backend, the builder's GPU detection) imports it through `cudart()`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# Tried in this order: the layout of cuda-python >= 12.6 first, then the one before it.
MODULE_PATHS = ("cuda.bindings.runtime", "cuda.cudart")


def cudart() -> ModuleType:
    """The CUDA runtime bindings; ImportError naming both paths when cuda-python is missing or has neither."""
    errors = []
    for path in MODULE_PATHS:
        try:
            return importlib.import_module(path)
        except ImportError as exc:
            errors.append(f"{path}: {exc}")
    raise ImportError("cuda-python's runtime bindings are not importable (" + "; ".join(errors) + ")")


def cuda_python_present() -> bool:
    return importlib.util.find_spec("cuda") is not None


def device_architecture(device: int = 0) -> str | None:
    """`device`'s compute capability as smXY through cuda-python; None without cuda-python, a driver or a GPU."""
    if not cuda_python_present():
        return None
    try:
        rt = cudart()
        err, count = rt.cudaGetDeviceCount()
        if err != rt.cudaError_t.cudaSuccess or count <= device:
            return None
        attr = rt.cudaDeviceAttr
        err, major = rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
        if err != rt.cudaError_t.cudaSuccess:
            return None
        err, minor = rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
        if err != rt.cudaError_t.cudaSuccess:
            return None
        return f"sm{major}{minor}"
    except Exception:  # no driver, or a cuda-python layout we do not know: treat as no GPU
        return None
