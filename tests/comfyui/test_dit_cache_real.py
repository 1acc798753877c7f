"""NimbleDiff First-Block Cache (DiT) on a real ComfyUI MODEL: NimbleDiff-Tiny-DiT loaded by NimbleDiff Diffusers DiT
Loader (ComfyUI's SD3 MMDiT), sampled by comfy.sample.sample (KSampler's path: euler, "normal", CFG 5, 25 steps), against
the same cache on the diffusers side (enable_nimble_cache(pipe, "first_block") on StableDiffusion3Pipeline) with the
same folder, prompt and starting noise:

- threshold 0 never skips: the patched MODEL's latents equal the unpatched MODEL's bit for bit;
- thresholds that skip: the node and the pipeline skip the same steps, and their latents agree as closely as the
  uncached ComfyUI and diffusers runs do (the two stacks differ by float rounding only);
- a schedule searched offline on the pipeline (pipelines.caching.search_dit_schedule), saved once, drives the node
  (schedule_file, read from ComfyUI's input folder) and the pipeline to the same steps and latents;
- ComfyUI's stock SD3 MMDiT (comfy.supported_models.SD3, no NimbleDiff subclass) is accepted too;
- Flux and PixArt MODELs built in ComfyUI's own classes are refused with an error naming the model type, and the MODEL
  is left as it was;
- the shipped workflow (workflows/api/nimblediff_tiny_dit_cache.json) runs in a ComfyUI server.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python python -m pytest tests/comfyui/test_dit_cache_real.py

The comparisons run in one process under COMFYUI_PYTHON (this file as a script: `python <this file> parity <comfyui>
<pack>`), the server as in tests/comfyui/test_tiny_dit_real.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
import comfy_harness  # noqa: E402
from comfy_harness import max_diff  # noqa: E402

PROMPTS = ("a red circle on the left", "a blue square in the center", "a small green triangle at the top")
STEPS, CFG, ZERO_ROWS = 25, 5.0, 24
SETTINGS = ({"threshold": 0.3, "warmup": 5}, {"threshold": 0.15, "warmup": 1}, {"threshold": 0.45, "warmup": 5})


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _parity(comfy: str, pack: str) -> dict:
    import torch

    comfy_harness._import_pack(comfy, pack)
    from nimblediff.errors import NimbleDiffError
    from nimblediff.nodes.caching import FirstBlockCacheModel
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    rig = comfy_harness.DiTRig(STEPS, CFG, ZERO_ROWS)
    model, pipe = rig.model, rig.pipe
    encode, comfy_run, pipe_run = rig.encode, rig.comfy_run, rig.pipe_run
    folder = rig.folder
    node, out = FirstBlockCacheModel(), {"folder": str(folder), "runs": []}

    gen = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        z = torch.randn(1, 4, 16, 16, generator=gen)
        positive = encode(prompt)
        uncached, ref = comfy_run(model, positive, z), pipe_run(prompt, z)
        run = {"prompt": prompt, "uncached_comfy_vs_pipe": max_diff(uncached, ref), "scale": float(ref.abs().max())}
        (zero,) = node.patch(model, 0.0, 1)
        run["threshold0_vs_uncached"] = max_diff(comfy_run(zero, positive, z), uncached)
        run["threshold0_skipped"] = sum(k for _, k in zero.model_options["model_function_wrapper"].cache.decisions)
        run["settings"] = []
        for s in SETTINGS:
            (patched,) = node.patch(model, s["threshold"], s["warmup"])
            ours = comfy_run(patched, positive, z)
            cache = enable_nimble_cache(pipe, "first_block", **s)
            theirs = pipe_run(prompt, z)
            disable_nimble_cache(pipe)
            node_cache = patched.model_options["model_function_wrapper"].cache
            run["settings"].append({
                **s, "node_skipped": [st for st, k in node_cache.decisions if k],
                "pipe_skipped": [st for st, k in cache.decisions if k], "node_calls": len(node_cache.decisions),
                "node_vs_pipe": max_diff(ours, theirs), "node_vs_uncached": max_diff(ours, uncached),
                "pipe_vs_uncached": max_diff(theirs, ref)})
        out["runs"].append(run)
    out["input_model_options"] = sorted(model.model_options)

    # a schedule searched offline on the pipeline, one JSON read by the node (ComfyUI's input folder) and the pipeline
    import tempfile

    import folder_paths
    from nimblediff.pipelines.caching import search_dit_schedule

    inputs = tempfile.mkdtemp()
    folder_paths.set_input_directory(inputs)
    schedule, _ = search_dit_schedule(pipe, ["a large blue square on the right", "a small red star at the top"], 10,
                                      path=Path(inputs) / "dit-cache.json", seed=7000, num_inference_steps=STEPS,
                                      guidance_scale=CFG, height=64, width=64, max_sequence_length=ZERO_ROWS)
    z, prompt = torch.randn(1, 4, 16, 16, generator=gen), PROMPTS[0]
    (patched,) = node.patch(model, 0.3, 1, schedule_file="dit-cache.json")
    ours = comfy_run(patched, encode(prompt), z)
    cache = enable_nimble_cache(pipe, "first_block", schedule=str(Path(inputs) / "dit-cache.json"))
    theirs = pipe_run(prompt, z)
    disable_nimble_cache(pipe)
    out["schedule"] = {"compute": list(schedule.compute), "node_computed": [
        not k for _, k in patched.model_options["model_function_wrapper"].cache.decisions],
        "pipe_computed": [not k for _, k in cache.decisions], "node_vs_pipe": max_diff(ours, theirs),
        "vs_uncached": max_diff(theirs, pipe_run(prompt, z))}

    # ComfyUI's stock SD3 MMDiT (no NimbleDiff subclass): accepted; threshold 0 = the unpatched MODEL
    import dit_real

    sd3 = dit_real.build("sd3")
    x, sigma = torch.randn(2, 4, 16, 16, generator=gen), torch.full((2,), 0.6)
    kw = {"c_crossattn": torch.randn(2, 5, 40, generator=gen), "y": torch.randn(2, 24, generator=gen)}
    (stock,) = node.patch(sd3, 0.0, 1)
    wrapper = stock.model_options["model_function_wrapper"]
    with torch.no_grad():
        got = wrapper(sd3.model.apply_model, {"input": x, "timestep": sigma, "c": kw, "cond_or_uncond": [0, 1]})
        want = sd3.model.apply_model(x, sigma, **kw)
    out["stock_sd3"] = {"class": type(sd3.model.diffusion_model).__name__, "diff": max_diff(got, want),
                        "blocks": len(wrapper.cache.paths)}

    # model types the cache does not know: refused, named, the MODEL unchanged
    out["refused"] = {}
    for arch in ("flux", "pixart"):
        other = dit_real.build(arch)
        before = {k: v.clone() for k, v in other.model.diffusion_model.state_dict().items()}
        try:
            node.patch(other, 0.3, 5)
            message = None
        except NimbleDiffError as exc:
            message = str(exc)
        after = other.model.diffusion_model.state_dict()
        out["refused"][arch] = {
            "class": type(other.model.diffusion_model).__name__, "error": message,
            "untouched": "model_function_wrapper" not in other.model_options
            and all(torch.equal(v, after[k]) for k, v in before.items())
            and not any("forward" in m.__dict__ for m in other.model.diffusion_model.modules())}
    return out


if __name__ == "__main__":
    comfy_harness.script_main(sys.argv[1:], _parity, __doc__)
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    parity = comfy_harness.dit_parity_fixture(HERE)
    COMFY = comfy_harness.comfyui_path()                  # the server fixture below starts it

    def test_threshold_zero_is_the_uncached_model(parity):
        for run in parity["runs"]:
            assert run["threshold0_vs_uncached"] == 0.0 and run["threshold0_skipped"] == 0, run
        assert "model_function_wrapper" not in parity["input_model_options"]

    def test_node_skips_the_steps_the_diffusers_side_skips(parity):
        for run in parity["runs"]:
            for s in run["settings"]:
                assert s["node_calls"] == STEPS, s
                assert s["node_skipped"] == s["pipe_skipped"], (run["prompt"], s)
        assert any(s["node_skipped"] for run in parity["runs"] for s in run["settings"])

    def test_cached_latents_match_the_diffusers_side(parity):
        """As close as the uncached runs of the two stacks (float rounding: about 1e-5 on latents of scale 3-5), and
        the cache changed the result, so the comparison is not vacuous."""
        for run in parity["runs"]:
            assert run["uncached_comfy_vs_pipe"] <= 1e-4 and run["scale"] > 0.5, run
            for s in run["settings"]:
                assert s["node_vs_pipe"] <= 1e-4, (run["prompt"], s)
                if s["node_skipped"]:
                    assert s["node_vs_uncached"] > 1e-2 and s["pipe_vs_uncached"] > 1e-2, (run["prompt"], s)

    def test_a_searched_schedule_file_drives_node_and_pipeline_alike(parity):
        r = parity["schedule"]
        assert sum(r["compute"]) == 10 and r["node_computed"] == r["pipe_computed"] == r["compute"], r
        assert r["node_vs_pipe"] <= 1e-4 and r["vs_uncached"] > 1e-2, r

    def test_comfyuis_stock_sd3_mmdit_is_accepted(parity):
        r = parity["stock_sd3"]
        assert r["class"] == "OpenAISignatureMMDITWrapper" and r["blocks"] == 2 and r["diff"] == 0.0, r

    @pytest.mark.parametrize("arch, cls", [("flux", "Flux"), ("pixart", "PixArtMS")])
    def test_other_dit_types_are_refused_by_name_and_left_unchanged(parity, arch, cls):
        r = parity["refused"][arch]
        assert r["class"] == cls and r["untouched"], r
        assert r["error"] is not None and f"model type {cls} is not supported" in r["error"], r
        assert "OpenAISignatureMMDITWrapper" in r["error"], r

    # ---- the server: the shipped workflow end to end, next to the uncached one
    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        srv = comfy_harness.ComfyServer(COMFY, tmp_path_factory.mktemp("comfy_dit_cache"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()

    def _images(server, name: str):
        import numpy as np
        from PIL import Image

        wf = json.loads((comfy_harness.PACK_DIR / "workflows" / "api" / f"{name}.json").read_text())
        out = []
        for entry in comfy_harness.output_images(server.run_prompt(wf)):
            with Image.open(server.base / "output" / entry.get("subfolder", "") / entry["filename"]) as img:
                out.append(np.asarray(img.convert("RGB"), dtype=np.float64))
        return out

    def test_shipped_cache_workflow_runs_and_stays_near_the_uncached_one(server):
        """nimblediff_tiny_dit_cache is nimblediff_tiny_dit_t2i with the cache node between loader and KSampler: the
        same 4 images within a few pixel levels (RMSE), but not the same bits (steps were skipped)."""
        cached, plain = _images(server, "nimblediff_tiny_dit_cache"), _images(server, "nimblediff_tiny_dit_t2i")
        assert len(cached) == len(plain) == 4 and cached[0].shape == (64, 64, 3)
        rmse = [float(((a - b) ** 2).mean() ** 0.5) for a, b in zip(cached, plain)]
        assert max(rmse) < 12 and any(r > 0 for r in rmse), rmse
