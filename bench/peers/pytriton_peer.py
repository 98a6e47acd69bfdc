"""PyTriton peer: Triton Inference Server (bundled by nvidia-pytriton, on CPU) calling ONNX Runtime in Python.

    python pytriton_peer.py --model PATH --name NAME --http-port N --grpc-port M --metrics-port K

Dynamic batching: max batch 32, 5 ms max queue delay; 2 model instances (two inference callables, each
with its own session). Tensor shapes come from the ONNX model (the batch axis dropped).
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from collections.abc import Callable
from typing import Any

import numpy as np
from ort_session import make_session, run
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def tensors(args: Any) -> list[Tensor]:
    """PyTriton tensor specs for ONNX Runtime's inputs or outputs: per-sample shape, -1 for dynamic axes."""
    return [
        Tensor(name=a.name, dtype=_DTYPES[a.type], shape=tuple(d if isinstance(d, int) else -1 for d in a.shape[1:]))
        for a in args
    ]


def make_infer(path: str) -> Callable[..., dict[str, np.ndarray]]:
    session = make_session(path)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return run(session, inputs)

    return infer


def use_this_libpython() -> None:
    """Triton's Python backend stub links libpython3.11.so dynamically: without this it finds the system's
    (Debian's 3.11.2) and runs it against this interpreter's 3.11.7 stdlib, which fails at model load."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--name"):
        parser.add_argument(flag, required=True)
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--instances", type=int, default=2)
    args = parser.parse_args()
    use_this_libpython()
    probe = make_session(args.model)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[make_infer(args.model) for _ in range(args.instances)],
            inputs=tensors(probe.get_inputs()),
            outputs=tensors(probe.get_outputs()),
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=5000)),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
