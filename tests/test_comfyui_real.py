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
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import comfy_harness  # noqa: E402

pytestmark = pytest.mark.comfyui

COMFY = comfy_harness.comfyui_path()
if COMFY is None or not (COMFY / "main.py").is_file() or not (COMFY / "comfy").is_dir():
    pytest.skip("real-ComfyUI tests need COMFYUI_PATH pointing at a ComfyUI checkout (main.py and comfy/); "
                f"got {COMFY}", allow_module_level=True)

PACK = comfy_harness.PACK_DIR
WORKFLOWS = sorted((PACK / "workflows" / "api").glob("*.json"))
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
def test_shipped_api_workflow_runs(server, path):
    if path is None:
        pytest.skip("no workflows/api/*.json in the pack yet")
    prompt = json.loads(path.read_text(encoding="utf-8"))
    prompt = prompt.get("prompt", prompt)  # accept a saved {"prompt": {...}} body too
    absent = _embedded_assets_not_offered(server, prompt)
    if absent:
        pytest.skip(f"{path.name} uses embedded assets the pack does not ship yet: {absent}")
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success"


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
