"""The committed CRD is exactly what the generator writes, and a structural schema the API server takes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelfleet_operator import api, crdgen

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / "inferencemodel.yaml"
HELM_COPY = ROOT / "helm" / "modelfleet" / "files" / "inferencemodel.crd.yaml"  # templates/crd.yaml renders it


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, e.g. `.spec.engine.batch`."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.build_crd()


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    version = crd["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"])


def test_committed_crd_is_up_to_date() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == crdgen.render_crd(), (
        "crds/inferencemodel.yaml is stale: run `make manifests`"
    )


def test_helm_copy_is_up_to_date() -> None:
    assert HELM_COPY.read_text(encoding="utf-8") == crdgen.render_crd(), "helm CRD copy is stale: make manifests"


def test_the_chart_has_no_crds_folder() -> None:
    """Helm installs crds/ once and never upgrades it: the chart renders the CRD from templates/ instead."""
    assert not (ROOT / "helm" / "modelfleet" / "crds").exists()


def test_main_writes_every_output(tmp_path: Path) -> None:
    outputs = [tmp_path / "a" / "crd.yaml", tmp_path / "b.yaml"]
    assert crdgen.main([arg for out in outputs for arg in ("--output", str(out))]) == 0
    for out in outputs:
        assert yaml.safe_load(out.read_text()) == crdgen.build_crd()


def test_rendered_yaml_loads_back_to_the_dict(crd: dict[str, Any]) -> None:
    assert yaml.safe_load(crdgen.render_crd()) == crd


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert "$ref" not in node, path
        assert "$defs" not in node, path
        assert "title" not in node, path
        assert "additionalProperties" not in node or isinstance(node["additionalProperties"], dict), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:  # only the int-or-string form is structural
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert not isinstance(node.get(bound), int | float) or isinstance(node[bound], bool), path
        assert node.get("default", 0) is not None, path


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    properties = [(path, node) for path, node in walk(schema) if path and not path.endswith(("[]", "{}"))]
    missing = [path for path, node in properties if path != ".metadata" and not node.get("description")]
    assert missing == []


def test_optional_fields_are_nullable(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["replicas"]["nullable"] is True
    assert spec["autoscaling"]["nullable"] is True
    assert spec["model"]["properties"]["sha256"]["nullable"] is True
    assert "nullable" not in spec["model"]["properties"]["uri"]


def test_defaults_enums_and_bounds_are_kept(schema: dict[str, Any]) -> None:
    engine = schema["properties"]["spec"]["properties"]["engine"]
    assert engine["properties"]["precision"]["default"] == "fp16"
    assert engine["properties"]["precision"]["enum"] == ["fp32", "fp16", "int8", "fp8"]
    level = engine["properties"]["tensorrt"]["properties"]["builderOptimizationLevel"]
    assert (level["minimum"], level["maximum"], level["default"]) == (0, 5, 3)
    p99 = schema["properties"]["spec"]["properties"]["autoscaling"]["properties"]["targetP99LatencyMilliseconds"]
    assert (p99["minimum"], p99["exclusiveMinimum"]) == (0, True)


def test_nested_object_defaults_are_expanded(schema: dict[str, Any]) -> None:
    """The API server checks a default against CEL rules without defaulting inside it: `{}` would fail."""
    engine = schema["properties"]["spec"]["properties"]["engine"]
    assert engine["default"]["batch"] == {"min": 1, "opt": 16, "max": 32}
    assert engine["properties"]["batch"]["default"] == {"min": 1, "opt": 16, "max": 32}


def test_status_has_no_defaults_but_an_unobserved_generation(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]
    assert status["default"] == {"observedGeneration": 0}  # kstatus: an unreconciled model reads InProgress
    inner = {**status, "default": None}
    assert [path for path, node in walk(inner) if node.get("default") is not None] == []


def test_quantities_are_int_or_string(schema: dict[str, Any]) -> None:
    cpu = schema["properties"]["spec"]["properties"]["serving"]["properties"]["resources"]["properties"]["cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True
    assert cpu["pattern"] == api.QUANTITY_PATTERN
    assert cpu["default"] == "2"


def test_affinity_preserves_unknown_fields(schema: dict[str, Any]) -> None:
    placement = schema["properties"]["spec"]["properties"]["serving"]["properties"]["placement"]
    assert placement["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True


def test_list_types(schema: dict[str, Any]) -> None:
    spec, status = schema["properties"]["spec"]["properties"], schema["properties"]["status"]["properties"]
    assert spec["engine"]["properties"]["architectures"]["x-kubernetes-list-type"] == "set"
    for name, key in (("conditions", "type"), ("engines", "architecture"), ("architectures", "name")):
        assert status[name]["x-kubernetes-list-type"] == "map"
        assert status[name]["x-kubernetes-list-map-keys"] == [key]
        assert key in status[name]["items"]["required"]  # a list-map key must be required


def test_cel_iterated_lists_and_strings_are_bounded(schema: dict[str, Any]) -> None:
    """The API server refuses rules whose estimated cost is unbounded; maxItems/maxLength bound it."""
    for path, node in walk(schema["properties"]["spec"], ".spec"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path


def test_cel_rules_are_many_and_messages_name_fields(schema: dict[str, Any]) -> None:
    rendered = [rule for _, node in walk(schema) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rendered) >= 6
    declared = {value.rule: value for value in vars(api).values() if isinstance(value, api.CelRule)}
    assert {r["rule"] for r in rendered} == set(declared)  # each declared rule is used, nothing else is
    for rule in rendered:
        assert rule["message"] == declared[rule["rule"]].message
        assert any(word in rule["message"] for word in FIELD_WORDS), rule


FIELD_WORDS = (
    "uri",
    "sha256",
    "batch",
    "shapes",
    "precision",
    "calibration",
    "architectures",
    "maxBatchSize",
    "preferredBatchSizes",
    "gpu",
    "toleration",
    "minReplicas",
    "targetQPSPerReplica",
    "metadata.name",
)


def test_cross_field_rules_present(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    engine = spec["properties"]["engine"]
    rules = {r["rule"] for r in engine["x-kubernetes-validations"]}
    assert api.FP8_ARCHITECTURES.rule in rules
    assert api.CALIBRATION_INT8.rule in rules
    batch_rules = engine["properties"]["batch"]["x-kubernetes-validations"]
    assert batch_rules == [{"rule": api.BATCH_ORDER.rule, "message": api.BATCH_ORDER.message}]
    autoscaling = spec["properties"]["autoscaling"]["x-kubernetes-validations"]
    assert {r["rule"] for r in autoscaling} == {api.AUTOSCALING_BOUNDS.rule, api.AUTOSCALING_TARGET.rule}
    model = spec["properties"]["model"]["x-kubernetes-validations"]
    assert model[0]["fieldPath"] == ".sha256"
    assert model[0]["reason"] == "FieldValueRequired"


def test_names_subresources_and_columns(crd: dict[str, Any]) -> None:
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "inferencemodels.modelfleet.io"
    assert crd["spec"]["group"] == "modelfleet.io"
    assert "im" in names["shortNames"]
    assert names["categories"] == ["modelfleet"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["served"]
    assert version["storage"]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Engines", "Replicas", "QPS", "P99", "Age"]


def test_printer_columns_point_at_schema_fields(crd: dict[str, Any], schema: dict[str, Any]) -> None:
    paths = {path for path, _ in walk(schema)}
    for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        json_path = column["jsonPath"].split("[")[0]
        assert json_path in paths or json_path == ".metadata.creationTimestamp", column


def test_generator_refuses_what_it_cannot_render() -> None:
    with pytest.raises(crdgen.SchemaError, match="anyOf"):
        crdgen._structural({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, {}, status=False)
