"""Shipped workflows validate against the node schemas; the validator catches broken graphs."""

import copy
import json

import pytest

from nimblediff.workflow_check import WORKFLOWS, api_to_ui, validate_api, validate_file, validate_ui

API = sorted((WORKFLOWS / "api").glob("*.json"))
UI = sorted(p for p in WORKFLOWS.glob("*.json") if p.name != "core_nodes.json")


def test_there_are_shipped_workflows_in_both_formats():
    assert API and UI
    assert {p.stem for p in API} == {p.stem for p in UI}


@pytest.mark.parametrize("path", API + UI, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_workflow_is_valid(path):
    assert validate_file(path) == []


def test_validator_reports_wrong_link_type_unknown_node_and_bad_widget():
    api = json.loads(API[0].read_text())
    broken = copy.deepcopy(api)
    sampler = next(k for k, n in broken.items() if n["class_type"] == "SamplerCustom")
    broken[sampler]["inputs"]["sigmas"] = broken[sampler]["inputs"]["positive"]     # CONDITIONING into SIGMAS
    broken[sampler]["inputs"]["noise_seed"] = -5                                      # below min 0
    broken["99"] = {"class_type": "NoSuchNode", "inputs": {}}
    errors = "\n".join(validate_api(broken))
    assert "wants SIGMAS, linked to CONDITIONING" in errors
    assert "noise_seed=-5 outside" in errors
    assert "NoSuchNode" in errors


def test_ui_conversion_keeps_every_link_typed():
    for path in API:
        api = json.loads(path.read_text())
        ui = api_to_ui(api)
        assert validate_ui(ui) == []
        assert len(ui["links"]) == sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
