"""NimbleDiff Block Plan (DiT) on a real ComfyUI MODEL: NimbleDiff-Tiny-DiT loaded by NimbleDiff Diffusers DiT Loader
(ComfyUI's SD3 MMDiT), sampled by comfy.sample.sample (KSampler's path: euler, "normal", CFG 5, 25 steps) or, for a plan
with searched sigmas, by comfy.sample.sample_custom on the node's SIGMAS, against enable_nimble_cache(pipe,
"block_plan") on StableDiffusion3Pipeline with the same folder, prompt, starting noise and plan file:

- a plan computing every block is the unpatched MODEL bit for bit;
- a plan skipping about half the blocks: the node and the pipeline run the same blocks at every step, and their
  latents agree as closely as the uncached ComfyUI and diffusers runs do (float rounding only), while the plan did
  change the result;
- a plan searched on the pipeline with its sigmas (pipelines.caching.search_block_plan, search_sigmas=True): the
  node's SIGMAS are the plan's, and node + sample_custom agree with the pipeline called with plan_sigmas;
- the node's SIGMAS for a plan without sigmas are the "normal" schedule KSampler uses for the plan's step count;
- a plan for another block count is refused naming the file, and the MODEL is left as it was.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python \
        python -m pytest tests/comfyui/test_block_plan_real.py

The comparisons run in one process under COMFYUI_PYTHON (this file as a script: `python <this file> parity <comfyui>
<pack>`).
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

PROMPTS = ("a red circle on the left", "a blue square in the center")
STEPS, CFG, ZERO_ROWS = 25, 5.0, 24


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _parity(comfy: str, pack: str) -> dict:
    import random
    import tempfile

    import torch

    comfy_harness._import_pack(comfy, pack)
    import folder_paths
    from nimblediff.core.caching import BlockPlan, block_search
    from nimblediff.errors import NimbleDiffError
    from nimblediff.nodes.caching import BlockPlanModel
    from nimblediff.pipelines.caching import (disable_nimble_cache, enable_nimble_cache, plan_sigmas,
                                              search_block_plan)

    rig = comfy_harness.DiTRig(STEPS, CFG, ZERO_ROWS)
    model, pipe, mm = rig.model, rig.pipe, rig.mm
    encode, comfy_run, pipe_run = rig.encode, rig.comfy_run, rig.pipe_run
    node, out = BlockPlanModel(), {"runs": []}
    dit = mm.diffusion_model
    inputs = Path(tempfile.mkdtemp())
    folder_paths.set_input_directory(str(inputs))
    n = len(block_search.dit_block_paths(dit))

    rng = random.Random(0)
    half = BlockPlan(((True,) * n,) + tuple(tuple(rng.random() < 0.5 for _ in range(n)) for _ in range(STEPS - 1)))
    half.to_json(inputs / "half.json", block_search.model_family(dit))
    BlockPlan.full(STEPS, n).to_json(inputs / "full.json", block_search.model_family(dit))
    gen = torch.Generator().manual_seed(0)
    for prompt in PROMPTS:
        z = torch.randn(1, 4, 16, 16, generator=gen)
        positive = encode(prompt)
        uncached, ref = comfy_run(model, positive, z), pipe_run(prompt, z)
        run = {"prompt": prompt, "uncached_comfy_vs_pipe": max_diff(uncached, ref), "scale": float(ref.abs().max())}
        full, sigmas_full = node.patch(model, "full.json")
        run["full_vs_uncached"] = max_diff(comfy_run(full, positive, z), uncached)
        pipe.scheduler.set_timesteps(STEPS)
        run["default_sigmas_vs_scheduler"] = max_diff(sigmas_full, pipe.scheduler.sigmas)
        patched, _ = node.patch(model, "half.json")
        ours = comfy_run(patched, positive, z)
        cache = enable_nimble_cache(pipe, "block_plan", plan=str(inputs / "half.json"))
        theirs = pipe_run(prompt, z)
        disable_nimble_cache(pipe)
        node_cache = patched.model_options["model_function_wrapper"].cache
        run.update(node_rows=[list(r) for _, r in node_cache.decisions],
                   pipe_rows=[list(r) for _, r in cache.decisions], plan_rows=[list(r) for r in half.blocks],
                   node_vs_pipe=max_diff(ours, theirs), node_vs_uncached=max_diff(ours, uncached))
        out["runs"].append(run)
    out["input_model_options"] = sorted(model.model_options)

    # a plan searched jointly with its sigmas on the pipeline; the node's SIGMAS drive SamplerCustom's path
    result = search_block_plan(pipe, ["a large blue square on the right"], 0.6, path=inputs / "joint.json",
                               search_sigmas=True, reference_steps=50, population=4, generations=1,
                               num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64,
                               max_sequence_length=ZERO_ROWS)
    plan = result["plan"]
    z, prompt = torch.randn(1, 4, 16, 16, generator=gen), PROMPTS[0]
    patched, sigmas = node.patch(model, "joint.json")
    ours = comfy_run(patched, encode(prompt), z, sigmas)
    cache = enable_nimble_cache(pipe, "block_plan", plan=str(inputs / "joint.json"))
    theirs = pipe_run(prompt, z, sigmas=plan_sigmas(pipe, plan))
    disable_nimble_cache(pipe)
    out["joint"] = {"sigmas_vs_plan": max_diff(sigmas, torch.tensor(plan.sigmas)), "evaluations": plan.evaluations(),
                    "node_rows": [list(r) for _, r in patched.model_options["model_function_wrapper"].cache.decisions],
                    "pipe_rows": [list(r) for _, r in cache.decisions], "plan_rows": [list(r) for r in plan.blocks],
                    "node_vs_pipe": max_diff(ours, theirs), "scale": float(theirs.abs().max())}

    # another block count: refused, the MODEL unchanged
    BlockPlan.full(STEPS, n + 1).to_json(inputs / "other.json", block_search.model_family(dit))
    try:
        node.patch(model, "other.json")
        message = None
    except NimbleDiffError as exc:
        message = str(exc)
    out["refused"] = {"error": message, "n": n, "untouched": "model_function_wrapper" not in model.model_options
                      and not any("forward" in m.__dict__ for m in dit.modules())}
    return out


if __name__ == "__main__":
    comfy_harness.script_main(sys.argv[1:], _parity, __doc__)
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    parity = comfy_harness.dit_parity_fixture(HERE)

    def test_full_plan_is_the_unpatched_model_and_default_sigmas_are_ksamplers(parity):
        for run in parity["runs"]:
            assert run["full_vs_uncached"] == 0.0, run
            assert run["default_sigmas_vs_scheduler"] <= 1e-5, run
        assert "model_function_wrapper" not in parity["input_model_options"]

    def test_node_runs_the_blocks_the_pipeline_runs_and_agrees_with_it(parity):
        """As close as the uncached runs of the two stacks (float rounding), and the plan changed the result."""
        for run in parity["runs"]:
            assert run["node_rows"] == run["pipe_rows"] == run["plan_rows"], run["prompt"]
            assert run["uncached_comfy_vs_pipe"] <= 1e-4 and run["scale"] > 0.5, run
            assert run["node_vs_pipe"] <= 1e-4 and run["node_vs_uncached"] > 1e-2, run

    def test_a_jointly_searched_plan_drives_sampler_custom_like_the_pipeline(parity):
        r = parity["joint"]
        assert r["sigmas_vs_plan"] == 0.0 and r["evaluations"] == round(0.6 * STEPS * 8), r
        assert r["node_rows"] == r["pipe_rows"] == r["plan_rows"]
        assert r["node_vs_pipe"] <= 1e-4 and r["scale"] > 0.5, r

    def test_a_plan_for_another_block_count_is_refused_and_the_model_unchanged(parity):
        r = parity["refused"]
        assert r["untouched"] and r["error"] is not None, r
        assert f"made for {r['n'] + 1} transformer blocks; this model has {r['n']}" in r["error"], r
