"""The KubeRay manifest against the RayService CRD's own OpenAPI schema.

The CRD is KubeRay's (``ray-operator/config/crd/bases/ray.io_rayservices.yaml`` at tag
v1.7.0, commit 59d663aeec13760646da3db9c1cf8cfe883e30b7), committed gzipped under
``deployments/kuberay/``. Kubernetes validates a custom resource with that schema, and
silently drops ("prunes") fields the schema does not declare, so both are checked: a
misspelt field would be lost without an error from ``kubectl apply``.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deployments" / "kuberay" / "ray.io_rayservices-v1.7.0.yaml.gz"
RAYSERVICE = REPO / "deployments" / "kuberay-rayservice.yaml"


@functools.cache
def rayservice_schema(version: str) -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` of API ``version`` (e.g. ``v1``)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"the CRD has no version {version}")


def pruned_fields(value: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Paths of ``value``'s fields that Kubernetes would prune (not in the schema)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from pruned_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from pruned_fields(item, extra, f"{path}.{key}")
            elif properties is not None and extra is not True:
                yield f"{path}.{key}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from pruned_fields(item, schema["items"], f"{path}[{index}]")


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RAYSERVICE.read_text())
    return loaded


def test_the_rayservice_manifest_is_valid_under_the_crd_schema() -> None:
    document = manifest()
    assert document["apiVersion"] == "ray.io/v1"
    schema = rayservice_schema("v1")
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_no_field_of_the_manifest_would_be_pruned() -> None:
    assert list(pruned_fields(manifest(), rayservice_schema("v1"))) == []


def problems(document: dict[str, Any]) -> list[str]:
    """Schema errors (path: message) and pruned fields of ``document``."""
    schema = rayservice_schema("v1")
    errors = jsonschema.Draft7Validator(schema).iter_errors(document)
    found = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    return found + [f"pruned: {path}" for path in pruned_fields(document, schema)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["spec"].update(serveConfigV2=3), "spec.serveConfigV2: 3 is not of type"),
        (
            lambda m: m["spec"]["rayClusterConfig"].update(rayVersin="2.60.0"),
            "pruned: .spec.rayClusterConfig.rayVersin",
        ),
    ],
)
def test_the_checks_catch_a_wrong_type_and_a_misspelt_field(change: Any, expected: str) -> None:
    document = manifest()
    assert problems(document) == []
    change(document)
    assert any(found.startswith(expected) for found in problems(document)), problems(document)
