"""ComfyUI's LoraLoader on DiT models, as the reference for our nodes: the key map of comfy/lora.py
(model_lora_keys_unet) with the diffusers tables of comfy/utils.py (flux_to_diffusers, mmdit_to_diffusers,
pixart_to_diffusers), the LoRA reading of comfy/lora.py load_lora + comfy/weight_adapter/lora.py, and the weight
arithmetic of comfy/lora.py calculate_weight (offset = rows narrowed, function applied to the difference).

Written independently from ComfyUI's behaviour (ComfyUI is GPL-3.0; nothing is copied), with its quirks kept on
purpose because they are what a user gets: SD3's fused rows are sized by depth * 64 (not by the weights), Flux's
single-block MLP rows by hidden_size * 4, and the last SD3 context block's adaLN is always swapped.
When COMFYUI_PATH points at a ComfyUI checkout whose comfy.utils imports, its own three table functions are used
instead of the ones below (`diffusers_table`).
"""

from __future__ import annotations

import os
import sys

import torch


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _qkv(out: dict, names, fused: str, size: int):
    for j, name in enumerate(names):
        out[name] = (fused, (0, j * size, size), None)


def flux_table(config: dict) -> dict:
    """diffusers module -> (ComfyUI weight key, (dim, start, length) or None, function or None); weights only."""
    h, out = config["hidden_size"], {}
    for i in range(config["depth"]):
        d, c = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        _qkv(out, [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{c}.img_attn.qkv.weight", h)
        _qkv(out, [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{c}.txt_attn.qkv.weight",
             h)
        for a, b in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                     ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                     ("ff_context.net.2", "txt_mlp.2")):
            out[f"{d}.{a}"] = (f"{c}.{b}.weight", None, None)
    for i in range(config["depth_single_blocks"]):
        d, c = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        _qkv(out, [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{c}.linear1.weight", h)
        out[f"{d}.proj_mlp"] = (f"{c}.linear1.weight", (0, 3 * h, 4 * h), None)
        out[f"{d}.norm.linear"] = (f"{c}.modulation.lin.weight", None, None)
        out[f"{d}.proj_out"] = (f"{c}.linear2.weight", None, None)
    for a, b in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"), ("context_embedder", "txt_in"),
                 ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                 ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                 ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                 ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")):
        out[a] = (f"diffusion_model.{b}.weight", None, None)
    out["norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, _swap)
    return out


def sd3_table(config: dict) -> dict:
    depth, out = config["depth"], {}
    size = depth * 64                   # ComfyUI's assumption: SD3 hidden size = 64 x depth
    for i in range(depth):
        d, c = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        _qkv(out, [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{c}.x_block.attn.qkv.weight", size)
        _qkv(out, [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
             f"{c}.context_block.attn.qkv.weight", size)
        for a, b in (("norm1_context.linear", "context_block.adaLN_modulation.1"),
                     ("attn.to_add_out", "context_block.attn.proj"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                     ("ff_context.net.2", "context_block.mlp.fc2"), ("norm1.linear", "x_block.adaLN_modulation.1"),
                     ("attn.to_out.0", "x_block.attn.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"),
                     ("ff.net.2", "x_block.mlp.fc2")):
            out[f"{d}.{a}"] = (f"{c}.{b}.weight", None, None)
    for a, b in (("context_embedder", "context_embedder"), ("pos_embed.proj", "x_embedder.proj"),
                 ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                 ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                 ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                 ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")):
        out[a] = (f"diffusion_model.{b}.weight", None, None)
    out["norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, _swap)
    last = depth - 1                    # always swapped, whatever its size (it is pre-only in SD3)
    out[f"transformer_blocks.{last}.norm1_context.linear"] = (
        f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight", None, _swap)
    return out


def pixart_table(config: dict) -> dict:
    h, out = config["hidden_size"], {}
    for i in range(config["depth"]):
        d, c = f"transformer_blocks.{i}", f"diffusion_model.blocks.{i}"
        _qkv(out, [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"], f"{c}.attn.qkv.weight", h)
        out[f"{d}.attn2.to_q"] = (f"{c}.cross_attn.q_linear.weight", None, None)
        _qkv(out, [f"{d}.attn2.to_k", f"{d}.attn2.to_v"], f"{c}.cross_attn.kv_linear.weight", h)
        for a, b in (("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                     ("attn2.to_out.0", "cross_attn.proj")):
            out[f"{d}.{a}"] = (f"{c}.{b}.weight", None, None)
    for a, b in (("adaln_single.emb.resolution_embedder.linear_1", "csize_embedder.mlp.0"),
                 ("adaln_single.emb.resolution_embedder.linear_2", "csize_embedder.mlp.2"),
                 ("adaln_single.emb.aspect_ratio_embedder.linear_1", "ar_embedder.mlp.0"),
                 ("adaln_single.emb.aspect_ratio_embedder.linear_2", "ar_embedder.mlp.2"),
                 ("pos_embed.proj", "x_embedder.proj"), ("caption_projection.linear_1", "y_embedder.y_proj.fc1"),
                 ("caption_projection.linear_2", "y_embedder.y_proj.fc2"),
                 ("adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                 ("adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2"),
                 ("adaln_single.linear", "t_block.1"), ("proj_out", "final_layer.linear")):
        out[a] = (f"diffusion_model.{b}.weight", None, None)
    return out


TABLES = {"flux": flux_table, "sd3": sd3_table, "pixart": pixart_table}


def _comfy_utils():
    """comfy.utils of the checkout at COMFYUI_PATH, or None (not set, or it does not import here)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        saved = sys.argv
        sys.argv = sys.argv[:1]          # comfy.cli_args parses the command line on import
        import comfy.utils
        return comfy.utils
    except Exception:  # noqa: BLE001 - a checkout that does not import is the same as none
        return None
    finally:
        sys.argv = saved


def diffusers_table(arch: str, config: dict) -> tuple[dict, str]:
    """(table, where it came from): ComfyUI's own functions when available, else the reimplementation above."""
    utils = _comfy_utils()
    if utils is not None:
        fn = {"flux": utils.flux_to_diffusers, "sd3": utils.mmdit_to_diffusers, "pixart": utils.pixart_to_diffusers}
        out = {}
        for k, v in fn[arch](config, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                v = (v, None, None) if isinstance(v, str) else (v[0], v[1], v[2] if len(v) > 2 else None)
                out[k[:-len(".weight")]] = v
        return out, "comfy.utils"
    return TABLES[arch](config), "reimplementation"


def lora_key_map(arch: str, config: dict, model_keys) -> dict:
    """LoRA module name -> target (model_lora_keys_unet for these three families)."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = (k, None, None)
            key_map[k[:-len(".weight")]] = (k, None, None)
    table, _ = diffusers_table(arch, config)
    for name, target in table.items():
        key_map[f"transformer.{name}"] = target
        if arch in ("sd3", "pixart"):
            key_map[f"base_model.model.{name}"] = target
        if arch in ("sd3", "flux"):
            key_map["lora_transformer_" + name.replace(".", "_")] = target
            key_map["lycoris_" + name.replace(".", "_")] = target
    return key_map


_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          ("_lora.up.weight", "_lora.down.weight"), (".lora.up.weight", ".lora.down.weight"))


def load_lora(lora: dict, key_map: dict) -> list:
    """[(target, up, down, alpha)] for every module of the file the key map knows (load_lora + LoRAAdapter.load)."""
    patches = []
    for name, target in key_map.items():
        alpha = lora.get(f"{name}.alpha")
        for up_suffix, down_suffix in _PAIRS:
            if f"{name}{up_suffix}" in lora:
                patches.append((target, lora[f"{name}{up_suffix}"], lora[f"{name}{down_suffix}"],
                                None if alpha is None else float(alpha)))
                break
    return patches


def patched_weights(state_dict: dict, patches: list, strength: float = 1.0) -> dict:
    """calculate_weight for LoRA patches: W[rows] += function(strength * alpha / r * up @ down)."""
    out = {k: v.clone().float() for k, v in state_dict.items()}
    for (key, offset, function), up, down, alpha in patches:
        weight = out[key]
        view = weight.narrow(offset[0], offset[1], offset[2]) if offset is not None else weight
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(view.shape) * (strength * scale)
        view += (function or (lambda t: t))(diff)
    return out
