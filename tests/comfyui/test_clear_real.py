"""NimbleDiff CLEAR Local Attention (DiT) on a real ComfyUI MODEL: NimbleDiff-Tiny-DiT loaded by NimbleDiff Diffusers
DiT Loader (ComfyUI's SD3 MMDiT; attention through comfy.ldm.modules.attention's optimized_attention_override hook,
the LoRA through ComfyUI's own weight patches), sampled by comfy.sample.sample (euler, "normal", CFG 3, 25 steps),
against enable_nimble_cache(pipe, "clear", ...) on StableDiffusion3Pipeline with the same folder, prompt, noise,
adapter and window:

- a radius past the grid diagonal without adapter is ComfyUI's own attention: the unpatched MODEL's latents bit for
  bit, and the input MODEL keeps no override, wrapper or patch;
- the window alone (radius 2) and the embedded CLEAR adapter with its window: node and pipeline agree as closely as
  the unpatched ComfyUI and diffusers runs do, both differ from full attention, and the adapter moves the windowed
  result back toward it;
- ComfyUI's Flux MODEL is refused with an error naming the model type.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python python -m pytest tests/comfyui/test_clear_real.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
import comfy_harness  # noqa: E402
from comfy_harness import max_diff  # noqa: E402

PROMPTS = ("a red circle on the left", "a small green triangle at the top")
STEPS, CFG, ZERO_ROWS, RADIUS = 25, 3.0, 24, 2.0


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _parity(comfy: str, pack: str) -> dict:
    import torch

    comfy_harness._import_pack(comfy, pack)
    from nimblediff import TINY_DIT_CLEAR_LORA
    from nimblediff.errors import NimbleDiffError
    from nimblediff.nodes.caching import CLEAR_EMBEDDED, CLEAR_NONE, ClearLocalAttentionModel
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    rig = comfy_harness.DiTRig(STEPS, CFG, ZERO_ROWS)
    model, pipe = rig.model, rig.pipe
    encode, comfy_run, pipe_run = rig.encode, rig.comfy_run, rig.pipe_run
    node, out = ClearLocalAttentionModel(), {"runs": []}

    gen = torch.Generator().manual_seed(0)
    first = None
    for prompt in PROMPTS:
        z = torch.randn(1, 4, 16, 16, generator=gen)
        positive = encode(prompt)
        dense, ref = comfy_run(model, positive, z), pipe_run(prompt, z)
        first = first or (positive, z, dense)
        run = {"prompt": prompt, "dense_comfy_vs_pipe": max_diff(dense, ref), "scale": float(ref.abs().max())}
        (full,) = node.patch(model, CLEAR_NONE, 20.0)
        run["full_vs_dense"] = max_diff(comfy_run(full, positive, z), dense)
        run["settings"] = []
        for adapter, pipe_adapter in ((CLEAR_NONE, None), (CLEAR_EMBEDDED, TINY_DIT_CLEAR_LORA)):
            (patched,) = node.patch(model, adapter, RADIUS)
            ours = comfy_run(patched, positive, z)
            node_state = patched.model_options["model_function_wrapper"].state
            pipe_state = enable_nimble_cache(pipe, "clear", radius=RADIUS, adapter=pipe_adapter)
            theirs = pipe_run(prompt, z)
            disable_nimble_cache(pipe)
            run["settings"].append({
                "adapter": adapter, "node_calls": node_state.calls, "pipe_calls": pipe_state.calls,
                "node_flops_kept": node_state.flops_kept, "pipe_flops_kept": pipe_state.flops_kept,
                "node_vs_pipe": max_diff(ours, theirs), "node_vs_dense": max_diff(ours, dense),
                "pipe_vs_dense": max_diff(theirs, ref), "finite": bool(torch.isfinite(ours).all()),
                "rmse_to_dense": float((ours - dense).pow(2).mean().sqrt())})
        out["runs"].append(run)
    out["input_transformer_options"] = sorted(model.model_options.get("transformer_options", {}))
    out["input_model_options"] = sorted(model.model_options)
    out["input_patches"] = len(model.patches)
    # ComfyUI leaves the last sampled clone's weight patches applied until another MODEL samples: the input MODEL
    # sampled again must be back to its own weights
    out["input_again_vs_dense"] = max_diff(comfy_run(model, first[0], first[1]), first[2])

    import dit_real

    other = dit_real.build("flux")
    try:
        node.patch(other, CLEAR_NONE, RADIUS)
        out["flux_error"] = None
    except NimbleDiffError as exc:
        out["flux_error"] = str(exc)
    out["flux_untouched"] = "optimized_attention_override" not in other.model_options.get("transformer_options", {})
    return out


if __name__ == "__main__":
    comfy_harness.script_main(sys.argv[1:], _parity, __doc__)
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    parity = comfy_harness.dit_parity_fixture(HERE)

    def test_full_window_is_the_unpatched_model_and_the_input_is_untouched(parity):
        for run in parity["runs"]:
            assert run["full_vs_dense"] == 0.0, run
        assert "optimized_attention_override" not in parity["input_transformer_options"]
        assert "model_function_wrapper" not in parity["input_model_options"]
        assert parity["input_patches"] == 0 and parity["input_again_vs_dense"] == 0.0

    def test_node_and_pipeline_agree_with_and_without_the_adapter(parity):
        """Same attention calls and FLOP share on both surfaces; latents agree as closely as the two stacks' dense
        runs; the window changes the image and the distilled adapter brings it closer to full attention."""
        for run in parity["runs"]:
            assert run["dense_comfy_vs_pipe"] <= 1e-4 and run["scale"] > 0.5, run
            for s in run["settings"]:
                assert s["node_calls"] == s["pipe_calls"] > 0, (run["prompt"], s)
                assert abs(s["node_flops_kept"] - s["pipe_flops_kept"]) < 1e-9 and s["node_flops_kept"] < 1, s
                assert s["finite"] and s["node_vs_dense"] > 1e-3 and s["pipe_vs_dense"] > 1e-3, s
                assert s["node_vs_pipe"] <= max(1e-3, 0.05 * s["node_vs_dense"]), (run["prompt"], s)
        window, clear = (sum(run["settings"][i]["rmse_to_dense"] for run in parity["runs"]) for i in (0, 1))
        assert clear < window, (clear, window)

    def test_flux_is_refused_by_name(parity):
        assert parity["flux_error"] is not None and "model type Flux is not supported" in parity["flux_error"]
        assert parity["flux_untouched"]
