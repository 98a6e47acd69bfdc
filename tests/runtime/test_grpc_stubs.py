"""The committed gRPC stubs are what grpcio-tools makes of the vendored proto today (none edited, none stale)."""

from __future__ import annotations

from pathlib import Path

from hack.grpc_stubs import GENERATED, PROTO, PROTO_DIR, generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == list(GENERATED)
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `python -m hack.grpc_stubs`"


def test_the_vendored_proto_keeps_its_license_and_service() -> None:
    text = (PROTO_DIR / PROTO).read_text()
    assert text.startswith("// Copyright 2020 kubeflow.org.")
    assert "Licensed under the Apache License, Version 2.0" in text
    assert "service GRPCInferenceService" in text
