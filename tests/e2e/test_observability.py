"""What an operator's user observes of it: JSON log lines naming the object, /metrics, Events counted not copied."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.commands import MODELFLEET
from tests.e2e.conftest import Cluster, OperatorProcess, free_port, wait_for
from tests.e2e.test_operator import apply_model, condition, events, model_status, wait_ready
from tests.operator.test_observability_chart import dashboard_metric_names, exported_names

ARCHS = 4  # the KWOK cluster's GPU architectures: sm75, sm80, sm89, sm90


def json_lines(log: str) -> list[dict[str, Any]]:
    """Every line of the operator's log, parsed; a line that is not JSON fails the test."""
    out = []
    for line in log.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


def samples(scrape: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
        if s.name == name
    ]


def total(scrape: str, metric: str, **labels: str) -> float:
    return sum(v for ls, v in samples(scrape, metric) if labels.items() <= ls.items())


def test_a_model_s_life_is_told_in_json_lines_metrics_and_counted_events(
    cluster: Cluster, model_namespace: str, operator: OperatorProcess
) -> None:
    ns, obj = model_namespace, f"{model_namespace}/clf"
    apply_model(cluster, ns, replicas=1)
    wait_ready(cluster, ns)
    mine = wait_for(
        "the decisions' log lines",
        lambda: (
            (lines := [f for f in json_lines(operator.log()) if f.get("object") == obj])
            and any(f["msg"] == "build finished" for f in lines)
            and any(f.get("condition") == "Ready" and f.get("status") == "True" for f in lines)
            and any(f.get("event") and f["reason"] == "Ready" for f in lines)  # logged after the status patch
            and lines
        ),
        timeout=60,
    )
    for line in mine[:12]:
        print(json.dumps(line))
    assert all((f["namespace"], f["name"], f["kind"]) == (ns, "clf", "InferenceModel") for f in mine)
    started = [f for f in mine if f["msg"] == "build started"]
    finished = [f for f in mine if f["msg"] == "build finished"]
    assert len(started) == ARCHS and {f["child_kind"] for f in started} == {"Job"}
    assert len(finished) == ARCHS and {f["outcome"] for f in finished} == {"succeeded"}
    assert any(f["msg"] == "Deployment created" for f in mine)
    assert {f["reason"] for f in mine if f.get("event")} >= {
        "BuildStarted",
        "EngineReady",
        "DeploymentCreated",
        "Ready",
    }
    everything = json_lines(operator.log())
    assert not [f for f in everything if "succeeded" in f["msg"] and "Handler" in f["msg"]]
    assert not [f for f in everything if f["logger"].startswith("kopf.objects") and f["level"] == "info"]

    scrape = operator.scrape()
    print("\n".join(line for line in scrape.splitlines() if _excerpt(line)))
    assert total(scrape, "controller_runtime_reconcile_total", controller="inferencemodel", result="success") > 0
    assert total(scrape, "modelfleet_builds_total", outcome="succeeded") >= ARCHS
    assert total(scrape, "modelfleet_models", condition="Ready", status="True") >= 1
    assert total(scrape, "rest_client_requests_total", method="PATCH", code="200") > 0
    assert total(scrape, "workqueue_adds_total", name="inferencemodel") > 0
    operator_side = {n for n in dashboard_metric_names() if not _runtime_metric(n)}
    assert operator_side - exported_names(scrape) == set()

    # The same occurrence again: a broken version, then back to the good one, announces EngineReady and
    # Ready a second time with the same message; each is counted on the Event already there.
    set_uri(cluster, ns, "pvc://models/clf/broken-export.onnx")
    wait_for("Stalled=True", lambda: condition(model_status(cluster, ns), "Stalled").get("status") == "True")
    set_uri(cluster, ns, "pvc://models/clf/model.onnx")
    wait_ready(cluster, ns)
    repeated = wait_for(
        "an Event with count >= 2",
        lambda: [e for e in events(cluster, ns) if e["reason"] in {"EngineReady", "Ready"} and e.get("count", 1) >= 2],
        timeout=60,
    )
    print([(e["reason"], e["count"], e["message"][:60]) for e in repeated])
    copies = Counter((e["involvedObject"]["uid"], e["type"], e["reason"], e["message"]) for e in events(cluster, ns))
    assert max(copies.values()) == 1, "a repeated Event was created again instead of counted"
    assert all(e["lastTimestamp"] >= e["firstTimestamp"] for e in repeated)
    assert total(operator.scrape(), "modelfleet_builds_total", outcome="failed") >= ARCHS


def set_uri(cluster: Cluster, namespace: str, uri: str) -> None:
    patch = json.dumps({"spec": {"model": {"uri": uri}}})
    cluster.kubectl("-n", namespace, "patch", "inferencemodel", "clf", "--type=merge", "-p", patch)


def _runtime_metric(name: str) -> bool:
    runtime = ("requests", "request_duration", "queue_duration", "compute_duration", "batch_size", "queue_depth")
    return any(name.startswith(f"modelfleet_{r}") for r in (*runtime, "inflight"))


def _excerpt(line: str) -> bool:
    wanted = ("controller_runtime_reconcile_total", "modelfleet_builds_total", "modelfleet_models", "workqueue_depth")
    return line.startswith(wanted) or (line.startswith("rest_client_requests_total") and "PATCH" in line)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("election", ["--leader-election", "--no-leader-election"])
def test_an_unreachable_api_server_gives_a_handful_of_lines_without_tracebacks(
    cluster: Cluster, tmp_path: Path, election: str
) -> None:
    """An outage from the operator's side: its API server address refuses every connection for 12 s."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    closed = free_port()  # nothing listens there
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{closed}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MODELFLEET_OPERATOR_RESYNC_SECONDS": "5"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*MODELFLEET, "operator", "--liveness-port=0", "--log-format=json", election],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(12)  # the outage's length, not a bound on anything
            assert proc.poll() is None, f"the operator exited during the outage:\n{log_path.read_text()[-3000:]}"
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    text = log_path.read_text(errors="replace")
    lines = json_lines(text)
    # kopf's request retries when it acts at once; the Lease's attempts while a candidate waits for it.
    during = [f for f in lines if "Request attempt" in f["msg"] or "(retrying)" in f["msg"]]
    print(f"{len(lines)} lines in all, {len(during)} about failed requests; first ones:")
    for f in lines[:8]:
        print(json.dumps(f)[:300])
    assert "Traceback" not in text
    assert during and all(f["level"] == "warning" and f.get("transient") is True for f in during)
    assert not [f for f in during if "will retry" in f["msg"] and f["retry"] > 1], "later attempts are debug lines"
    assert len(lines) < 40
