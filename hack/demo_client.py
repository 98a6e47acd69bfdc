"""The demo's client side: NVIDIA's tritonclient against a model's Service, and steady load that counts failures.

Usage: demo_client.py infer HOST:PORT            (the test classifier's outputs for two rows, and a check)
       demo_client.py load HOST:PORT SECONDS_FILE (requests on new connections until the file exists; counts)
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.http as triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.modelzoo import FEATURES, classifier_reference


def infer(url: str) -> int:
    x = np.random.default_rng(1).standard_normal((2, FEATURES)).astype(np.float32)
    client = triton.InferenceServerClient(url=url)
    inputs = [triton.InferInput("input", list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    got = client.infer("classifier", inputs).as_numpy("probabilities")
    print("tritonclient: top-1 classes", got.argmax(axis=1).tolist(), "probabilities", got.round(4).tolist())
    ok = bool(np.allclose(got, classifier_reference(x), atol=1e-5))
    print("matches the NumPy reference:", ok)
    return 0 if ok else 1


def load(url: str, stop_file: str) -> int:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": [0.5] * FEATURES}]}
    ).encode()
    sent = failed = 0
    while not Path(stop_file).exists():
        request = urllib.request.Request(
            f"http://{url}/v2/models/classifier/infer", data=body, headers={"Content-Type": "application/json"}
        )
        sent += 1
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                failed += response.status != 200
        except (urllib.error.URLError, OSError):
            failed += 1
        time.sleep(0.02)
    print(f"load through the Service during the roll: {sent} requests, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    command, url, *rest = sys.argv[1:]
    sys.exit(infer(url) if command == "infer" else load(url, rest[0]))
