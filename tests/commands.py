"""How tests start the `modelfleet` command: with the interpreter running them, so any environment that has the
project installed works, not only `make`'s .venv."""

from __future__ import annotations

import sys

MODELFLEET: tuple[str, ...] = (sys.executable, "-m", "modelfleet_runtime.cli")
