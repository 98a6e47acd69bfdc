"""The one ONNX Runtime session every peer adapter builds: modelfleet's CPU session options, copied exactly.

Copied from runtime/modelfleet_runtime/backends/onnxruntime.py (OnnxRuntimeBackend.__init__) with the
benchmark's values: 1 intra-op and 1 inter-op thread, sequential execution, ORT_ENABLE_ALL, no spinning.
The peers run in their own environments and must not import modelfleet, hence the copy.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def make_session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def output_names(session: ort.InferenceSession) -> list[str]:
    return [o.name for o in session.get_outputs()]


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, each a C-contiguous array (the servers serialise them)."""
    names = output_names(session)
    return dict(zip(names, (np.ascontiguousarray(a) for a in session.run(names, feeds)), strict=True))
