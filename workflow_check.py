"""Validate ComfyUI workflow JSON (API format and UI format) against node schemas.

Schemas: NimbleDiff's own from the node classes; the few core ComfyUI nodes the shipped workflows use from
`workflow_core_nodes.json` beside this file (a subset of a real server's /object_info, checked in; not in a folder
where ComfyUI offers every JSON file as a workflow template). Used by the tests and by `nimblediff workflow validate`.

The shipped workflows: `workflows/api/<name>.json` (API format, the source) and `example_workflows/<name>.json`
(the same graph in the UI format, written from it) with `example_workflows/<name>.jpg`, its preview: ComfyUI's
template browser lists `example_workflows/*.json` of a custom node and shows the .jpg of the same name as the
thumbnail. Regenerate the UI files after editing or adding an API workflow:

    python -m nimblediff.workflow_check templates

and the previews (every graph run on the small models in a real ComfyUI) with bench/workflow_previews.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NimbleDiffError

WORKFLOWS = Path(__file__).parent / "workflows"
TEMPLATES = Path(__file__).parent / "example_workflows"
CORE_NODES = Path(__file__).parent / "workflow_core_nodes.json"


class WorkflowError(NimbleDiffError, ValueError):
    """A workflow references an unknown node, input or type."""


def node_schemas() -> dict:
    """{node id: {"inputs": {name: (type, options, required)}, "outputs": [type, ...]}}."""
    from .nodes import NODE_CLASS_MAPPINGS

    schemas = {}
    for name, info in json.loads(CORE_NODES.read_text()).items():
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


def schemas_from_object_info(info: dict) -> dict:
    """node_schemas()' form of a live server's GET /object_info (every node it has, ours included)."""
    schemas = {}
    for name, node in info.items():
        inputs = {}
        for section in ("required", "optional"):
            for k, v in node.get("input", {}).get(section, {}).items():
                kind = v[0]
                if kind == "COMBO":                  # the V3 spelling: ("COMBO", {"options": [...]})
                    kind = list(v[1].get("options", [])) if len(v) > 1 else []
                inputs[k] = (kind, v[1] if len(v) > 1 else {}, section == "required")
        schemas[name] = {"inputs": inputs, "outputs": list(node.get("output", []))}
    return schemas


def _type_name(t) -> str:
    return "COMBO" if isinstance(t, list) else t


# Combos filled from the user's model folders: their values depend on the machine, not on the schema.
FILE_INPUTS = {"lora_name", "ckpt_name", "vae_name", "image", "model"}


def _check_widget(where: str, name: str, spec, value, errors: list) -> None:
    kind, options, _ = spec
    if isinstance(kind, list):
        if kind and value not in kind and not options.get("dynamic") and name not in FILE_INPUTS \
                and not name.startswith("lora_"):
            errors.append(f"{where}: {name}={value!r} is not one of {kind}")
    elif kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{where}: {name}={value!r} is not a number")
        elif ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
            errors.append(f"{where}: {name}={value} outside [{options.get('min')}, {options.get('max')}]")


def validate_api(workflow: dict, schemas: dict | None = None) -> list[str]:
    """Errors of an API-format (POST /prompt) workflow; empty when valid."""
    schemas = schemas or node_schemas()
    if not isinstance(workflow, dict):
        return [f"an API workflow is a JSON object of nodes, not {type(workflow).__name__}"]
    errors = []
    for node_id, node in workflow.items():
        # the shape first: a workflow is data from anywhere, and a malformed one gets messages, not a crash
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            errors.append(f"node {node_id}: expected an object with class_type (a string) and inputs (an object)")
            continue
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
                if not isinstance(src, dict) or not isinstance(src.get("class_type"), str) \
                        or src["class_type"] not in schemas:
                    errors.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outputs = schemas[src["class_type"]]["outputs"]
                if not 0 <= value[1] < len(outputs):
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
    if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list) \
            or not isinstance(workflow.get("links", []), list):
        return ["a UI workflow is a JSON object with a list of nodes and a list of links"]
    errors = []
    nodes = {}
    for i, n in enumerate(workflow["nodes"]):  # the shape first: malformed entries get messages, not a crash
        if not isinstance(n, dict) or not isinstance(n.get("id"), int) or not isinstance(n.get("type"), str) \
                or not isinstance(n.get("inputs", []), list):
            errors.append(f"nodes[{i}]: expected an object with an integer id, a type (string) and a list of inputs")
            continue
        nodes[n["id"]] = n
        if n["type"] not in schemas:
            errors.append(f"node {n['id']}: unknown node type {n['type']}")
    for i, link in enumerate(workflow.get("links", [])):
        if not isinstance(link, list) or len(link) < 6 or not all(isinstance(v, int) for v in link[:5]) \
                or not isinstance(link[5], str):
            errors.append(f"links[{i}]: expected [id, source node, source slot, target node, target slot, type]")
            continue
        link_id, src, src_slot, dst, dst_slot, link_type = link[:6]
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: connects missing node {src if src not in nodes else dst}")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] not in schemas or d["type"] not in schemas:
            continue
        outputs = schemas[s["type"]]["outputs"]
        if not 0 <= src_slot < len(outputs) or outputs[src_slot] != link_type:
            errors.append(f"link {link_id}: {s['type']} output {src_slot} is not {link_type}")
        dst_input = d.get("inputs", [])[dst_slot] if 0 <= dst_slot < len(d.get("inputs", [])) else None
        spec = schemas[d["type"]]["inputs"].get(dst_input["name"]) \
            if isinstance(dst_input, dict) and isinstance(dst_input.get("name"), str) else None
        if spec is None:
            errors.append(f"link {link_id}: {d['type']} has no input slot {dst_slot}")
        elif _type_name(spec[0]) not in (link_type, "*"):
            errors.append(f"link {link_id}: {d['type']}.{dst_input['name']} wants {_type_name(spec[0])}, "
                          f"gets {link_type}")
    return errors


def read_workflow(path, want: str | None = None) -> dict:
    """A workflow file's JSON, refusing what is not JSON or not a ComfyUI workflow (UI or API format; `want="api"`
    accepts only the API format)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise WorkflowError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkflowError(f"{path}: not JSON ({e}); give a ComfyUI workflow .json file") from None
    if want == "api" and not _is_api(data):
        raise WorkflowError(f"{path}: not an API-format workflow (a JSON object of nodes, each with class_type and "
                            "inputs, as ComfyUI's 'Export (API)' writes)"
                            + ("; this one is already in the UI format" if _is_ui(data) else ""))
    if not (_is_ui(data) or _is_api(data)):
        raise WorkflowError(f"{path}: not a ComfyUI workflow: expected the UI format (an object with 'nodes' and "
                            "'links') or the API format (an object of nodes with 'class_type')")
    return data


def _is_ui(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _is_api(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs", {}), dict) for n in data.values())


def validate_file(path) -> list[str]:
    try:
        workflow = read_workflow(path)
    except WorkflowError as e:
        return [str(e)]
    check = validate_ui if _is_ui(workflow) else validate_api
    return [f"{Path(path).name}: {e}" for e in check(workflow)]


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def api_to_ui(api: dict, schemas: dict | None = None, titles: dict | None = None) -> dict:
    """A UI-format (drag-and-drop) workflow equivalent to an API-format one, laid out left to right."""
    schemas = schemas or node_schemas()
    errors = validate_api(api, schemas)
    if errors:  # the conversion follows links and schemas: only a valid workflow can be converted
        raise WorkflowError(f"not a valid API workflow ({len(errors)} problems), e.g. " + "; ".join(errors[:3]))
    ids = {node_id: i + 1 for i, node_id in enumerate(api)}
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if _is_link(value):
                link_id = len(links) + 1
                src = ids[str(value[0])]
                dst_inputs = [n for n, spec in schemas[node["class_type"]]["inputs"].items()
                              if not _is_widget(spec) or _is_link(node["inputs"].get(n))]
                links.append([link_id, src, value[1], ids[node_id], dst_inputs.index(name),
                              schemas[api[str(value[0])]["class_type"]]["outputs"][value[1]]])
                out_links.setdefault((src, value[1]), []).append(link_id)
    link_of = {(l[3], l[4]): l[0] for l in links}
    for order, (node_id, node) in enumerate(api.items()):
        nid, schema = ids[node_id], schemas[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in schema["inputs"].items():
            value = node["inputs"].get(name, spec[1].get("default"))
            if not _is_widget(spec) or _is_link(value):
                entry = {"name": name, "type": _type_name(spec[0]), "link": link_of.get((nid, len(inputs)))}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if _is_widget(spec):
                widgets.append(spec[1].get("default") if _is_link(value) else value)
                if spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        outputs = [{"name": t, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, t in enumerate(schema["outputs"])]
        nodes.append({"id": nid, "type": node["class_type"], "pos": [40 + 330 * (order % 4), 60 + 320 * (order // 4)],
                      "size": [300, 160], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets, **({"title": titles[node_id]} if titles and node_id in titles else {})})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


# ------------------------------------------------------------------------------------------------------ templates
def template_of(api: dict, schemas: dict | None = None) -> dict:
    """The UI-format template of an API workflow: api_to_ui with each node's `_meta.title` as its title."""
    titles = {k: n["_meta"]["title"] for k, n in api.items()
              if isinstance(n, dict) and isinstance(n.get("_meta"), dict) and isinstance(n["_meta"].get("title"), str)}
    return api_to_ui(api, schemas, titles)


def same_graph(ui: dict, api: dict) -> list[str]:
    """Differences between a UI workflow and an API one in what a template must keep: the node types (with counts)
    and the number of links. Empty when they describe the same graph."""
    from collections import Counter

    ui_types = Counter(n.get("type") for n in ui.get("nodes", []) if isinstance(n, dict))
    api_types = Counter(n.get("class_type") for n in api.values() if isinstance(n, dict))
    errors = []
    if ui_types != api_types:
        errors.append(f"node types differ: UI {dict(ui_types)} vs API {dict(api_types)}")
    links = sum(_is_link(v) for n in api.values() if isinstance(n, dict) for v in n.get("inputs", {}).values())
    if len(ui.get("links", [])) != links:
        errors.append(f"{len(ui.get('links', []))} links in the UI workflow, {links} in the API one")
    return errors


def sync_templates(workflows: Path = WORKFLOWS, templates: Path = TEMPLATES) -> list[str]:
    """Write templates/<name>.json (UI format) from every workflows/api/<name>.json, the source; remove templates
    whose API workflow is gone. A UI workflow left at workflows/<name>.json (ComfyUI would list it as a second
    template) is removed when it describes the same graph as its API file, else refused with the differences.
    Returns what was done, one line each."""
    schemas = node_schemas()
    templates.mkdir(exist_ok=True)
    done, names = [], set()
    for path in sorted((workflows / "api").glob("*.json")):
        names.add(path.stem)
        api = read_workflow(path, want="api")
        stray = workflows / path.name
        if stray.is_file():
            ui = read_workflow(stray)
            problems = validate_ui(ui, schemas) + same_graph(ui, api) if _is_ui(ui) else ["not a UI workflow"]
            if problems:
                raise WorkflowError(f"{stray}: a UI workflow beside workflows/api/{path.name} that is not the same "
                                    f"graph ({'; '.join(problems)}): make the API file say what it should, then "
                                    "delete it; the template is written from the API file")
            stray.unlink()
            done.append(f"removed workflows/{stray.name} (the template is {templates.name}/{path.name})")
        target = templates / path.name
        text = json.dumps(template_of(api, schemas), indent=1) + "\n"
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
            done.append(f"wrote {templates.name}/{path.name}")
    for old in sorted(templates.glob("*.json")):
        if old.stem not in names:
            old.unlink()
            done.append(f"removed {templates.name}/{old.name} (no workflows/api/{old.name})")
    return done


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m nimblediff.workflow_check", description=(
        "validate the shipped workflows, or write example_workflows/ (the ComfyUI templates) from workflows/api/"))
    parser.add_argument("action", choices=["validate", "templates"])
    args = parser.parse_args(argv)
    if args.action == "templates":
        for line in sync_templates():
            print(line)
        return 0
    errors = [e for p in sorted((WORKFLOWS / "api").glob("*.json")) + sorted(TEMPLATES.glob("*.json"))
              for e in validate_file(p)]
    print("\n".join(errors) or "all shipped workflows are valid")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
