"""The peers' own Python environments for `make bench-peers`: one pinned venv per server, made once, reused.

Each peer gets `~/.cache/modelfleet/peers/<name>-<version>/`, created with `uv venv --python 3.11` and filled
with `uv pip install`; the project's own ONNX Runtime version (from uv.lock) is pinned in each, so every
server runs the same engine. A stamp file holding the exact requirement list makes this idempotent: an env
whose stamp matches is used as it is, anything else is made anew.

    python -m bench.peer_envs [name ...]     # create (or check) the envs, print their sizes and install times
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".modelfleet-peer-requirements"
UV_VERSION = "0.13.9"  # the Makefile's


@dataclass(frozen=True)
class Peer:
    name: str
    version: str
    requirements: tuple[str, ...]

    @property
    def env(self) -> Path:
        return peers_home() / f"{self.name}-{self.version}"

    @property
    def python(self) -> Path:
        return self.env / "bin" / "python"


def peers_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "modelfleet" / "peers"


def locked_version(package: str) -> str:
    """The version uv.lock pins for `package` (the project's own ONNX Runtime)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {p["version"] for p in lock["package"] if p["name"] == package}
    if len(versions) != 1:
        raise RuntimeError(f"uv.lock pins {package} {sorted(versions)}; expected exactly one version")
    return versions.pop()


def peers() -> dict[str, Peer]:
    ort = f"onnxruntime=={locked_version('onnxruntime')}"
    return {
        # MLServer 1.7.1 predates uvloop 0.22, whose get_event_loop() raises in its parallel workers.
        "mlserver": Peer("mlserver", "1.7.1", ("mlserver==1.7.1", "uvloop==0.21.0", ort)),
        "kserve": Peer("kserve", "0.21.0", ("kserve==0.21.0", ort)),
        "pytriton": Peer("pytriton", "0.7.0", ("nvidia-pytriton==0.7.0", ort)),
    }


def uv() -> str:
    """$UV (the Makefile passes its pinned uv), else the Makefile's pinned path, else one on PATH."""
    pinned = Path.home() / ".cache" / "modelfleet" / f"uv-{UV_VERSION}" / "bin" / "uv"
    found = os.environ.get("UV") or (str(pinned) if pinned.exists() else shutil.which("uv"))
    if not found:
        raise RuntimeError("uv not found: run `make install` first")
    return found


def _stamp_text(peer: Peer) -> str:
    return "\n".join(peer.requirements) + "\n"


def is_ready(peer: Peer) -> bool:
    stamp = peer.env / STAMP
    return peer.python.exists() and stamp.exists() and stamp.read_text() == _stamp_text(peer)


def ensure(peer: Peer) -> float:
    """Create `peer`'s env unless its stamp matches; returns the seconds spent (0.0 when it was ready)."""
    if is_ready(peer):
        return 0.0
    began = time.monotonic()
    shutil.rmtree(peer.env, ignore_errors=True)
    peer.env.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([uv(), "venv", "--python", "3.11", str(peer.env)], check=True)
    subprocess.run([uv(), "pip", "install", "--python", str(peer.python), *peer.requirements], check=True)
    (peer.env / STAMP).write_text(_stamp_text(peer))
    return time.monotonic() - began


def size_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout
    match = re.match(r"(\d+)", out)
    return float(match.group(1)) if match else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="peers to create (default: all)")
    args = parser.parse_args(argv)
    known = peers()
    for name in args.names or list(known):
        peer = known[name]
        seconds = ensure(peer)
        print(f"{peer.name} {peer.version}: {peer.env} ({size_mb(peer.env):.0f} MB; install {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
