"""Our LoRA loader on DiT MODELs built in a real ComfyUI's own classes equals ComfyUI's LoraLoader (tiny Flux, SD3 and
PixArt; LoRA files in diffusers, BFL and kohya names), and our flow schedule on a Flux MODEL patched by ComfyUI's
ModelSamplingFlux equals diffusers' Flux grid, and SamplerCustom with our euler SAMPLER on it equals ComfyUI's euler.
Runs tests/comfyui/dit_real.py under COMFYUI_PYTHON.

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python python -m pytest tests/comfyui/test_dit_real.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import comfy_harness  # noqa: E402

pytestmark = pytest.mark.comfyui

COMFY = comfy_harness.comfyui_path()
if COMFY is None or not (COMFY / "comfy").is_dir():
    pytest.skip(f"real-ComfyUI tests need COMFYUI_PATH pointing at a ComfyUI checkout; got {COMFY}",
                allow_module_level=True)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    script = Path(__file__).parent / "dit_real.py"
    proc = subprocess.run([comfy_harness.comfyui_python(), str(script), str(COMFY), str(comfy_harness.PACK_DIR),
                           str(tmp_path_factory.mktemp("dit_real"))], capture_output=True, text=True, timeout=900,
                          cwd=str(comfy_harness.PACK_DIR), check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{a}/{layout}" for a in ("flux", "sd3", "pixart")
                                  for layout in ("diffusers", "bfl", "kohya")])
def test_lora_loader_equals_comfyui_loraloader_on_comfy_models(result, case):
    r = result[case]
    assert r["max_abs_diff"] <= 1e-6, r
    assert r["weights_changed"] == r["ours_changed"] > 20 and r["largest_change"] > 0.5, r
    assert r["unmatched"] == 0 and r["input_untouched"], r


def test_flux_schedule_on_comfy_model_sampling_flux(result):
    assert result["model_sampling"] == "ModelSamplingFlux"
    assert result["flux_schedule_max_abs_diff"] <= 1e-6


def test_our_sampler_runs_a_flux_model_like_comfy_euler(result):
    """SamplerCustom with our euler SAMPLER on our flow SIGMAS equals ComfyUI's euler on a real Flux MODEL."""
    assert result["flux_euler_max_abs_diff"] <= 1e-5 and result["flux_euler_output_std"] > 0.1


def test_block_weights_and_flash_sd3_nodes_on_comfy_models(result):
    """Block weights on a real Flux MODEL equal ComfyUI's loader on a per-block scaled file; the Flash SD3 recipe's
    SIGMAS are the shift-3 flow grid of ComfyUI's SD3 model_sampling and its LCM SAMPLER equals ComfyUI's lcm."""
    assert result["flux_block_weights_max_abs_diff"] <= 1e-6
    assert result["sd3_flash_sigmas"] == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert result["sd3_flash_lcm_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("case,names", [("unet_on_flux", ("sd15", "flux")), ("flux_on_sd3", ("flux", "sd3"))])
def test_wrong_base_lora_on_comfy_models_names_both(result, case, names):
    r = result[case]
    assert r["error"] is not None and r["untouched"], r
    first, second = (r["error"].index(n) for n in names)
    assert first < second, r["error"]


@pytest.mark.parametrize("arch", ["flux", "sd3", "pixart"])
def test_ci_reference_tables_agree_with_comfyui(result, arch):
    """The CI test's rewrite of ComfyUI's diffusers tables maps every entry as ComfyUI's own functions do."""
    r = result[f"reference_{arch}"]
    assert r["missing"] == [] and r["different"] == [] and r["entries"] > 20, r
