"""CLEAR (Liu et al. 2024, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up") for
NimbleDiff-Tiny-DiT: the DiT with local-window attention (nimblediff.core.caching.local_attention: each image query
sees the text and the image tokens within `radius`), its attention layers distilled from the full-attention teacher.

Student: the teacher's transformer + a LoRA on the attention projections only (to_q/k/v, to_out.0 of the image
stream, add_q/k/v_proj and to_add_out of the text stream), run through enable_nimble_cache(model, "clear") -- the
very processors the shipped adapter is used with. Teacher: a second, untouched copy (full attention, no LoRA).

Data (CLEAR distils on the teacher's self-generated samples): the InstaFlow couples' z0 (the teacher's own CFG
samples, runs/tiny-dit/couples) noised to sigma ~ U(0, 1), the flow path x_s = (1 - s) z0 + s eps that the uniform
25-step flow-Euler sampler walks (shift 1). Each sample is seen with its caption and with the empty prompt (CFG
uses both, so both velocities must stay the teacher's). Loss: MSE between student and teacher velocities.
"""

import os

import torch
import torch.nn.functional as F

from ..weights.clear import FORMAT

RADIUS = 2.0          # 8x8 grid (64x64 images): a disc of 13 tokens, ~ CLEAR's r = 16 on FLUX's 64x64 grid in area
GRID = (8, 8)
RANK = 32
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ZERO_ROWS = 24        # max_sequence_length the student sees (the card's recommended value; 24 + 24 text tokens)
FILE = "pytorch_lora_weights.safetensors"


def make_student(transformer, radius=RADIUS, rank=RANK):
    """A LoRA on the attention projections, then the windowed processors. Returns (LoRA params, LocalAttention)."""
    from ..pipelines.caching import enable_nimble_cache
    from .flash import add_lora

    params = add_lora(transformer, rank, TARGET_MODULES)
    return params, enable_nimble_cache(transformer, "clear", radius=radius)


def noised(z0, gen):
    """x_s on the straight path from the teacher's sample to fresh noise, s ~ U(0, 1) per sample."""
    s = torch.rand(len(z0), generator=gen).view(-1, 1, 1, 1)
    return (1 - s) * z0 + s * torch.randn(z0.shape, generator=gen), s.flatten()


def distill_loss(student, teacher, zs, s, embeds, pooled):
    """MSE between the windowed student's velocity and the full-attention teacher's, at the same (x_s, s, prompt)."""
    kw = dict(hidden_states=zs, timestep=s * 1000, encoder_hidden_states=embeds, pooled_projections=pooled)
    with torch.no_grad():
        target = teacher(**kw).sample
    return F.mse_loss(student(**kw).sample, target)


def save_adapter(transformer, folder, *, radius, grid=GRID, rank=RANK, steps=0, teacher=""):
    """The LoRA in diffusers' layout (transformer.<module>.lora_A/B.weight), fp16, with the window it was distilled
    for in the metadata (pipelines.caching reads `radius` from it)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {f"transformer.{k}": v.detach().to(torch.float16).contiguous()
             for k, v in get_peft_model_state_dict(transformer).items()}
    meta = {"format": FORMAT, "method": "CLEAR local-window attention (Liu et al. 2024)",
            "radius": f"{radius:g}", "grid": f"{grid[0]}x{grid[1]}", "patch_size": "2", "rank": str(rank),
            "alpha": str(rank), "target_modules": ",".join(TARGET_MODULES), "steps": str(steps),
            "teacher": os.path.basename(os.path.normpath(teacher)) if teacher else ""}
    path = os.path.join(folder, FILE)
    save_file(state, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    return path
