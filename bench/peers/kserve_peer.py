"""KServe peer: `kserve.ModelServer` (OIP v2 REST) with a custom `kserve.Model` that runs ONNX Runtime.

    python kserve_peer.py --model PATH --name NAME --http_port N --grpc_port M --workers 2 \
        --enable_latency_logging false --workdir DIR

Run with the KServe env's python (bench/peer_envs.py); the ModelServer's own flags pass through.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.multiprocess.server import RESTServerProcess
from ort_session import make_session, run

_DATATYPES = {"float32": "FP32", "int64": "INT64"}


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = make_session(self.path)
        self.ready = True
        return self.ready

    def __getstate__(self) -> dict[str, Any]:
        # With --workers > 1 KServe spawns its REST workers and pickles the model: each loads its own session.
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        outputs = [
            InferOutput(name=n, shape=list(a.shape), datatype=_DATATYPES[str(a.dtype)], data=a)
            for n, a in run(self.session, feeds).items()
        ]
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )


def patient_workers() -> None:
    """KServe's parent restarts a REST worker that does not answer a ping within 5 s; a spawned worker spends
    longer than that importing kserve on a loaded 2-core machine, so it was killed in a loop. 60 s instead."""
    check = RESTServerProcess.is_alive

    def is_alive(self: RESTServerProcess, timeout: float = 60) -> bool:
        return check(self, timeout)

    RESTServerProcess.is_alive = is_alive


def quiet_access_log(workdir: Path) -> None:
    """KServe's own log config, less uvicorn's line per request (the other servers log none either)."""
    config = copy.deepcopy(kserve.logging.KSERVE_LOG_CONFIG)
    config["loggers"]["uvicorn.access"]["level"] = "WARNING"
    path = workdir / "kserve-log.json"
    path.write_text(json.dumps(config))
    kserve.model_server.args.log_config_file = str(path)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--workdir", required=True, help="an existing folder for its log config")
    args, _ = parser.parse_known_args()
    patient_workers()
    quiet_access_log(Path(args.workdir))
    kserve.ModelServer().start([OnnxModel(args.name, args.model)])


if __name__ == "__main__":
    main()
