"""NimbleDiff inside a real ComfyUI: node registration, shipped API workflows, the diffusers-folder loader.

Runs only when COMFYUI_PATH points at a ComfyUI checkout; the server and the parity checks run under COMFYUI_PYTHON
(default: this interpreter), which needs ComfyUI's requirements plus diffusers/transformers/safetensors.

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python python -m pytest tests/test_comfyui_real.py -q

The server gets a temporary --base-directory (models, custom_nodes with this pack linked in, output, user) and an
in-memory database, so the checkout is never written to.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import comfy_harness  # noqa: E402

pytestmark = pytest.mark.comfyui

COMFY = comfy_harness.skip_without_comfyui()

PACK = comfy_harness.PACK_DIR
WORKFLOWS = sorted((PACK / "workflows" / "api").glob("*.json"))
UI_WORKFLOWS = sorted((PACK / "example_workflows").glob("*.json"))
EMBEDDED = "nimblediff-tiny (embedded)"
EMBEDDED_DIR = PACK / "weights" / "tiny" / "nimblediff-tiny"
SPEC = "tiny-sd-spec"  # UNet 32/64 GroupNorm 8, VAE 32/64 (/2), CLIP width 32, 77 tokens
TINY = "tiny-sd-nimblediff-layout"  # NimbleDiff-Tiny's shapes with random weights: VAE /4, 24 tokens
TINY16 = "tiny-sd-nimblediff-layout-fp16"  # the same saved in fp16, as the shipped model is
VAE_SCALE = {SPEC: 2, TINY: 4, TINY16: 4, EMBEDDED: 4}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_base")


@pytest.fixture(scope="module")
def model_folders(base) -> dict:
    """Random tiny diffusers folders under models/diffusers (built with diffusers under COMFYUI_PYTHON). When the pack
    has no embedded model yet, a NimbleDiff-Tiny-shaped one stands in as models/diffusers/nimblediff-tiny, where the
    loader's embedded entry looks next."""
    root = base / "models" / "diffusers"
    root.mkdir(parents=True, exist_ok=True)
    folders = {name: comfy_harness.build_model_folder(root / name, layout) for name, layout in
               ((SPEC, "spec"), (TINY, "tiny"), (TINY16, "tiny-fp16"))}
    if (EMBEDDED_DIR / "model_index.json").is_file():
        folders[EMBEDDED] = EMBEDDED_DIR
    else:
        folders[EMBEDDED] = shutil.copytree(folders[TINY16], root / "nimblediff-tiny")
    broken = root / "broken-sd"  # no UNet weights
    shutil.copytree(folders[SPEC], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    corrupt = root / "corrupt-sd"  # a truncated VAE file
    shutil.copytree(folders[SPEC], corrupt)
    vae = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:1000])
    return folders


@pytest.fixture(scope="module")
def server(base, model_folders):
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    comfy_harness.copy_loras(base / "models" / "loras")
    srv = comfy_harness.ComfyServer(COMFY, base)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _txt2img(model: str, seed: int = 1, size: int = 64, text: str = "a red square") -> dict:
    """Stock nodes around our loader: loader -> CLIPTextEncode x2 -> KSampler (euler, 4 steps) -> VAEDecode -> Save."""
    return {
        "1": {"class_type": "NimbleDiffusersCheckpointLoader", "inputs": {"model": model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "nimblediff_test"}},
    }


def _custom_sampling(model: str, sampler: dict, schedule: dict | None = None, size: int = 64,
                     latent: str = "NimbleEmptyLatent") -> dict:
    """Our nodes around SamplerCustom: loader -> NimbleEmptyLatent (or the stock EmptyLatentImage), Few-Step Sampler
    and Schedule -> VAEDecode."""
    vae = {"vae": ["1", 2]} if latent == "NimbleEmptyLatent" else {}
    return {
        "1": {"class_type": "NimbleDiffusersCheckpointLoader", "inputs": {"model": model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red square"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": latent, "inputs": {**vae, "width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "NimbleFewStepSampler", "inputs": {"sampler_name": "lcm", "gamma": 0.3, **sampler}},
        "6": {"class_type": "NimbleFewStepSchedule", "inputs": {"model": ["1", 0], "schedule": "lcm", "steps": 4,
                                                                "denoise": 1.0, **(schedule or {})}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": 0, "cfg": 2.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "nimblediff_test"}},
    }


def _image_sizes(base: Path, entry: dict) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for img in comfy_harness.output_images(entry):
        with Image.open(base / "output" / img["subfolder"] / img["filename"]) as im:
            sizes.append(im.size)
    return sizes


# -------------------------------------------------------------------------------------------------- registration
def test_object_info_lists_every_node_and_the_pack_imported(server):
    import nimblediff

    info = server.get("/object_info")
    missing = sorted(set(nimblediff.NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"nodes not registered by the server: {missing}\n{server.log()[-4000:]}"
    log = server.log()
    failures = [line for line in log.splitlines() if "nimblediff" in line and
                ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failures, f"the pack failed to import:\n{log[-6000:]}"
    for node_id, display in nimblediff.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert info[node_id]["display_name"] == display


def test_loader_schema_lists_embedded_and_diffusers_folders(server):
    node = server.get("/object_info/NimbleDiffusersCheckpointLoader")["NimbleDiffusersCheckpointLoader"]
    choices = node["input"]["required"]["model"][0]
    assert choices[0] == EMBEDDED
    assert {SPEC, TINY, TINY16, "broken-sd", "corrupt-sd"} <= set(choices)
    assert node["output"] == ["MODEL", "CLIP", "VAE"]
    assert node["category"] == "NimbleDiff/loaders"


# ------------------------------------------------------------------------------------------- the loader, end to end
@pytest.mark.parametrize("model", [SPEC, TINY16, EMBEDDED])
def test_loader_txt2img_with_stock_nodes(server, base, model):
    from PIL import Image

    entry = server.run_prompt(_txt2img(model))
    images = comfy_harness.output_images(entry)
    assert len(images) == 1, entry.get("outputs")
    img = images[0]
    path = base / "output" / img["subfolder"] / img["filename"]
    with Image.open(path) as im:
        # EmptyLatentImage makes width/8 latents whatever the VAE; the VAE then upsamples by its own factor
        assert im.size == (64 // 8 * VAE_SCALE[model],) * 2
        extrema = im.convert("L").getextrema()
    assert extrema[0] < extrema[1], "a flat image: the sampler or the VAE produced a constant"


@pytest.mark.parametrize("model, expected", [("broken-sd", "unet/diffusion_pytorch_model.safetensors"),
                                             ("corrupt-sd", "vae/diffusion_pytorch_model.safetensors")])
def test_loader_names_the_missing_or_corrupt_file(server, model, expected):
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(_txt2img(model))
    assert expected in str(err.value) and "NimbleDiffusersCheckpointLoader" in str(err.value)
    assert "NimbleDiffusersCheckpointLoader" in server.get("/object_info")  # the server is still up


def test_prompt_outside_the_tiny_vocabulary_is_named(server):
    """NimbleDiff-Tiny's tokenizer is a closed word list: an unknown word is an error naming it, not a silent
    spelling-out in byte tokens."""
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(_txt2img(EMBEDDED, text="a red cat on the left"))
    assert "['cat']" in str(err.value) and "valid words" in str(err.value)
    assert "NimbleDiffusersCheckpointLoader" in server.get("/object_info")  # the server is still up


# ------------------------------------------------------------------------------------------------ shipped workflows
def _embedded_assets_not_offered(server, prompt: dict) -> list[str]:
    """'... (embedded)' dropdown values the server does not list: the pack's weights/tiny files are not there yet.
    Any other value missing from a dropdown is left to /prompt validation, which fails the test."""
    info = server.get("/object_info")
    absent = []
    for node in prompt.values():
        schema = info.get(node.get("class_type"), {}).get("input", {})
        inputs = {**schema.get("required", {}), **schema.get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            spec = inputs.get(name)
            if isinstance(value, str) and value.endswith("(embedded)") and spec and isinstance(spec[0], list) \
                    and value not in spec[0]:
                absent.append(f"{node['class_type']}.{name}={value!r}")
    return absent


@pytest.mark.parametrize("path", WORKFLOWS or [None], ids=[p.stem for p in WORKFLOWS] or ["none"])
def test_shipped_api_workflow_runs(server, base, path):
    if path is None:
        pytest.skip("no workflows/api/*.json in the pack yet")
    prompt = json.loads(path.read_text(encoding="utf-8"))
    prompt = prompt.get("prompt", prompt)  # accept a saved {"prompt": {...}} body too
    absent = _embedded_assets_not_offered(server, prompt)
    if absent:
        pytest.skip(f"{path.name} uses embedded assets the pack does not ship yet: {absent}")
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"
    asked = {(n["inputs"]["width"], n["inputs"]["height"]) for n in prompt.values()
             if n["class_type"] in ("EmptyLatentImage", "NimbleEmptyLatent")}
    sizes = _image_sizes(base, entry)
    assert sizes and set(sizes) == asked, f"{path.name} asks for {asked} and makes {sizes}"


def test_templates_the_server_offers_are_valid_ui_workflows(server):
    """ComfyUI offers every example_workflows/*.json of a pack as a template (listed once: no other example folder
    holds JSON) with the .jpg of the same name as its thumbnail: each must be a UI workflow whose nodes and links
    match the live server's schemas, and each thumbnail must be served."""
    templates = server.get("/workflow_templates").get("nimblediff", [])
    assert sorted(templates) == sorted(p.stem for p in UI_WORKFLOWS)
    served = {name: server.get(f"/api/workflow_templates/nimblediff/{name}.json") for name in templates}
    for name, workflow in served.items():
        assert isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list), name
    for name in templates:          # the frontend asks for /api/workflow_templates/<pack>/<name>.jpg
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/nimblediff/{name}.jpg", timeout=30) as r:
            assert r.headers.get("Content-Type") == "image/jpeg" and r.read(3) == b"\xff\xd8\xff", name

    from nimblediff.workflow_check import schemas_from_object_info, validate_ui

    schemas = schemas_from_object_info(server.get("/object_info"))
    for name, workflow in served.items():
        assert validate_ui(workflow, schemas) == [], name


def test_checked_in_core_node_schemas_match_the_server(server):
    """workflow_core_nodes.json (what `nimblediff workflow validate` checks against offline) is a true subset of the
    server's /object_info: same inputs, types and outputs."""
    from nimblediff.workflow_check import CORE_NODES, schemas_from_object_info

    live = schemas_from_object_info(server.get("/object_info"))
    for name, info in json.loads(CORE_NODES.read_text()).items():
        if name.startswith("_"):
            continue
        assert name in live, name
        assert list(info["outputs"]) == live[name]["outputs"], name
        for key, (kind, _, required) in info["inputs"].items():
            live_kind, _, live_required = live[name]["inputs"][key]
            assert (isinstance(kind, list), required) == (isinstance(live_kind, list), live_required), (name, key)
            if not isinstance(kind, list):
                assert kind == live_kind, (name, key)


# ------------------------------------------------------------------------------------------ our sampling nodes
@pytest.mark.parametrize("model", [SPEC, TINY16])
def test_empty_latent_decodes_to_the_asked_size(server, base, model):
    """EmptyLatentImage divides by 8 whatever the VAE (so 64 gives 32 with the /4 tiny VAE); ours by the VAE's own
    ratio, so the saved image has the size asked for."""
    entry = server.run_prompt(_custom_sampling(model, {}, size=48))
    assert _image_sizes(base, entry) == [(48, 48)]


@pytest.mark.parametrize("sampler, expected", [
    ({"sampler_name": "dpmpp_2m", "options": "beta=nan"}, "beta"),
    ({"sampler_name": "fitted"}, "Schedule from File"),
    ({"sampler_name": "fitted", "options": "coeffs=0.5"}, "coeffs"),
    ({"sampler_name": "tcd", "gamma": float("nan")}, "gamma"),
    ({"sampler_name": "deis", "order": 4}, "order"),                  # in the widget's 0-4, past deis' 1-3
    ({"sampler_name": "deis", "options": "order=3", "order": 2}, "given twice"),
])
def test_bad_sampler_options_fail_at_our_node(server, sampler, expected):
    """The error names our node and the option, not SamplerCustom (the prompt JSON carries NaN as ComfyUI's does)."""
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(_custom_sampling(SPEC, sampler, latent="EmptyLatentImage"))
    message = str(err.value)      # the execution_error: node_type, then exception_message, then the traceback
    assert '"node_type": "NimbleFewStepSampler"' in message and expected in message, message


def test_schedule_denoise_zero_is_refused_by_the_widget(server):
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(_custom_sampling(SPEC, {}, {"denoise": 0.0}, latent="EmptyLatentImage"))
    assert "400" in str(err.value) and "value_smaller_than_min" in str(err.value) and "denoise" in str(err.value)


def _fitted_schedule_run(server, base, shifts, sampler: str = "file") -> "np.ndarray":
    """A fitted schedule pasted into Schedule from File, sampled by SamplerCustom with the file's SAMPLER (or with
    our euler sampler on the file's SIGMAS): the saved image's pixels."""
    import numpy as np
    from PIL import Image

    schedule = {"model_type": "vp", "sampler": "fitted", "nfe": 4, "created_by": "fit",
                "sigmas": [14.614646, 3.0, 0.9, 0.3, 0.0],
                "options": {"coeffs": [[], [0.0], [0.0, 0.0], [0.0, 0.0, 0.0]], "gains": [0.0, 0.0, 0.0],
                            "prior_shift": False, "shifts": shifts}}
    graph = _custom_sampling(EMBEDDED, {"sampler_name": "euler"})
    graph["6"] = {"class_type": "NimbleScheduleFile", "inputs": {"model": ["1", 0], "path": "",
                                                                   "schedule_json": json.dumps(schedule)}}
    graph["7"]["inputs"]["sigmas"] = ["6", 0]
    if sampler == "file":
        graph["7"]["inputs"]["sampler"] = ["6", 1]
    images = comfy_harness.output_images(server.run_prompt(graph))
    with Image.open(base / "output" / images[0]["subfolder"] / images[0]["filename"]) as im:
        return np.asarray(im, dtype=np.int16)


def test_fitted_schedule_with_time_shifts_runs_in_comfyui(server, base):
    """On the shipped model: a fitted schedule with zero weights and zero shifts is DDIM = Euler in k-space, the same
    image (to PNG rounding) as our euler sampler on its sigmas; time shifts reach the model through ComfyUI's
    sampler (another image)."""
    euler = _fitted_schedule_run(server, base, [0.0, 0.0, 0.0, 0.0], sampler="euler")
    fitted = _fitted_schedule_run(server, base, [0.0, 0.0, 0.0, 0.0])
    shifted = _fitted_schedule_run(server, base, [0.0, -1.0, 1.0, 0.5])
    rounding = abs(fitted - euler)
    assert rounding.max() <= 1
    assert abs(shifted - fitted).mean() > max(2.0, 5 * rounding.mean()), \
        (abs(shifted - fitted).max(), abs(shifted - fitted).mean(), rounding.mean())


def _saved_latent(base: Path, entry: dict, node: str) -> "torch.Tensor":
    from safetensors.torch import load_file

    (saved,) = entry["outputs"][node]["latents"]
    return load_file(base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]


def test_diffedit_node_matches_the_diffusers_pipeline(server, base):
    """The shipped DiffEdit workflow on the shipped model, its source and edited latents saved (SaveLatent), against
    EditPipeline(method='diffedit') on the same source latent, prompts, schedule and noise seed: the same mask, and
    the same edited latent up to float rounding. Outside the mask both equal the source."""
    import numpy as np
    import torch
    from PIL import Image

    from nimblediff.pipelines import EditPipeline

    graph = json.loads((PACK / "workflows" / "api" / "nimblediff_edit_diffedit.json").read_text())
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "de_source"}}
    graph["91"] = {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "de_edited"}}
    entry = server.run_prompt(graph)
    source, edited = _saved_latent(base, entry, "90"), _saved_latent(base, entry, "91")
    (mask_png,) = entry["outputs"]["17"]["images"]
    with Image.open(base / "output" / mask_png["subfolder"] / mask_png["filename"]) as im:
        comfy_mask = torch.as_tensor(np.asarray(im.convert("L"), dtype=np.float32)[::4, ::4] / 255).round()

    pipe = EditPipeline.from_pretrained(EMBEDDED_DIR)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.vae.config.scaling_factor
    node = graph["12"]["inputs"]
    out = pipe(latents=source.float() * scale, prompt=graph["3"]["inputs"]["text"],
               source_prompt=graph["2"]["inputs"]["text"], method="diffedit",
               num_inference_steps=graph["11"]["inputs"]["steps"], guidance_scale=node["cfg"],
               mask_strength=node["mask_strength"], mask_noises=node["mask_noises"], mask_ratio=node["mask_ratio"],
               mask_threshold=node["mask_threshold"], mask_blur=node["mask_blur"],
               generator=torch.Generator().manual_seed(node["seed"]), output_type="latent")
    ours = out.mask[0, 0]
    assert 0 < int(ours.sum()) < ours.numel() and int((ours != comfy_mask).sum()) <= 1, (ours.sum(), comfy_mask.sum())
    keep = (comfy_mask == 0).expand_as(source[0])
    assert torch.equal(edited[0][keep], source[0][keep])
    rel = float((edited.float() * scale - out.images).norm() / (out.images - source.float() * scale).norm())
    assert rel < 1e-4, rel            # measured 4e-7 (ComfyUI a125cd84): the same computation in two hosts


def test_diffedit_node_edits_a_flow_dit(server, base):
    """The shipped DiT DiffEdit workflow (rectified flow, ComfyUI's own SD3 MMDiT): the node inverts and regenerates
    along a flow schedule; outside its mask the latent is the source's exactly, inside it changes. (Its agreement
    with DiTEditPipeline is tests/comfyui/test_dit_diffedit_real.py.)"""
    graph = json.loads((PACK / "workflows" / "api" / "nimblediff_dit_diffedit.json").read_text())
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "dit_source"}}
    graph["91"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "dit_edited"}}
    entry = server.run_prompt(graph)
    source, edited = _saved_latent(base, entry, "90"), _saved_latent(base, entry, "91")
    changed = (edited != source).any(1)[0]
    assert 0 < int(changed.sum()) < changed.numel() // 2, int(changed.sum())
    assert float((edited - source).abs().max()) > 0.1


# ----------------------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("name", [SPEC, TINY, TINY16, EMBEDDED])
def test_loader_matches_diffusers(model_folders, name):
    """ComfyUI objects from our loader against diffusers on the same folder (independent reference):
    the x0 prediction through ComfyUI's BaseModel.apply_model vs x - sigma * eps of diffusers' UNet at c_in * x."""
    r = comfy_harness.run_parity(COMFY, model_folders[name])
    assert r["unet"] <= 1e-4, r
    assert r["sigmas_rel"] <= 1e-4, r  # diffusers builds betas in float32, ComfyUI in float64
    assert r["clip_fp32"] <= 1e-4, r
    assert r["clip"] <= 1e-2, r  # ComfyUI's default text-encoder dtype is fp16
    assert r["vae_decode"] <= 1e-4 and r["vae_encode"] <= 1e-4, r
    assert r["scale_factor"][0] == pytest.approx(r["scale_factor"][1]), r
    assert r["config_mismatch"] == {}, r
