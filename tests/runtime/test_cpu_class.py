"""The int8 kernel class of a CPU, and the runtime's refusal to serve a CPU-dependent artifact elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfleet_runtime import loader
from modelfleet_runtime.build import cpu

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(
    ("machine", "flags", "expected", "saturates"),
    [
        ("x86_64", AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"}, "amx", False),
        ("x86_64", AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}, "avx512-vnni", False),
        ("x86_64", AVX2 | {"avx_vnni"}, "avx-vnni", False),
        ("x86_64", AVX2 | {"avx512f", "avx512bw"}, "avx512", True),
        ("x86_64", AVX2, "avx2", True),  # this project's CI machines: AMD EPYC, AVX2 only
        ("AMD64", frozenset({"sse4_2"}), "sse", True),
        ("aarch64", frozenset({"fp", "asimd", "asimddp"}), "arm64-dotprod", False),
        ("arm64", frozenset({"fp", "asimd"}), "arm64", False),
    ],
)
def test_kernel_class_follows_the_cpu_flags(
    machine: str, flags: frozenset[str], expected: str, saturates: bool
) -> None:
    assert cpu.int8_kernel_class(machine, flags) == expected
    assert cpu.u8s8_saturates(expected) is saturates


def test_flags_are_read_from_cpuinfo_on_x86_and_arm(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu.cpu_flags(x86) == {"fpu", "sse", "avx2", "fma"}
    assert cpu.cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert cpu.cpu_flags(tmp_path / "missing") == frozenset()


def entry(tmp_path: Path, details: dict[str, object]) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"")
    manifest = {"key": "k", "backend": "onnxruntime", "artifact": "model.onnx", "details": details}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_a_cpu_dependent_artifact_is_refused_on_another_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = entry(tmp_path, {"int8Portable": False, "cpuInt8Kernel": "avx512-vnni"})
    monkeypatch.setattr(cpu, "this_cpu", lambda: "avx2")
    with pytest.raises(loader.ModelLoadError, match=r"'avx512-vnni'.*'avx2'.*saturate"):
        loader.build_model_source(path)
    monkeypatch.setattr(cpu, "this_cpu", lambda: "amx")  # also exact int32 sums: the same results
    assert loader.build_model_source(path).backend == "onnxruntime"


def test_a_portable_artifact_is_served_on_any_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = entry(tmp_path, {"int8Portable": True, "cpuInt8Kernel": "avx512-vnni"})
    monkeypatch.setattr(cpu, "this_cpu", lambda: "avx2")
    assert loader.build_model_source(path).artifact == path / "model.onnx"
