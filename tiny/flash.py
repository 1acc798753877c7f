"""Flash Diffusion distillation (Chadebec et al. 2024) into a 4-step LoRA: of the NimbleDiff-Tiny UNet (DDIM, below)
and of NimbleDiff-Tiny-DiT (rectified flow, `flow_distill_loss`).

The student (UNet + LoRA, no CFG) sees x_t noised from a real latent at one of the four LCM timesteps and must
predict, in one evaluation, the x0 the teacher (same UNet, LoRA off, CFG) reaches after several DDIM steps from x_t.
The timestep distribution over the four modes shifts during training (Flash's shifting mixture). The adversarial
and DMD terms of the paper are skipped: at this size the distillation loss alone is what the budget allows.
"""

import os

import torch
import torch.nn.functional as F

from .dit import flow_euler_cfg

STUDENT_TIMESTEPS = torch.tensor([999, 759, 499, 259])  # LCMScheduler's 4-step trailing schedule
# Mode probabilities (over STUDENT_TIMESTEPS) per third of training: start on the low-noise modes, where the
# teacher target is closest to what the UNet already does, and end weighted to the high-noise ones.
MODE_PROBS = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]])
TEACHER_STEPS = 4
GUIDANCE = 5.0
RANK = 16
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def add_lora(unet, rank=RANK, target_modules=TARGET_MODULES):
    """Attach a PEFT LoRA (alpha = rank, so diffusers' loader, which assumes that without alphas, agrees)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


class LoraParams(torch.nn.Module):
    """Only the LoRA tensors of a UNet, as something with state_dict / load_state_dict for checkpoints."""

    def __init__(self, unet):
        super().__init__()
        self._named = {n: p for n, p in unet.named_parameters() if "lora_" in n}

    def state_dict(self, *a, **k):
        return {n: p.detach().clone() for n, p in self._named.items()}

    def load_state_dict(self, state, strict=True):
        missing = set(self._named) ^ set(state)
        if missing:
            raise KeyError(f"LoRA checkpoint keys differ: {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in self._named.items():
                p.copy_(state[n])


def x0_from_eps(zt, eps, a):
    return (zt - (1 - a).sqrt() * eps) / a.sqrt()


@torch.no_grad()
def teacher_x0(unet, zt, t, cond, uncond, alphas, steps=TEACHER_STEPS, guidance=GUIDANCE):
    """DDIM with CFG from per-sample timesteps t down to 0 in `steps` evaluations; returns the final x0."""
    unet.disable_adapters()
    try:
        x, b = zt, len(zt)
        for k in range(steps):
            tk = (t.float() * (1 - k / steps)).round().long()                # (B,)
            tn = (t.float() * (1 - (k + 1) / steps)).round().long()
            eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([tk, tk]),
                                torch.cat([uncond.expand(b, -1, -1), cond])).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            a = alphas[tk].view(-1, 1, 1, 1)
            x0 = x0_from_eps(x, eps, a)
            if k == steps - 1:
                return x0
            an = alphas[tn].view(-1, 1, 1, 1)
            x = an.sqrt() * x0 + (1 - an).sqrt() * eps
    finally:
        unet.enable_adapters()


def sample_timesteps(n, progress, gen):
    probs = MODE_PROBS[min(int(progress * len(MODE_PROBS)), len(MODE_PROBS) - 1)]
    return STUDENT_TIMESTEPS[torch.multinomial(probs, n, replacement=True, generator=gen)]


def distill_loss(unet, z0, cond, uncond, alphas, progress, gen):
    """One Flash step: noise real latents to a student timestep, match the teacher's multi-step x0."""
    t = sample_timesteps(len(z0), progress, gen)                              # (B,)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=gen)
    target = teacher_x0(unet, zt, t, cond, uncond, alphas)                     # (B, 4, 16, 16)
    pred = x0_from_eps(zt, unet(zt, t, cond).sample, a)
    return F.mse_loss(pred, target)


def save_lora(pipe, folder):
    """Diffusers/PEFT layout of public Flash releases: pytorch_lora_weights.safetensors, unet.* / transformer.*
    lora_A/B.weight."""
    from peft.utils import get_peft_model_state_dict

    os.makedirs(folder, exist_ok=True)
    if hasattr(pipe, "transformer"):
        type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    else:
        type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))


# ---------------------------------------------------------------- rectified flow (the DiT)
# The student runs flow Euler on the uniform 4-step grid (what bench/quality.py and the pipelines use at 4 steps),
# predicting v with x0 = x_s - s v. Its target from x_s is the teacher's flow-Euler CFG sample from sigma s to 0.
# At s = 1, x_s is pure noise and that target is exactly an InstaFlow couple (16 teacher steps, CFG), so those are
# read from the couples already made rather than recomputed.

FLOW_SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25])
FLOW_TEACHER_STEPS = 16  # over the whole path: from sigma s the teacher takes round(16 s) steps (12 from 0.75)
DIT_RANK = 32
DIT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def sample_flow_modes(n, progress, gen):
    """Indices into FLOW_SIGMAS from Flash's shifting mixture (MODE_PROBS, index 0 = the noisiest mode)."""
    probs = MODE_PROBS[min(int(progress * len(MODE_PROBS)), len(MODE_PROBS) - 1)]
    return torch.multinomial(probs, n, replacement=True, generator=gen)


def teacher_flow_x0(transformer, zs, s, embeds, pooled, null_embeds, null_pooled, cfg, steps):
    """The teacher's flow-Euler CFG sample from sigma s (a float) to 0 in `steps` steps, the LoRA switched off."""
    transformer.disable_adapters()
    try:
        return flow_euler_cfg(transformer, zs, s, embeds, pooled, null_embeds, null_pooled, cfg, steps)
    finally:
        transformer.enable_adapters()


def flow_distill_loss(transformer, zs, s, target, embeds, pooled):
    """One student evaluation at sigma s per sample (no CFG); x0 = x_s - s v matched to the teacher's x0."""
    v = transformer(hidden_states=zs, timestep=s * 1000, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    return F.mse_loss(zs - s.view(-1, 1, 1, 1) * v, target)
