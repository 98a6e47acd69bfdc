"""Real `modelfleet serve` processes on loopback ports, serving real ONNX models built with onnx.helper."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.modelzoo import classifier_model, two_io_model

ROOT = Path(__file__).resolve().parents[2]
# Hang guards only: nothing below depends on how fast the machine is.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 120.0
_LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class ServerProcess:
    """One `python -m modelfleet_runtime.cli serve ...` child; port 0 and the log tell us where it listens."""

    def __init__(self, model: Path, name: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
        # No gRPC listener unless a test asks for one: servers run side by side, the default port is fixed.
        child_env.update({"MODELFLEET_INTRA_OP_THREADS": "1", "MODELFLEET_GRPC_PORT": "0", **(env or {})})
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet_runtime.cli",
                "serve",
                "--model",
                str(model),
                "--name",
                name,
                "--http-port",
                "0",
                "--host",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=child_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server never started listening:\n{self.log()}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while loading:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server never became ready:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics as {(name, {(label, value), ...}): value}."""
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                name, _, labels = key.partition("{")
                samples[(name, frozenset(_LABEL.findall(labels)))] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        wanted = frozenset({"model": self.name, **labels}.items())
        return self.metrics().get((name, wanted), 0.0)

    def final_counts(self) -> dict[str, int]:
        """The request counts (and `inflight`) from the log line a server writes when it has stopped."""
        match = re.search(r"stopped after draining \S+: (.*)$", self.log(), re.MULTILINE)
        assert match, f"no shutdown summary in the log:\n{self.log()}"
        return {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}

    def wait_metric(self, name: str, value: float, **labels: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.metric(name, **labels) == value:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{name}{labels} never reached {value} (now {self.metric(name, **labels)})")

    def terminate(self) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()


class ServerFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[ServerProcess] = []

    def __call__(self, model: Path, name: str, *, wait_ready: bool = True, **env: str) -> ServerProcess:
        log_path = self.tmp / f"{name}-{len(self.started)}.log"
        server = ServerProcess(model, name, log_path, {f"MODELFLEET_{k.upper()}": v for k, v in env.items()})
        self.started.append(server)
        if wait_ready:
            server.wait_ready()
        return server

    def cleanup(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "classifier": classifier_model(root / "classifier.onnx"),
        "two_io": two_io_model(root / "two_io.onnx"),
    }


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield factory
    factory.cleanup()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with their own settings for one test; each is killed at the end if still running."""
    factory = ServerFactory(tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def classifier_server(session_servers: ServerFactory, models: dict[str, Path]) -> ServerProcess:
    return session_servers(models["classifier"], "classifier", max_batch_size="16", max_request_bytes="200000")


@pytest.fixture(scope="session")
def two_io_server(session_servers: ServerFactory, models: dict[str, Path]) -> ServerProcess:
    return session_servers(models["two_io"], "two_io", max_batch_size="32", max_queue_delay_microseconds="2000")
