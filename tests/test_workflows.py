"""Shipped workflows validate against the node schemas; the validator catches broken graphs."""

import copy
import json

import pytest

from nimblediff.workflow_check import (TEMPLATES, WORKFLOWS, api_to_ui, same_graph, template_of, validate_api,
                                       validate_file, validate_ui)

API = sorted((WORKFLOWS / "api").glob("*.json"))
UI = sorted(TEMPLATES.glob("*.json"))    # ComfyUI offers each of these as a template: all must be UI workflows
TINY_VAE = json.loads((WORKFLOWS.parent / "weights" / "tiny" / "nimblediff-tiny" / "vae" / "config.json").read_text())


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


def test_every_template_comfyui_offers_is_a_ui_workflow():
    """ComfyUI serves every example_workflows/*.json as a template (app/custom_node_manager.py globs
    `*/example_workflows/*.json`, and `workflows`, `examples`, ... the same way); a schema list there fails to load in
    the browser."""
    for path in UI:
        workflow = json.loads(path.read_text())
        assert isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list), path.name


def _decoded_size(api: dict, node_id: str) -> tuple[int, int]:
    """(width, height) VAEDecode gives for the latent node: EmptyLatentImage is /8 for every VAE (ComfyUI's
    nodes.py), ours /ratio of the VAE; the tiny VAE upsamples by 2 per block after the first (diffusers)."""
    vae_ratio = 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    node = api[node_id]["inputs"]
    latent_ratio = 8 if api[node_id]["class_type"] == "EmptyLatentImage" else vae_ratio
    return node["width"] // latent_ratio * vae_ratio, node["height"] // latent_ratio * vae_ratio


@pytest.mark.parametrize("path", API, ids=lambda p: p.name)
def test_shipped_workflow_asks_for_the_size_it_makes(path):
    api = json.loads(path.read_text())
    latents = [k for k, n in api.items() if n["class_type"] in ("EmptyLatentImage", "NimbleEmptyLatent")]
    assert latents
    for node_id in latents:
        node = api[node_id]["inputs"]
        assert _decoded_size(api, node_id) == (node["width"], node["height"]), (path.name, node)


SYNC = "run `python -m nimblediff.workflow_check templates` (the API workflow is the source)"


@pytest.mark.parametrize("path", API, ids=lambda p: p.name)
def test_template_is_written_from_its_api_workflow(path):
    """example_workflows/<name>.json is the API workflow in the UI format, exactly as sync_templates writes it."""
    template = TEMPLATES / path.name
    assert template.is_file(), f"no template {template.name}: {SYNC}"
    api, ui = json.loads(path.read_text()), json.loads(template.read_text())
    assert same_graph(ui, api) == [], SYNC
    assert ui == template_of(api), f"{template.name} differs from its API workflow: {SYNC}"


def test_only_one_folder_holds_templates():
    """ComfyUI lists the JSON files of every example-workflow folder it knows (example_workflows, workflows, examples,
    example, workflow), so a UI file left in workflows/ would be listed twice, and its URL would be served from
    example_workflows/ (the first static route) and fail."""
    root = WORKFLOWS.parent
    stray = [str(p.relative_to(root)) for folder in ("workflows", "workflow", "examples", "example")
             for p in (root / folder).glob("*.json")]
    assert stray == [], f"{stray}: {SYNC}, which removes them"


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_every_template_has_a_small_preview_of_its_own_output(path):
    """ComfyUI's template browser shows <name>.jpg beside <name>.json as the thumbnail (frontend: mediaSubtype "jpg"
    for custom-node templates). bench/workflow_previews.py writes them by running the graph."""
    from PIL import Image

    preview = path.with_suffix(".jpg")
    assert preview.is_file(), f"no preview {preview.name}: run bench/workflow_previews.py {path.stem}"
    assert preview.stat().st_size <= 30 * 1024, f"{preview.name}: {preview.stat().st_size} bytes, over 30 KB"
    with Image.open(preview) as im:
        assert im.format == "JPEG" and min(im.size) >= 32, (im.format, im.size)


def test_readme_lists_every_shipped_workflow():
    readme = (WORKFLOWS.parent / "README.md").read_text()
    missing = [p.stem for p in API if f"| `{p.stem}` |" not in readme]
    assert missing == [], f"add a row for {missing} to README's workflow table (under 'Shipped workflows')"


@pytest.mark.parametrize("path", API, ids=lambda p: p.name)
def test_every_nimblediff_node_call_binds_to_its_function(path):
    """Without ComfyUI: each of our nodes in the workflow gets exactly the arguments its Python function takes (what
    ComfyUI passes: every input given, linked or widget), so a renamed parameter or a missing default fails here."""
    import inspect

    from nimblediff.nodes import NODE_CLASS_MAPPINGS

    for node_id, node in json.loads(path.read_text()).items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue                                            # a core ComfyUI node
        fn = getattr(cls(), cls.FUNCTION)
        try:
            inspect.signature(fn).bind(**node["inputs"])
        except TypeError as e:
            pytest.fail(f"{path.name} node {node_id} ({node['class_type']}): {e}")


def test_sync_templates_writes_removes_and_refuses(tmp_path):
    """sync_templates on a copy: a missing template is written, an orphan removed, a stray UI file in workflows/
    removed when it is the same graph and refused (kept) when it is not."""
    import shutil

    from nimblediff.workflow_check import WorkflowError, sync_templates

    wf, tpl = tmp_path / "workflows", tmp_path / "example_workflows"
    (wf / "api").mkdir(parents=True)
    tpl.mkdir()
    shutil.copy(API[0], wf / "api" / API[0].name)
    (tpl / "gone.json").write_text("{}")
    (wf / API[0].name).write_text(json.dumps(api_to_ui(json.loads(API[0].read_text()))))
    done = sync_templates(wf, tpl)
    assert sorted(p.name for p in tpl.iterdir()) == [API[0].name] and not (wf / API[0].name).exists(), done
    assert json.loads((tpl / API[0].name).read_text()) == template_of(json.loads(API[0].read_text()))
    assert sync_templates(wf, tpl) == []                                  # idempotent
    other = api_to_ui(json.loads(API[1].read_text()))
    (wf / API[0].name).write_text(json.dumps(other))
    if not same_graph(other, json.loads(API[0].read_text())):
        pytest.skip("the first two shipped workflows have the same graph")
    with pytest.raises(WorkflowError, match="not the same graph"):
        sync_templates(wf, tpl)
    assert (wf / API[0].name).exists()
