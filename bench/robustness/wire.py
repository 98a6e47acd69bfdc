"""Raw-socket HTTP for abuse: exact bytes out, statuses back, a health prober, and the serve process itself."""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
# Statuses for answers that were not HTTP responses.
CLOSED, TIMEOUT, REFUSED = "closed", "timeout", "refused"


# Servers start with the soft descriptor limit a container gets by default (1,024), whatever this shell has.
_HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
_SERVER_NOFILE = (min(1024, _HARD_NOFILE), _HARD_NOFILE)


def _child_setup() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, _SERVER_NOFILE)
    # PR_SET_PDEATHSIG: a server dies with the bench, even when the bench is killed.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def raise_fd_limit() -> int:
    """The idle flood needs more than the default 1,024 descriptors on the client side."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- one exchange -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back on a connection: HTTP statuses in order, the raw bytes, and how it ended."""

    statuses: list[int] = field(default_factory=list)
    raw: bytes = b""
    end: str = CLOSED
    seconds: float = 0.0

    @property
    def first(self) -> str:
        return str(self.statuses[0]) if self.statuses else self.end

    def json_errors(self) -> bool:
        """Every error response on the connection carries a JSON {"error": ...} body."""
        bodies = [part.split(b"\r\n\r\n", 1)[-1] for part in re.split(rb"(?=HTTP/1\.[01] )", self.raw) if part]
        for status, body in zip(self.statuses, bodies, strict=False):
            if status >= 400:
                try:
                    # From the first "{" to the last "}": a chunked body's size line and end go.
                    doc = json.loads(body[max(body.find(b"{"), 0) : body.rfind(b"}") + 1] or b"null")
                except ValueError:
                    return False
                if not (isinstance(doc, dict) and isinstance(doc.get("error"), str)):
                    return False
        return True


def exchange(
    port: int, payload: bytes | list[bytes], *, timeout: float = 5.0, gap: float = 0.0, want: int = 1
) -> Answer:
    """Write `payload` (pieces `gap` seconds apart), read until `want` complete responses, EOF or `timeout`
    of silence.

    A server may answer before the payload is all written (431 for a header past its limit, 413) and close:
    the write then fails, and what the server sent before closing is still read, so the answer is the
    status it gave and not just "closed". A response counts once its body (Content-Length) has arrived,
    since a server may write a response's head and body separately.
    """
    began = time.perf_counter()
    answer = Answer()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return Answer(end=REFUSED)
    with sock:
        try:
            for piece in payload if isinstance(payload, list) else [payload]:
                sock.sendall(piece)
                if gap:
                    time.sleep(gap)
        except OSError:
            pass  # the server stopped reading: read what it answered before it closed
        try:
            while _complete(answer.raw) < want:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                answer.raw += chunk
            else:
                answer.end = "answered"
        except TimeoutError:
            answer.end = TIMEOUT
        except OSError:
            answer.end = CLOSED
        answer.statuses = [int(m) for m in _STATUS.findall(answer.raw)]
    answer.seconds = time.perf_counter() - began
    return answer


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def _complete(raw: bytes) -> int:
    """How many complete responses `raw` holds: a 1xx has no body; others are framed by Content-Length or
    chunked."""
    count = 0
    while raw:
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            break
        head, rest = raw[: end + 2], raw[end + 4 :]
        if head.startswith(b"HTTP/1.1 1"):
            size = 0
        elif b"transfer-encoding: chunked" in head.lower():
            size = _chunked_size(rest)
            if size < 0:
                break
        else:
            match = _LENGTH.search(head)
            size = int(match.group(1)) if match else 0
        if len(rest) < size:
            break
        raw = rest[size:]
        count += 1
    return count


def _chunked_size(body: bytes) -> int:
    """Bytes of a chunked body up to its last chunk's end, or -1 while it is incomplete."""
    at = 0
    while True:
        line_end = body.find(b"\r\n", at)
        if line_end < 0:
            return -1
        size = int(body[at:line_end].split(b";")[0] or b"0", 16)
        at = line_end + 2 + size + 2
        if at > len(body):
            return -1
        if size == 0:
            return at


def get(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


def post(path: str, port: int, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def probe(port: int, timeout: float = 1.0) -> float | None:
    """One kubelet-style readiness probe on a new connection: its latency in seconds, None if it failed."""
    answer = exchange(port, get("/v2/health/ready", port), timeout=timeout)
    return answer.seconds if answer.statuses[:1] == [200] and answer.seconds <= timeout else None


class Prober:
    """Readiness probes every `interval` seconds in a thread: latencies (failures as NaN) while it runs."""

    def __init__(self, port: int, interval: float = 0.05, timeout: float = 1.0) -> None:
        self.port, self.interval, self.timeout = port, interval, timeout
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            latency = probe(self.port, self.timeout)
            self.samples.append(np.nan if latency is None else latency)
            self._stop.wait(self.interval)

    def p99_ms(self) -> float:
        arr = np.array(self.samples)
        return float(np.percentile(np.where(np.isnan(arr), self.timeout, arr), 99) * 1e3) if arr.size else np.nan

    def max_ms(self) -> float:
        arr = np.array(self.samples)
        return float(np.nanmax(np.where(np.isnan(arr), self.timeout, arr)) * 1e3) if arr.size else np.nan

    def failures(self) -> int:
        return int(np.isnan(np.array(self.samples)).sum())


# --- the server ----------------------------------------------------------------------------------------------


class Serve:
    """One `modelfleet serve` child on a free loopback port; settings as MODELFLEET_* variables."""

    def __init__(self, model: Path, name: str, log: Path, *, ready: bool = True, **settings: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
        env.update({"MODELFLEET_INTRA_OP_THREADS": "1"})
        env.update({f"MODELFLEET_{k.upper()}": v for k, v in settings.items()})
        self.log_path = log
        self._log = log.open("wb")
        cmd = [sys.executable, "-m", "modelfleet_runtime.cli", "serve", "--model", str(model), "--name", name]
        cmd += ["--http-port", "0", "--host", "127.0.0.1"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,  # noqa: PLW1509 (setrlimit and prctl only)
        )
        self.port = self._wait(lambda: _port(self.log_path))
        if ready:
            self._wait(lambda: probe(self.port, 5.0) is not None or None)

    def _wait(self, check: object, limit: float = 300.0) -> int:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            value = check()  # type: ignore[operator]
            if value:
                return int(value)
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        raise TimeoutError(f"server not up: {self.log_path}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, limit: float) -> float | None:
        """Seconds until the process exited, None if it was still running after `limit` (then killed)."""
        began = time.monotonic()
        try:
            self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        return time.monotonic() - began

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self._log.close()


def _port(log: Path) -> int | None:
    match = re.search(r"listening on http://[^:]+:(\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None
