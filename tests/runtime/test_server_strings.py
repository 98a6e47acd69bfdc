"""BYTES tensors through a real server and a real string model: what the client sends is what the model sees."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.modelzoo import HELLO, strings_model, strings_reference
from tests.runtime.conftest import ServerFactory, ServerProcess

# UTF-8 in every length class, an empty string, NUL inside and at both ends, and the repr trap itself.
WORDS = [HELLO, "abc", "", "a\x00b", "\x00", "日本語", "🙂 emoji", "b'abc'", "tab\tand\nnewline", "ÿ" * 300]


@pytest.fixture(scope="module")
def strings_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    factory = ServerFactory(tmp_path_factory.mktemp("strings"))
    model = strings_model(tmp_path_factory.mktemp("models") / "strings.onnx")
    # A long queue delay and maxBatchSize 4: requests sent together share batches of object arrays.
    yield factory(model, "strings", max_batch_size="4", max_queue_delay_microseconds="200000")
    factory.cleanup()


def client_for(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=server.host, concurrency=8, network_timeout=120)


def text_input(values: np.ndarray, *, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput("text", list(values.shape), "BYTES")
    inp.set_data_from_numpy(values, binary_data=binary)
    return inp


def as_sent(tagged: np.ndarray, *, binary: bool) -> list[list[object]]:
    """What tritonclient gives for a BYTES output: bytes when it travelled binary, str when in JSON."""
    return [[s.encode() if binary else s for s in row] for row in tagged]


def outputs(*, binary: bool) -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("tagged", "is_hello")]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_utf8_strings_reach_the_model_and_come_back_exactly(strings_server: ServerProcess, binary: bool) -> None:
    text = np.array([WORDS], dtype=np.object_)
    result = client_for(strings_server).infer(
        "strings", [text_input(text, binary=binary)], outputs=outputs(binary=binary)
    )
    want_tagged, want_hello = strings_reference(text)
    assert result.as_numpy("tagged").tolist() == as_sent(want_tagged, binary=binary)
    assert result.as_numpy("is_hello").tolist() == want_hello.tolist() == [[True] + [False] * (len(WORDS) - 1)]


def test_json_strings_come_back_as_json_strings(strings_server: ServerProcess) -> None:
    body = {"inputs": [{"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": [["λ", "a\x00b"], ["", HELLO]]}]}
    response = requests.post(f"{strings_server.url}/v2/models/strings/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = {o["name"]: o for o in response.json()["outputs"]}
    assert got["tagged"] == {
        "name": "tagged",
        "datatype": "BYTES",
        "shape": [2, 2],
        "data": ["<λ>", "<a\x00b>", "<>", f"<{HELLO}>"],
    }
    assert got["is_hello"]["data"] == [False, False, False, True]


def test_binary_bytes_are_taken_as_the_utf8_they_are(strings_server: ServerProcess) -> None:
    # Raw UTF-8 bytes (not str) through the binary extension: the model sees the text they encode.
    text = np.array([[HELLO.encode(), b"\xe2\x82\xac", b"\x00\x01\x7f"]], dtype=np.object_)
    result = client_for(strings_server).infer("strings", [text_input(text, binary=True)], outputs=outputs(binary=True))
    assert result.as_numpy("tagged").tolist() == [[b"<" + s + b">" for s in text[0]]]
    assert result.as_numpy("is_hello").tolist() == [[True, False, False]]


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"ok\x80", b"\xed\xa0\x80"], ids=["bom", "stray", "surrogate"])
def test_bytes_that_are_not_utf8_are_400_naming_the_element(strings_server: ServerProcess, bad: bytes) -> None:
    # ONNX Runtime's Python API carries string tensors as UTF-8 text only: refused, never altered.
    text = np.array([[b"fine", bad]], dtype=np.object_)
    with pytest.raises(InferenceServerException) as info:
        client_for(strings_server).infer("strings", [text_input(text, binary=True)])
    assert info.value.status() == "400"
    assert "input 'text': element 1 is not valid UTF-8" in info.value.message()


def test_concurrent_string_requests_share_batches_and_get_their_own_rows(strings_server: ServerProcess) -> None:
    client = client_for(strings_server)
    before = strings_server.metric("modelfleet_batch_size_count")
    texts = [np.array([[f"{i}:{w}" for w in WORDS[:3]]], dtype=np.object_) for i in range(8)]
    texts[5] = np.array([[HELLO, "x", "y"]], dtype=np.object_)
    pending = [
        client.async_infer("strings", [text_input(t, binary=i % 2 == 0)], outputs=outputs(binary=i % 3 == 0))
        for i, t in enumerate(texts)
    ]
    for i, (text, request) in enumerate(zip(texts, pending, strict=True)):
        result = request.get_result(timeout=120)
        want_tagged, want_hello = strings_reference(text)
        assert result.as_numpy("tagged").tolist() == as_sent(want_tagged, binary=i % 3 == 0)
        assert result.as_numpy("is_hello").tolist() == want_hello.tolist()
    assert strings_server.metric("modelfleet_batch_size_count") - before < len(texts), "no two requests shared a batch"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([1, 2], "input 'text': BYTES data must be strings, found an integer (1)"),
        (["a", None], "input 'text': BYTES data must be strings, found null (null)"),
        ([["a"], ["b", "c"]], "input 'text': 'data' is a ragged nested list"),
        ("ab", "input 'text': 'data' must be a list, got a string"),
    ],
)
def test_json_bytes_data_must_be_strings(strings_server: ServerProcess, data: object, needle: str) -> None:
    body = {"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": data}]}
    response = requests.post(f"{strings_server.url}/v2/models/strings/infer", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_a_string_model_is_described_as_bytes(strings_server: ServerProcess) -> None:
    meta = requests.get(f"{strings_server.url}/v2/models/strings", timeout=60).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, -1]}]
    assert [o["datatype"] for o in meta["outputs"]] == ["BYTES", "BOOL"]
