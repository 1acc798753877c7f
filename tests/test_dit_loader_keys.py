"""The DiT loader's host-free parts (nodes/dit_loaders.py), no ComfyUI needed: diffusers SD3Transformer2DModel weights
-> ComfyUI MMDiT keys, checked against a reimplementation of ComfyUI's own table (comfy/utils.py
mmdit_to_diffusers, rewritten below from reading it) in both directions; the MMDiT config, the flow settings against
diffusers' FlowMatchEulerDiscreteScheduler, and bad folders / sizes."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from nimblediff.errors import InvalidParameterError, WeightsFormatError
from nimblediff.nodes import dit_loaders, loaders
from nimblediff.tiny import dit


# ------------------------------------------------------------ ComfyUI's comfy/utils.py mmdit_to_diffusers, rewritten
# (ComfyUI key, diffusers key) inside joint_blocks.{i} / transformer_blocks.{i}: MMDIT_MAP_BLOCK
_BLOCK = [(f"{side}.{c}.{e}", f"{d}.{e}") for side, pairs in (
    ("context_block", [("adaLN_modulation.1", "norm1_context.linear"), ("attn.proj", "attn.to_add_out"),
                       ("mlp.fc1", "ff_context.net.0.proj"), ("mlp.fc2", "ff_context.net.2")]),
    ("x_block", [("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn.to_out.0"),
                 ("attn2.proj", "attn2.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2")]))
    for c, d in pairs for e in ("weight", "bias")]
_BLOCK += [("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
           ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
           ("x_block.attn.ln_q.weight", "attn.norm_q.weight"), ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
           ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"), ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight")]
# (ComfyUI key, diffusers key, halves swapped): MMDIT_MAP_BASIC
_BASIC = [(f"{c}.{end}", f"{d}.{end}", c.startswith("final_layer.adaLN")) for c, d in (
    ("context_embedder", "context_embedder"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("x_embedder.proj", "pos_embed.proj"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"), ("final_layer.linear", "proj_out"))
    for end in ("weight", "bias")] + [("pos_embed", "pos_embed.pos_embed", False)]


def comfy_table(depth: int, num_blocks: int) -> dict:
    """{diffusers key: (ComfyUI key, (first row, rows) or None, swap)} as ComfyUI builds it: q, k, v are rows of
    depth x 64 each in the fused qkv; the (shift, scale) swap of a pre-only context adaLN goes to block depth - 1."""
    table, rows = {}, depth * 64
    for i in range(num_blocks):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for end in ("weight", "bias"):
            for j, (x, c) in enumerate(zip(("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))):
                table[f"{src}.attn.{x}.{end}"] = (f"{dst}.x_block.attn.qkv.{end}", (j * rows, rows), False)
                table[f"{src}.attn.{c}.{end}"] = (f"{dst}.context_block.attn.qkv.{end}", (j * rows, rows), False)
                table[f"{src}.attn2.{x}.{end}"] = (f"{dst}.x_block.attn2.qkv.{end}", (j * rows, rows), False)
        for comfy_key, diffusers_key in _BLOCK:
            table[f"{src}.{diffusers_key}"] = (f"{dst}.{comfy_key}", None, False)
    for comfy_key, diffusers_key, swap in _BASIC:
        table[diffusers_key] = (comfy_key, None, swap)
    for end in ("weight", "bias"):
        table[f"transformer_blocks.{depth - 1}.norm1_context.linear.{end}"] = (
            f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.{end}", None, True)
    return table


def swap_halves(t):
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift])


def back_to_diffusers(comfy_sd: dict, table: dict) -> tuple[dict, set]:
    """The diffusers tensors ComfyUI's table reads out of a ComfyUI state dict, and the ComfyUI keys it used."""
    out, used = {}, set()
    for name, (key, rows, swap) in table.items():
        if key in comfy_sd:
            t = comfy_sd[key] if rows is None else comfy_sd[key][rows[0]:rows[0] + rows[1]]
            out[name], _ = (swap_halves(t) if swap else t), used.add(key)
    return out, used


# ------------------------------------------------------------------------------------------------------- cases
def tiny_dit(num_layers=2, **overrides):
    torch.manual_seed(num_layers)
    if not overrides:
        return dit.make_transformer(num_layers=num_layers)   # NimbleDiff-Tiny-DiT's recipe: 4 heads x 32, rms qk norm
    cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
               attention_head_dim=32, num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=128,
               pooled_projection_dim=24, pos_embed_max_size=8)
    return SD3Transformer2DModel(**{**cfg, **overrides})


CASES = {
    "tiny-dit": lambda: tiny_dit(2),
    "tiny-dit-3-blocks": lambda: tiny_dit(3),            # num_blocks 3 != depth 2 (width 128 = 64 x 2)
    "sd35-dual-attention": lambda: tiny_dit(2, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "sd3-no-qk-norm": lambda: tiny_dit(2, qk_norm=None),
}


def converted(case):
    model = CASES[case]()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, sd, dit_loaders.transformer_to_comfy(dict(sd))


@pytest.mark.parametrize("case", ["tiny-dit", "sd35-dual-attention", "sd3-no-qk-norm"])
def test_every_diffusers_key_maps_to_a_comfy_key_and_back(case):
    model, sd, comfy_sd = converted(case)
    cfg = dit_loaders.mmdit_config_from_diffusers(dict(model.config))
    table = comfy_table(cfg["depth"], cfg["num_blocks"])
    back, used = back_to_diffusers(comfy_sd, table)
    assert set(back) == set(sd)                  # every diffusers key is reached ...
    assert used == set(comfy_sd)                 # ... from exactly the ComfyUI keys we wrote
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    assert all(k.startswith(("joint_blocks.", "x_embedder", "t_embedder", "y_embedder", "context_embedder",
                             "final_layer", "pos_embed")) for k in comfy_sd)


def test_shapes_are_comfy_mmdit_shapes():
    """Hand-worked ComfyUI shapes for the tiny DiT (width 128, 2 blocks): fused qkv, pre-only last context block."""
    _, _, comfy_sd = converted("tiny-dit")
    assert comfy_sd["joint_blocks.0.x_block.attn.qkv.weight"].shape == (384, 128)
    assert comfy_sd["joint_blocks.1.context_block.attn.qkv.bias"].shape == (384,)
    assert comfy_sd["joint_blocks.0.context_block.adaLN_modulation.1.weight"].shape == (768, 128)
    assert comfy_sd["joint_blocks.1.context_block.adaLN_modulation.1.weight"].shape == (256, 128)
    assert "joint_blocks.1.context_block.attn.proj.weight" not in comfy_sd
    assert comfy_sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape == (32,)   # per head: 4 heads of 32
    assert comfy_sd["pos_embed"].shape == (1, 256, 128)


def test_more_blocks_than_depth_swaps_the_pre_only_block_not_block_depth_minus_1():
    """NimbleDiff-Tiny-DiT ships 8 blocks of width 128 (ComfyUI depth 2). ComfyUI's MMDiT makes the LAST block's
    context stream pre-only (num_blocks - 1) while mmdit_to_diffusers puts the (shift, scale) swap on block depth - 1:
    the loader follows the model (the 2x-row adaLN is swapped), so ComfyUI's table disagrees on exactly those keys."""
    model, sd, comfy_sd = converted("tiny-dit-3-blocks")
    cfg = dit_loaders.mmdit_config_from_diffusers(dict(model.config))
    assert (cfg["depth"], cfg["num_blocks"], cfg["num_heads"]) == (2, 3, 4)
    back, used = back_to_diffusers(comfy_sd, comfy_table(2, 3))
    assert set(back) == set(sd) and used == set(comfy_sd)
    differ = {k for k in sd if not torch.equal(back[k], sd[k])}
    assert differ == {f"transformer_blocks.{b}.norm1_context.linear.{e}" for b in (1, 2) for e in ("weight", "bias")}
    last = comfy_sd["joint_blocks.2.context_block.adaLN_modulation.1.weight"]
    assert torch.equal(last, swap_halves(sd["transformer_blocks.2.norm1_context.linear.weight"]))
    assert torch.equal(comfy_sd["joint_blocks.1.context_block.adaLN_modulation.1.weight"],
                       sd["transformer_blocks.1.norm1_context.linear.weight"])


def test_a_key_the_table_does_not_know_is_refused():
    _, sd, _ = converted("tiny-dit")
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(WeightsFormatError, match="extra"):
        dit_loaders.transformer_to_comfy(sd)
    _, sd, _ = converted("tiny-dit")
    del sd["transformer_blocks.0.attn.to_k.weight"]   # a fused group with a member missing
    with pytest.raises(WeightsFormatError, match="to_q|to_v"):
        dit_loaders.transformer_to_comfy(sd)


# ------------------------------------------------------------------------------------------- configs and settings
def test_mmdit_config_of_the_tiny_dit():
    cfg = dit_loaders.mmdit_config_from_diffusers(dict(dit.make_transformer(num_layers=8).config))
    assert cfg["depth"] * 64 == 128 and cfg["num_blocks"] == 8 and cfg["num_heads"] == 4
    assert cfg["context_embedder_config"]["params"] == {"in_features": 128, "out_features": 128}
    assert (cfg["adm_in_channels"], cfg["pos_embed_max_size"], cfg["num_patches"]) == (128, 16, 256)
    assert (cfg["qk_norm"], cfg["patch_size"], cfg["in_channels"], cfg["out_channels"]) == ("rms", 2, 4, 4)


@pytest.mark.parametrize("change, match", [
    ({"attention_head_dim": 24}, "multiple of 64"), ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"caption_projection_dim": 96}, "caption_projection_dim"), ({"_class_name": "FluxTransformer2DModel"}, "Flux"),
])
def test_mmdit_config_refuses_what_comfy_mmdit_cannot_build(change, match):
    with pytest.raises(InvalidParameterError, match=match):
        dit_loaders.mmdit_config_from_diffusers({**dict(dit.make_transformer(num_layers=1).config), **change})


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_settings_give_the_schedulers_training_sigmas(shift):
    """ComfyUI's ModelSamplingDiscreteFlow (comfy/model_sampling.py, rewritten): sigmas[t-1] = time_snr_shift(shift,
    t / 1000 * multiplier / multiplier), timestep(sigma) = sigma * multiplier."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s = dit_loaders.flow_sampling_from_scheduler(dict(sched.config))
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    sigmas = s["shift"] * t / (1 + (s["shift"] - 1) * t)
    torch.testing.assert_close(sigmas.flip(0).float(), sched.sigmas, atol=1e-6, rtol=0)   # (1000,) at init
    torch.testing.assert_close(sched.sigmas * s["multiplier"], sched.timesteps, atol=1e-3, rtol=0)


def test_dynamic_shift_is_refused():
    with pytest.raises(InvalidParameterError, match="use_dynamic_shifting"):
        dit_loaders.flow_sampling_from_scheduler({"use_dynamic_shifting": True})


@pytest.mark.parametrize("h, w, ok", [(16, 16, True), (32, 8, True), (17, 16, False), (16, 34, False)])
def test_patchify_check(h, w, ok):
    if ok:
        dit_loaders.check_patchify(h, w, 2, 16, "tiny", 4)
        return
    with pytest.raises(InvalidParameterError) as exc:
        dit_loaders.check_patchify(h, w, 2, 16, "tiny", 4)
    msg = str(exc.value)
    assert f"latent {w}x{h}" in msg and f"image {w * 4}x{h * 4}" in msg and "patch_size 2" in msg
    assert "at most 32x32" in msg and "up to 128 px" in msg


# ------------------------------------------------------------------------------------------------- bad folders
_INDEX = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
          "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
          "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
          "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
          "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
_FILES = ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
          "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
          "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json",
          "tokenizer_2/tokenizer.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


def folder_like(path, index=None, skip=()):
    """A folder with the layout's files (content is never read by the layout check)."""
    (path / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(index or _INDEX))
    for f in _FILES:
        if f not in skip:
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            (path / f).write_text("{}")
    return path


def test_complete_layout_passes(tmp_path):
    assert dit_loaders.check_dit_folder(folder_like(tmp_path / "ok"))["_class_name"] == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("skip", [("text_encoder_2/model.safetensors",), ("tokenizer_2/tokenizer.json",),
                                  ("scheduler/scheduler_config.json", "vae/diffusion_pytorch_model.safetensors")])
def test_missing_component_is_named(tmp_path, skip):
    with pytest.raises(WeightsFormatError) as exc:
        dit_loaders.check_dit_folder(folder_like(tmp_path / "dit", skip=skip))
    for part in skip:
        assert str(tmp_path / "dit" / part.split("/")[0]) in str(exc.value)
    assert "StableDiffusion3Pipeline" in str(exc.value)


def test_unet_folder_given_to_the_dit_loader(tmp_path):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"]}
    with pytest.raises(InvalidParameterError) as exc:
        dit_loaders.check_dit_folder(folder_like(tmp_path / "sd", index))
    msg = str(exc.value)
    assert "StableDiffusionPipeline is a UNet pipeline" in msg and "NimbleDiff Diffusers Checkpoint Loader" in msg
    assert "StableDiffusion3Pipeline" in msg and "transformer/" in msg


def test_dit_folder_given_to_the_unet_loader(tmp_path):
    with pytest.raises(InvalidParameterError) as exc:
        loaders.load_sd15_folder(folder_like(tmp_path / "dit"))
    assert "StableDiffusion3Pipeline is not an SD1.5-family pipeline" in str(exc.value)
    assert "unet" in str(exc.value)


@pytest.mark.parametrize("change, match", [
    ({"transformer": ["diffusers", "FluxTransformer2DModel"]}, "FluxTransformer2DModel transformer"),
    ({"text_encoder_3": ["transformers", "T5EncoderModel"]}, "T5"),
])
def test_other_dit_pipelines_are_refused(tmp_path, change, match):
    with pytest.raises(InvalidParameterError, match=match):
        dit_loaders.check_dit_folder(folder_like(tmp_path / "x", {**_INDEX, **change}))


def test_the_node_lists_the_embedded_model_outside_comfyui():
    spec = dit_loaders.NimbleDiffusersDiTLoader.INPUT_TYPES()["required"]["model"]
    assert spec[0] == [dit_loaders.EMBEDDED_CHOICE] and spec[1]["tooltip"]


# ----------------------------------------------------------------------------------- a student's transformer
_TCFG = {"_class_name": "SD3Transformer2DModel", "num_layers": 8, "num_attention_heads": 2, "attention_head_dim": 64,
         "joint_attention_dim": 128, "pooled_projection_dim": 128, "in_channels": 4, "patch_size": 2,
         "pos_embed_max_size": 16}


def transformer_like(path, **change):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**_TCFG, **change}))
    (path / "diffusion_pytorch_model.safetensors").write_text("{}")
    return path


def pipeline_with_transformer_config(path):
    folder = folder_like(path)
    (folder / "transformer" / "config.json").write_text(json.dumps(_TCFG))
    return folder


def test_a_same_size_transformer_fits(tmp_path):
    dit_loaders.check_transformer_folder(transformer_like(tmp_path / "student"),
                                         pipeline_with_transformer_config(tmp_path / "teacher"))


def test_a_transformer_of_another_size_names_both_sides(tmp_path):
    teacher = pipeline_with_transformer_config(tmp_path / "teacher")
    with pytest.raises(InvalidParameterError) as exc:
        dit_loaders.check_transformer_folder(transformer_like(tmp_path / "student", num_layers=12), teacher)
    msg = str(exc.value)
    assert "num_layers 12 vs 8" in msg and "student" in msg and "teacher" in msg


def test_a_transformer_folder_without_weights_or_of_another_class(tmp_path):
    teacher = pipeline_with_transformer_config(tmp_path / "teacher")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsFormatError, match="config.json"):
        dit_loaders.check_transformer_folder(empty, teacher)
    with pytest.raises(InvalidParameterError, match="FluxTransformer2DModel"):
        dit_loaders.check_transformer_folder(transformer_like(tmp_path / "flux", _class_name="FluxTransformer2DModel"),
                                             teacher)


def test_transformer_choices_list_only_transformer_folders_and_stay_inside(tmp_path, monkeypatch):
    root = tmp_path / "diffusers"
    transformer_like(root / "students" / "one")
    folder_like(root / "pipe")  # a pipeline's own transformer/ is not offered on its own
    monkeypatch.setattr(loaders, "_diffusers_roots", lambda: [str(root)])
    choices = dit_loaders.list_dit_transformers()
    assert choices[0] == dit_loaders.OWN_TRANSFORMER and "students/one" in choices
    assert not any(c.startswith("pipe") for c in choices)
    assert dit_loaders.resolve_dit_transformer("students/one") == root / "students" / "one"
    assert dit_loaders.resolve_dit_transformer(dit_loaders.OWN_TRANSFORMER) is None
    for bad in ("../outside", "/etc", "nimblediff-tiny-dit-other (embedded)"):
        with pytest.raises(InvalidParameterError):
            dit_loaders.resolve_dit_transformer(bad)
