"""MLServer peer: a custom `mlserver.MLModel` running ONNX Runtime, adaptive batching, 2 parallel workers.

    python mlserver_peer.py --model PATH --name NAME --http-port N --grpc-port M --metrics-port K --workdir DIR

Writes settings.json and model-settings.json into DIR and runs `mlserver start` on it
(in this env, with this folder on PYTHONPATH so the workers can import `OnnxModel`). Adaptive batching:
max_batch_size 32, max_batch_time 0.005 s. Per-request debug logging is off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from ort_session import make_session, run

HERE = Path(__file__).resolve().parent


class OnnxModel(MLModel):
    async def load(self) -> bool:
        self.session = make_session(str(self.settings.parameters.uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outputs = [NumpyCodec.encode_output(n, a) for n, a in run(self.session, feeds).items()]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)


def write_settings(folder: Path, args: argparse.Namespace) -> None:
    server = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "metrics_port": args.metrics_port,
        "metrics_dir": str(folder / ".metrics"),  # its prometheus multiprocess files, else in the cwd
        "parallel_workers": args.workers,
    }
    model = {
        "name": args.name,
        "implementation": "mlserver_peer.OnnxModel",
        "max_batch_size": 32,
        "max_batch_time": 0.005,
        "parameters": {"uri": str(Path(args.model).resolve())},
    }
    (folder / "settings.json").write_text(json.dumps(server))
    (folder / args.name).mkdir()
    (folder / args.name / "model-settings.json").write_text(json.dumps(model))


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--name"):
        parser.add_argument(flag, required=True)
    for flag in ("--http-port", "--grpc-port", "--metrics-port"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", required=True, help="an empty folder for its settings files")
    args = parser.parse_args()
    folder = Path(args.workdir)
    write_settings(folder, args)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    mlserver = str(Path(sys.executable).parent / "mlserver")
    os.execv(mlserver, [mlserver, "start", str(folder)])


if __name__ == "__main__":
    main()
