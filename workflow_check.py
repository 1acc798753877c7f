"""Validate ComfyUI workflow JSON (API format and UI format) against node schemas.

Schemas: NimbleDiff's own from the node classes; the few core ComfyUI nodes the shipped workflows use from
`workflows/core_nodes.json` (a subset of a real server's /object_info, checked in). Used by the tests and by
`nimblediff workflow validate`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NimbleDiffError

WORKFLOWS = Path(__file__).parent / "workflows"


class WorkflowError(NimbleDiffError, ValueError):
    """A workflow references an unknown node, input or type."""


def node_schemas() -> dict:
    """{node id: {"inputs": {name: (type, options, required)}, "outputs": [type, ...]}}."""
    from .nodes import NODE_CLASS_MAPPINGS

    schemas = {}
    for name, info in json.loads((WORKFLOWS / "core_nodes.json").read_text()).items():
        if name.startswith("_"):
            continue
        schemas[name] = {"inputs": {k: (v[0], v[1], v[2]) for k, v in info["inputs"].items()},
                         "outputs": list(info["outputs"])}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = {}
        for section in ("required", "optional"):
            for k, v in spec.get(section, {}).items():
                inputs[k] = (v[0], v[1] if len(v) > 1 else {}, section == "required")
        schemas[name] = {"inputs": inputs, "outputs": list(cls.RETURN_TYPES)}
    return schemas


def _type_name(t) -> str:
    return "COMBO" if isinstance(t, list) else t


def _check_widget(where: str, name: str, spec, value, errors: list) -> None:
    kind, options, _ = spec
    if isinstance(kind, list):
        if kind and value not in kind and not options.get("dynamic"):
            errors.append(f"{where}: {name}={value!r} is not one of {kind}")
    elif kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{where}: {name}={value!r} is not a number")
        elif ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            errors.append(f"{where}: {name}={value} outside [{options.get('min')}, {options.get('max')}]")


def validate_api(workflow: dict, schemas: dict | None = None) -> list[str]:
    """Errors of an API-format (POST /prompt) workflow; empty when valid."""
    schemas = schemas or node_schemas()
    errors = []
    for node_id, node in workflow.items():
        cls = node.get("class_type")
        where = f"node {node_id} ({cls})"
        if cls not in schemas:
            errors.append(f"{where}: unknown node type")
            continue
        schema = schemas[cls]["inputs"]
        given = node.get("inputs", {})
        for name, spec in schema.items():
            if spec[2] and name not in given:
                errors.append(f"{where}: required input {name!r} missing")
        for name, value in given.items():
            if name not in schema:
                errors.append(f"{where}: unknown input {name!r}; known: {sorted(schema)}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                src = workflow.get(str(value[0]))
                if src is None or src.get("class_type") not in schemas:
                    errors.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outputs = schemas[src["class_type"]]["outputs"]
                if value[1] >= len(outputs):
                    errors.append(f"{where}: input {name!r} links to output {value[1]} of {src['class_type']}, "
                                  f"which has {len(outputs)}")
                    continue
                want, got = _type_name(schema[name][0]), outputs[value[1]]
                if want not in (got, "*") and got != "*":
                    errors.append(f"{where}: input {name!r} wants {want}, linked to {got}")
            else:
                _check_widget(where, name, schema[name], value, errors)
    return errors


def validate_ui(workflow: dict, schemas: dict | None = None) -> list[str]:
    """Errors of a UI-format (drag-and-drop) workflow: node types and every link's type at both ends."""
    schemas = schemas or node_schemas()
    errors = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for n in nodes.values():
        if n["type"] not in schemas:
            errors.append(f"node {n['id']}: unknown node type {n['type']}")
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, link_type = link[:6]
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: connects missing node {src if src not in nodes else dst}")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] not in schemas or d["type"] not in schemas:
            continue
        outputs = schemas[s["type"]]["outputs"]
        if src_slot >= len(outputs) or outputs[src_slot] != link_type:
            errors.append(f"link {link_id}: {s['type']} output {src_slot} is not {link_type}")
        dst_input = d.get("inputs", [])[dst_slot] if dst_slot < len(d.get("inputs", [])) else None
        spec = schemas[d["type"]]["inputs"].get(dst_input["name"]) if dst_input else None
        if spec is None:
            errors.append(f"link {link_id}: {d['type']} has no input slot {dst_slot}")
        elif _type_name(spec[0]) not in (link_type, "*"):
            errors.append(f"link {link_id}: {d['type']}.{dst_input['name']} wants {_type_name(spec[0])}, "
                          f"gets {link_type}")
    return errors


def validate_file(path) -> list[str]:
    path = Path(path)
    try:
        workflow = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{path}: cannot read workflow JSON: {e}"]
    check = validate_ui if "nodes" in workflow and "links" in workflow else validate_api
    return [f"{path.name}: {e}" for e in check(workflow)]
