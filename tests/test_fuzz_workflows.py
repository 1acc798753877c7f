"""Fuzz workflow validation (workflow_check.py): random JSON, and the shipped workflows with nodes, inputs, links
and widget values mutated, through read_workflow / validate_file / validate_api / validate_ui / api_to_ui.

Invariants: the validators return a list of messages (str) or raise a NimbleDiffError; nothing else escapes;
an unmodified shipped workflow stays valid (the mutations start from it). Profiles: tests/test_fuzz_support.py.
"""

import copy
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")  # the [test] extra; `make report-newest` installs pytest alone
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_fuzz_support as fz  # noqa: E402

from nimblediff.workflow_check import (TEMPLATES, WORKFLOWS, api_to_ui, node_schemas, read_workflow, validate_api,  # noqa: E402
                                       validate_file, validate_ui)

API = {p.name: json.loads(p.read_text()) for p in sorted((WORKFLOWS / "api").glob("*.json"))}
UI = {p.name: json.loads(p.read_text()) for p in sorted(TEMPLATES.glob("*.json"))}

scalars = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=10)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    fz.report(__name__)


@pytest.fixture(scope="module")
def schemas():
    return node_schemas()


def _pick(draw, container):
    if not isinstance(container, (dict, list)):
        return None
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    return draw(st.sampled_from(keys)) if keys else None


@st.composite
def api_workflows(draw):
    wf = copy.deepcopy(API[draw(st.sampled_from(sorted(API)))])
    for _ in range(draw(st.integers(1, 5))):
        node_id = _pick(draw, wf)
        if node_id is None:
            break
        node = wf[node_id]
        op = draw(st.sampled_from(["value", "link", "drop_input", "class", "node", "inputs", "new_input", "drop"]))
        if op in ("value", "link", "drop_input") and isinstance(node, dict) and isinstance(node.get("inputs"), dict) \
                and node["inputs"]:
            name = _pick(draw, node["inputs"])
            if op == "value":
                node["inputs"][name] = draw(json_values)
            elif op == "link":
                node["inputs"][name] = [draw(st.sampled_from(list(wf)) | st.text(max_size=3) | st.integers(-2, 99)),
                                        draw(st.integers(-3, 9) | st.floats())]
            else:
                node["inputs"].pop(name)
        elif op == "class" and isinstance(node, dict):
            node["class_type"] = draw(json_values | st.sampled_from(sorted(API[sorted(API)[0]].get("1", {}))))
        elif op == "node":
            wf[node_id] = draw(json_values)
        elif op == "inputs" and isinstance(node, dict):
            node["inputs"] = draw(json_values)
        elif op == "new_input" and isinstance(node, dict) and isinstance(node.get("inputs"), dict):
            node["inputs"][draw(st.text(max_size=8))] = draw(json_values)
        elif op == "drop":
            wf.pop(node_id)
    return wf


@st.composite
def ui_workflows(draw):
    wf = copy.deepcopy(UI[draw(st.sampled_from(sorted(UI)))])
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["link", "link_field", "node", "node_field", "input", "top"]))
        if op in ("link", "link_field") and isinstance(wf.get("links"), list) and wf["links"]:
            i = _pick(draw, wf["links"])
            if op == "link":
                wf["links"][i] = draw(json_values)
            elif isinstance(wf["links"][i], list) and wf["links"][i]:
                wf["links"][i][_pick(draw, wf["links"][i])] = draw(json_values | st.integers(-2, 40))
        elif op in ("node", "node_field", "input") and isinstance(wf.get("nodes"), list) and wf["nodes"]:
            i = _pick(draw, wf["nodes"])
            node = wf["nodes"][i]
            if op == "node":
                wf["nodes"][i] = draw(json_values)
            elif op == "node_field" and isinstance(node, dict):
                node[draw(st.sampled_from(["id", "type", "inputs", "outputs", "widgets_values"]))] = draw(json_values)
            elif op == "input" and isinstance(node, dict) and isinstance(node.get("inputs"), list) and node["inputs"]:
                node["inputs"][_pick(draw, node["inputs"])] = draw(json_values)
        else:
            wf[draw(st.sampled_from(["nodes", "links", "extra"]))] = draw(json_values)
    return wf


def _messages(result):
    assert isinstance(result, list) and all(isinstance(m, str) for m in result), result
    return result


def test_shipped_workflows_are_valid(schemas):
    """The seeds of the mutations are valid as shipped: the fuzz below starts from real workflows."""
    for wf in API.values():
        assert validate_api(wf, schemas) == []
    for wf in UI.values():
        assert validate_ui(wf, schemas) == []


def test_mutated_api_workflows(schemas):
    @given(wf=api_workflows())
    def prop(wf):
        result, _ = fz.only_ours(validate_api, wf, schemas)
        if result is not None:
            _messages(result)
        fz.only_ours(api_to_ui, wf, schemas)
        fz.count("workflow: mutated API workflow (validate + to-ui)")

    prop()


def test_mutated_ui_workflows(schemas):
    @given(wf=ui_workflows())
    def prop(wf):
        result, _ = fz.only_ours(validate_ui, wf, schemas)
        if result is not None:
            _messages(result)
        fz.count("workflow: mutated UI workflow (validate)")

    prop()


def test_workflow_files(tmp_path_factory):
    """Files of any bytes or JSON: read_workflow raises WorkflowError, validate_file returns messages."""
    folder = tmp_path_factory.mktemp("wf")

    @given(content=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode())
           | api_workflows().map(lambda v: json.dumps(v).encode())
           | ui_workflows().map(lambda v: json.dumps(v).encode()),
           want=st.sampled_from([None, "api"]))
    def prop(content, want):
        path = folder / "w.json"
        path.write_bytes(content)
        fz.only_ours(read_workflow, path, want)
        result, _ = fz.only_ours(validate_file, path)
        if result is not None:
            _messages(result)
        fz.count("workflow: file (read + validate)")

    prop()
