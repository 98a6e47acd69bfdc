"""Which int8 kernel class ONNX Runtime's CPU provider (MLAS) uses here, and whether an artifact may run on it.

MLAS picks its integer GEMM by CPU feature. For U8S8 (uint8 activations x int8 weights) on x86-64 without
VNNI it uses VPMADDUBSW, whose int16 sums of byte-pair products saturate; with VNNI (AVX512-VNNI, AVX-VNNI)
or AMX the products are summed in int32, as they are for U8U8 on every x86 kernel and for both on arm64.
So a model with int8 weights can compute differently on two "cpu" nodes, and its accuracy gate holds only
on the class it ran on; modelfleet's own quantization uses uint8 weights (build/ort.py) and is portable.
Standard library only: the build, the runtime and tests read it.
"""

from __future__ import annotations

import platform
from pathlib import Path

# Kernel classes in which U8S8 products saturate (int16 pair sums).
SATURATING = frozenset({"avx512", "avx2", "sse"})


def int8_kernel_class(machine: str, flags: frozenset[str]) -> str:
    """The class from `platform.machine()` and the CPU's feature flags (/proc/cpuinfo names)."""
    arch = machine.lower()
    if arch in ("x86_64", "amd64"):
        for flag, name in (
            ("amx_int8", "amx"),
            ("avx512_vnni", "avx512-vnni"),
            ("avx_vnni", "avx-vnni"),
            ("avx512bw", "avx512"),
            ("avx2", "avx2"),
        ):
            if flag in flags:
                return name
        return "sse"
    if arch in ("aarch64", "arm64"):
        return "arm64-dotprod" if "asimddp" in flags else "arm64"
    return arch or "unknown"


def u8s8_saturates(kernel_class: str) -> bool:
    return kernel_class in SATURATING


def same_int8_results(gated_on: str, serving_on: str) -> bool:
    """Whether a model with int8 weights gated on one class computes alike on the other."""
    return u8s8_saturates(gated_on) == u8s8_saturates(serving_on)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Feature flags of the first processor (`flags` on x86, `Features` on arm64); empty if unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def this_cpu() -> str:
    """This machine's int8 kernel class."""
    return int8_kernel_class(platform.machine(), cpu_flags())
