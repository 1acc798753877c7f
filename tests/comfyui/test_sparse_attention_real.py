"""NimbleDiff Sparse Attention (Re-ttention) on a real ComfyUI MODEL: NimbleDiff-Tiny-DiT loaded by NimbleDiff Diffusers
DiT Loader (ComfyUI's SD3 MMDiT, attention through comfy.ldm.modules.attention.optimized_attention and its
transformer_options["optimized_attention_override"] hook), sampled by comfy.sample.sample (euler, "normal", CFG 5,
25 steps), against enable_nimble_cache(pipe, "rettention") on StableDiffusion3Pipeline with the same folder, prompt
and starting noise:

- keep 1 is ComfyUI's own attention: the patched MODEL's latents equal the unpatched MODEL's bit for bit, and the
  input MODEL keeps no override;
- sparse settings: the node and the pipeline make the same dense / sparse attention calls and their latents agree as
  closely as the uncached ComfyUI and diffusers runs do, while both differ from the dense result;
- ComfyUI's Flux and PixArt MODELs are refused with an error naming the model type, the MODEL left as it was.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python python -m pytest tests/comfyui/test_sparse_attention_real.py
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
STEPS, CFG, ZERO_ROWS = 25, 5.0, 24
SETTINGS = ({"keep": 0.25, "warmup": 5, "refresh": 0, "reshape": True},
            {"keep": 0.1, "warmup": 3, "refresh": 5, "reshape": True},
            {"keep": 0.25, "warmup": 5, "refresh": 0, "reshape": False})


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _parity(comfy: str, pack: str) -> dict:
    import torch

    comfy_harness._import_pack(comfy, pack)
    from nimblediff.errors import NimbleDiffError
    from nimblediff.nodes.caching import SparseAttentionModel
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    rig = comfy_harness.DiTRig(STEPS, CFG, ZERO_ROWS)
    model, pipe = rig.model, rig.pipe
    encode, comfy_run, pipe_run = rig.encode, rig.comfy_run, rig.pipe_run
    node, out = SparseAttentionModel(), {"runs": []}

    gen = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        z = torch.randn(1, 4, 16, 16, generator=gen)
        positive = encode(prompt)
        dense, ref = comfy_run(model, positive, z), pipe_run(prompt, z)
        run = {"prompt": prompt, "dense_comfy_vs_pipe": max_diff(dense, ref), "scale": float(ref.abs().max())}
        (one,) = node.patch(model, 1.0, 1)
        state = one.model_options["model_function_wrapper"].state
        run["keep1_vs_dense"] = max_diff(comfy_run(one, positive, z), dense)
        run["keep1_calls"] = [state.dense_calls, state.sparse_calls]
        run["settings"] = []
        for s in SETTINGS:
            (patched,) = node.patch(model, s["keep"], s["warmup"], s["refresh"], s["reshape"])
            ours = comfy_run(patched, positive, z)
            node_state = patched.model_options["model_function_wrapper"].state
            pipe_state = enable_nimble_cache(pipe, "rettention", **s)
            theirs = pipe_run(prompt, z)
            disable_nimble_cache(pipe)
            run["settings"].append({
                **s, "node_calls": [node_state.dense_calls, node_state.sparse_calls],
                "pipe_calls": [pipe_state.dense_calls, pipe_state.sparse_calls],
                "node_flops_kept": node_state.flops_kept, "pipe_flops_kept": pipe_state.flops_kept,
                "node_vs_pipe": max_diff(ours, theirs), "node_vs_dense": max_diff(ours, dense),
                "pipe_vs_dense": max_diff(theirs, ref), "finite": bool(torch.isfinite(ours).all())})
        out["runs"].append(run)
    out["input_transformer_options"] = sorted(model.model_options.get("transformer_options", {}))
    out["input_model_options"] = sorted(model.model_options)

    import dit_real

    out["refused"] = {}
    for arch in ("flux", "pixart"):
        other = dit_real.build(arch)
        before = {k: v.clone() for k, v in other.model.diffusion_model.state_dict().items()}
        try:
            node.patch(other, 0.25, 5)
            message = None
        except NimbleDiffError as exc:
            message = str(exc)
        after = other.model.diffusion_model.state_dict()
        out["refused"][arch] = {
            "class": type(other.model.diffusion_model).__name__, "error": message,
            "untouched": "model_function_wrapper" not in other.model_options
            and "optimized_attention_override" not in other.model_options.get("transformer_options", {})
            and all(torch.equal(v, after[k]) for k, v in before.items())}
    return out


if __name__ == "__main__":
    comfy_harness.script_main(sys.argv[1:], _parity, __doc__)
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    parity = comfy_harness.dit_parity_fixture(HERE)

    def test_keep_one_is_the_unpatched_model(parity):
        for run in parity["runs"]:
            assert run["keep1_vs_dense"] == 0.0 and run["keep1_calls"][1] == 0, run
        assert "optimized_attention_override" not in parity["input_transformer_options"]
        assert "model_function_wrapper" not in parity["input_model_options"]

    def test_node_and_pipeline_make_the_same_calls_and_agree(parity):
        """Both surfaces: 2 joint blocks x 25 steps x 1 batched call (cond and uncond together) per step; the latents
        agree as closely as the dense runs of the two stacks, and sparse attention changed the result."""
        for run in parity["runs"]:
            assert run["dense_comfy_vs_pipe"] <= 1e-4 and run["scale"] > 0.5, run
            for s in run["settings"]:
                assert s["node_calls"] == s["pipe_calls"] and s["node_calls"][1] > 0, (run["prompt"], s)
                assert abs(s["node_flops_kept"] - s["pipe_flops_kept"]) < 1e-9, s
                assert s["finite"] and s["node_vs_dense"] > 1e-3 and s["pipe_vs_dense"] > 1e-3, s
                assert s["node_vs_pipe"] <= max(1e-3, 0.05 * s["node_vs_dense"]), (run["prompt"], s)

    @pytest.mark.parametrize("arch, cls", [("flux", "Flux"), ("pixart", "PixArtMS")])
    def test_other_dit_types_are_refused_by_name_and_left_unchanged(parity, arch, cls):
        r = parity["refused"][arch]
        assert r["class"] == cls and r["untouched"], r
        assert r["error"] is not None and f"model type {cls} is not supported" in r["error"], r
        assert "MMDiT" in r["error"], r
