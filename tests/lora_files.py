"""Build real LoRA files with diffusers + PEFT (the independent writer) for loader tests."""

from __future__ import annotations

import torch


def write_peft_lora(pipe, folder, rank: int = 4, alpha: float | None = None, seed: int = 0,
                    text_encoder: bool = True, name: str = "pytorch_lora_weights.safetensors"):
    """Add a random PEFT LoRA to copies of a diffusers SD pipeline's UNet (and text encoder) and save it with
    diffusers' save_lora_weights; the pipeline itself is left untouched. Returns the file path."""
    import copy
    import types

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = dict(r=rank, lora_alpha=alpha or rank, init_lora_weights=False)
    torch.manual_seed(seed)
    pipe = types.SimpleNamespace(unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder))
    pipe.unet.add_adapter(LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                     "ff.net.2", "conv1"], **config), adapter_name="t")
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name="t")}
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
                                                 **config), adapter_name="t")
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name="t")
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=name, safe_serialization=True, **layers)
    return f"{folder}/{name}"


def diffusers_fused(pipe, path, scale: float = 1.0):
    """Reference weights: diffusers load_lora_weights + fuse_lora. Returns (unet sd, text encoder sd)."""
    pipe.load_lora_weights(path, adapter_name="ref")
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return ({k: v.clone() for k, v in pipe.unet.state_dict().items()},
            {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()})


def two_loras(pipe, folder) -> dict:
    """The pair of LoRA files the adapter-operation tests share: a (rank 4, seed 0) and b (rank 2, seed 1)."""
    return {"a": write_peft_lora(pipe, folder, rank=4, seed=0, name="a.safetensors"),
            "b": write_peft_lora(pipe, folder, rank=2, seed=1, name="b.safetensors")}
