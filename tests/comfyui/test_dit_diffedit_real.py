"""NimbleDiff DiffEdit on a real ComfyUI SD3 MODEL against DiTEditPipeline(method="diffedit"): NimbleDiff-Tiny-DiT
loaded by NimbleDiff Diffusers DiT Loader (ComfyUI's MMDiT), the node run under inference_mode as ComfyUI runs it, on a
source latent ComfyUI generated; the pipeline on the same folder, latent, sigmas, prompts, guidance and noise seed.

- the automatic masks agree (cells that differ: at most one, from float rounding at the threshold);
- the edited latents agree as closely as the two hosts' plain DiT runs do (tests/comfyui/test_tiny_dit_real.py);
- on both sides the latent outside the mask is the source's, exactly, and inside it changed.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python
        python -m pytest tests/comfyui/test_dit_diffedit_real.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
import comfy_harness  # noqa: E402
from comfy_harness import max_diff  # noqa: E402

SOURCE, TARGET = "a red circle on the left", "a blue circle on the left"
STEPS, CFG, ZERO_ROWS = 6, 3.0, 24
MASK = {"mask_strength": 0.8, "mask_noises": 4, "mask_ratio": 3.0, "mask_threshold": 0.5, "mask_blur": 1.0}


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _parity(comfy: str, pack: str) -> dict:
    import torch

    comfy_harness._import_pack(comfy, pack)
    import comfy.sample
    import comfy.samplers

    from nimblediff.nodes.diffedit import DiffEdit
    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    rig = comfy_harness.DiTRig(STEPS, CFG, ZERO_ROWS)
    model, mm = rig.model, rig.mm
    source, target = rig.encode(SOURCE), rig.encode(TARGET)
    pipe = DiTEditPipeline(**rig.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    sigmas = torch.tensor(pipe._sigmas(pipe.editing_param(), STEPS, 1.0))     # both sides edit along these

    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample_custom(model, z, CFG, comfy.samplers.sampler_object("euler"), sigmas, source,
                                         rig.negative, torch.zeros_like(z), disable_pbar=True, seed=0)
    with torch.inference_mode():                           # as ComfyUI's executor runs nodes
        edited, comfy_mask = DiffEdit().edit(model, source, target, rig.negative, {"samples": samples}, sigmas, CFG,
                                             seed=0, **MASK)
    x0, edited = mm.process_latent_in(samples), mm.process_latent_in(edited["samples"])
    out = pipe(latents=x0.clone(), prompt=TARGET, source_prompt=SOURCE, method="diffedit", num_inference_steps=STEPS,
               guidance_scale=CFG, max_sequence_length=ZERO_ROWS, generator=torch.Generator().manual_seed(0),
               output_type="latent", **MASK)
    ours = out.mask[0, 0]
    keep_comfy = (comfy_mask[0] == 0).expand_as(x0[0])
    keep_pipe = (ours == 0).expand_as(x0[0])
    return {
        "cells": ours.numel(), "comfy_cells": int(comfy_mask.sum()), "pipe_cells": int(ours.sum()),
        "mask_cells_differ": int((comfy_mask[0] != ours).sum()),
        "edited_vs_pipeline": max_diff(edited, out.images), "scale": float(out.images.abs().max()),
        "comfy_kept_exactly": bool(torch.equal(edited[0][keep_comfy], x0[0][keep_comfy])),
        "pipe_kept_exactly": bool(torch.equal(out.images[0][keep_pipe], x0[0][keep_pipe])),
        "change_inside": max_diff(edited, x0),
    }


if __name__ == "__main__":
    comfy_harness.script_main(sys.argv[1:], _parity, __doc__)
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    parity = comfy_harness.dit_parity_fixture(HERE)

    def test_the_automatic_masks_agree(parity):
        assert 0 < parity["pipe_cells"] < parity["cells"] // 2, parity
        assert parity["mask_cells_differ"] <= 1, parity

    def test_the_edits_agree_and_keep_the_rest_exactly(parity):
        assert parity["comfy_kept_exactly"] and parity["pipe_kept_exactly"], parity
        assert parity["change_inside"] > 0.1, parity
        if parity["mask_cells_differ"] == 0:
            assert parity["edited_vs_pipeline"] <= 1e-3 * max(parity["scale"], 1.0), parity
