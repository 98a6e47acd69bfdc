"""The engine store: atomic publish under a real race between processes, and verification on read."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from modelfleet_runtime.build import store

KEY = "f" * 64


def stage(root: Path, payload: bytes) -> Path:
    staging = store.make_staging(root, KEY)
    (staging / "model.onnx").write_bytes(payload)
    manifest = {
        "key": KEY,
        "backend": "onnxruntime",
        "artifact": "model.onnx",
        "artifact_sha256": hashlib.sha256(payload).hexdigest(),
        "options": {"batch": {"min": 1, "opt": 1, "max": 1}},
    }
    store.write_manifest(staging, manifest)
    return staging


def _racer(root: str, index: int, barrier, results) -> None:
    staging = stage(Path(root), f"artifact built by racer {index}".encode())
    barrier.wait()  # every racer holds a complete staging directory: now all publish at once
    published = store.publish(store=Path(root), key=KEY, staging=staging)
    results.put((index, published.won, published.manifest["artifact_sha256"]))


def test_racing_publishers_leave_exactly_one_valid_entry(tmp_path: Path) -> None:
    racers = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(racers)
    results = context.Queue()
    processes = [context.Process(target=_racer, args=(str(tmp_path), i, barrier, results)) for i in range(racers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * racers
    outcomes = [results.get(timeout=5) for _ in range(racers)]
    winners = [o for o in outcomes if o[1]]
    assert len(winners) == 1
    entry = store.read_entry(tmp_path, KEY)
    assert entry.manifest is not None, entry.problem
    # Every loser reports the winner's entry, which is the one on disk.
    assert {o[2] for o in outcomes} == {entry.manifest["artifact_sha256"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY]


def test_read_entry_verifies_the_artifact(tmp_path: Path) -> None:
    assert store.read_entry(tmp_path, KEY) == store.Entry(None, None)
    store.publish(store=tmp_path, key=KEY, staging=stage(tmp_path, b"good"))
    assert store.read_entry(tmp_path, KEY).manifest is not None
    (tmp_path / KEY / "model.onnx").write_bytes(b"tampered")
    entry = store.read_entry(tmp_path, KEY)
    assert entry.manifest is None
    assert "sha256" in (entry.problem or "")


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        ({"key": "other", "artifact": "model.onnx", "artifact_sha256": "x"}, "key"),
        ({"key": KEY, "artifact": "../escape", "artifact_sha256": "x"}, "file name"),
        ({"key": KEY, "artifact": "model.onnx"}, "artifact_sha256"),
    ],
)
def test_untrustworthy_manifests_are_reported(tmp_path: Path, manifest: dict[str, object], needle: str) -> None:
    (tmp_path / KEY).mkdir()
    (tmp_path / KEY / "manifest.json").write_text(json.dumps(manifest))
    entry = store.read_entry(tmp_path, KEY)
    assert entry.manifest is None
    assert needle in (entry.problem or "")


def test_publish_replaces_a_corrupt_entry(tmp_path: Path) -> None:
    (tmp_path / KEY).mkdir(parents=True)
    (tmp_path / KEY / "manifest.json").write_text("{not json")
    published = store.publish(store=tmp_path, key=KEY, staging=stage(tmp_path, b"fresh"))
    assert published.won
    assert store.read_entry(tmp_path, KEY).manifest is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY]


def test_publish_keeps_a_valid_entry_and_discards_ours(tmp_path: Path) -> None:
    store.publish(store=tmp_path, key=KEY, staging=stage(tmp_path, b"first"))
    late = stage(tmp_path, b"second")
    published = store.publish(store=tmp_path, key=KEY, staging=late)
    assert not published.won
    assert published.manifest["artifact_sha256"] == hashlib.sha256(b"first").hexdigest()
    assert not late.exists()
