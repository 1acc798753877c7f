"""DiT LoRAs (PixArt, SD3, Flux) in diffusers and original layouts: weights/lora_formats.py + weights/dit_keymaps.py
against diffusers' loaders and converters, PEFT, and hand-written math on the fused original modules."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.delta import DoRA, LoHa, LoKr, LoRA, Rows  # noqa: E402
from nimblediff.errors import AdapterMismatchError, WeightsFormatError  # noqa: E402
from nimblediff.weights.arch import detect_lora_arch  # noqa: E402
from nimblediff.weights.lora_formats import apply_lora, read_lora  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402


def rnd(*shape, seed=[200]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.2


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def kohya(sd_modules: dict, style: str) -> dict:
    """{original module: (down, up, alpha)} as a file: 'kohya' (lora_unet_ + underscores), 'bfl' (ComfyUI / BFL
    diffusion_model. + dots, lora_up/down), 'peft' (bare original names, lora_A/B)."""
    sd = {}
    for name, (down, up, alpha) in sd_modules.items():
        if style == "kohya":
            n, (d, u) = "lora_unet_" + name.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        elif style == "bfl":
            n, (d, u) = "diffusion_model." + name, ("lora_down.weight", "lora_up.weight")
        else:
            n, (d, u) = name, ("lora_A.weight", "lora_B.weight")
        sd[f"{n}.{d}"], sd[f"{n}.{u}"] = down, up
        if alpha is not None:
            sd[f"{n}.alpha"] = torch.tensor(float(alpha))
    return sd


def lora_for(shape, rank=2, alpha=1.0):
    return rnd(rank, *shape[1:]), rnd(shape[0], rank, *([1, 1] if len(shape) == 4 else [])), alpha


def diffusers_split(original: dict, table: dict) -> dict:
    """Hand-written split of original-layout LoRAs into a diffusers/PEFT file (alpha / rank baked into up):
    table {original: [(diffusers module, rows or "swap")]} (ComfyUI comfy/utils.py mmdit/pixart_to_diffusers)."""
    sd = {}
    for name, (down, up, alpha) in original.items():
        up = up * (1.0 if alpha is None else alpha / down.shape[0])
        for target, rows in table[name]:
            if rows == "swap":  # original adaLN (shift, scale) -> diffusers (scale, shift)
                h = up.shape[0] // 2
                part = torch.cat([up[h:], up[:h]])
            else:
                part = up if rows is None else up[rows]
            sd[f"transformer.{target}.lora_A.weight"] = down.clone()
            sd[f"transformer.{target}.lora_B.weight"] = part.contiguous()
    return sd


def diffusers_fused(tmp_path, family: str, sd: dict, name: str = "ref"):
    pipe = getattr(factories, f"tiny_{family}_pipeline")()
    pipe.load_lora_weights(str(save_state_dict(sd, tmp_path / f"{name}.safetensors")))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


# ------------------------------------------------------------------------------------------------------------ Flux
FLUX_BLOCK = {  # BFL module -> weight shape in the tiny Flux (hidden 32, mlp 128)
    "double_blocks.0.img_attn.qkv": (96, 32), "double_blocks.0.img_attn.proj": (32, 32),
    "double_blocks.0.img_mlp.0": (128, 32), "double_blocks.0.img_mlp.2": (32, 128),
    "double_blocks.0.img_mod.lin": (192, 32), "double_blocks.0.txt_attn.qkv": (96, 32),
    "double_blocks.0.txt_attn.proj": (32, 32), "double_blocks.0.txt_mlp.0": (128, 32),
    "double_blocks.0.txt_mlp.2": (32, 128), "double_blocks.0.txt_mod.lin": (192, 32),
    "single_blocks.0.linear2": (32, 160), "single_blocks.0.modulation.lin": (96, 32),
}
FLUX_GLOBAL = {  # BFL module -> (diffusers module, weight shape): diffusers 0.42.1 drops these (see test below)
    "img_in": ("x_embedder", (32, 16)), "txt_in": ("context_embedder", (32, 32)),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1", (32, 256)),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2", (32, 32)),
    "final_layer.linear": ("proj_out", (16, 32)),
}


@pytest.mark.parametrize("style", ["kohya", "bfl"])
def test_flux_kohya_and_bfl_blocks_match_diffusers_converter(tmp_path, style):
    """sd-scripts (lora_unet_double_blocks_0_img_attn_qkv) and BFL/ComfyUI (diffusion_model.double_blocks.0...)
    files through diffusers' _convert_kohya_flux_lora_to_diffusers; ranks and alphas differ per layer.
    single_blocks.N.linear1 is left out: diffusers hardcodes its split for the full-size Flux (dims=[3072, 3072,
    3072, 12288]); test_flux_fused_linear1_... checks it. The kohya text-encoder layer is checked by hand: diffusers
    0.42.1 turns it into 'self_attn.to_q_lora.down.weight' and then fails ("Could not automatically infer state
    dict type")."""
    original = {n: lora_for(s, rank=1 + i % 3, alpha=[1.0, 4.0, None][i % 3]) for i, (n, s) in
                enumerate(FLUX_BLOCK.items())}
    sd = kohya(original, style)
    reference = diffusers_fused(tmp_path, "flux", sd)
    te_down, te_up = rnd(2, 16), rnd(16, 2)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" if style == "kohya" else \
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    sd.update({f"{te}.lora_down.weight": te_down, f"{te}.lora_up.weight": te_up, f"{te}.alpha": torch.tensor(1.0)})
    c = factories.tiny_flux_components()
    mods = {"transformer": c["transformer"], "text_encoder": c["text_encoder"]}
    q = mods["text_encoder"].get_submodule("encoder.layers.0.self_attn.q_proj").weight
    expected_q = (q.detach().double() + 0.5 * te_up.double() @ te_down.double()).float()
    handle, report = apply_lora(mods, sd)
    assert report.unmatched == [] and report.arch.arch == "flux" and len(report.split) == 2
    assert report.counts == {"transformer": len(FLUX_BLOCK) + 4, "text_encoder": 1}
    assert max_diff(weights(mods["transformer"]), weights(reference.transformer)) <= 1e-6
    torch.testing.assert_close(q.detach(), expected_q, rtol=0, atol=1e-6)


def test_flux_global_modules_hand_math_and_diffusers_drops_them(tmp_path):
    """kohya img_in / txt_in / time_in / vector_in / final_layer: diffusers 0.42.1 converts them without the
    'transformer.' prefix and loads nothing for them; we apply them (hand math), final_layer's adaLN rows swapped."""
    original = {n: lora_for(s) for n, (_, s) in FLUX_GLOBAL.items()}
    original["final_layer.adaLN_modulation.1"] = lora_for((64, 32), alpha=None)
    sd = kohya(original, "kohya")
    t = factories.tiny_flux_components()["transformer"]
    before = weights(t)
    apply_lora({"transformer": t}, sd)
    after = weights(t)
    for name, (target, _) in {**FLUX_GLOBAL, "final_layer.adaLN_modulation.1": ("norm_out.linear", None)}.items():
        down, up, alpha = original[name]
        dw = up.double() @ down.double() * (1.0 if alpha is None else alpha / 2)
        if target == "norm_out.linear":
            dw = torch.cat([dw[32:], dw[:32]])  # (shift, scale) -> (scale, shift)
        torch.testing.assert_close(after[f"{target}.weight"], (before[f"{target}.weight"].double() + dw).float(),
                                   rtol=0, atol=1e-6)
    ref = diffusers_fused(tmp_path, "flux", sd)
    assert max_diff(weights(ref.transformer), before) == 0.0  # documents the diffusers behaviour


def test_flux_fused_linear1_and_lycoris_kinds_on_fused_modules():
    """Fused original modules against hand math on the concatenated weight: single_blocks.0.linear1 (q, k, v and the
    MLP input, 3 x 32 + 128 rows) as a LoRA, and img_attn.qkv as LoHa, LoKr and DoRA (per output channel)."""
    t = factories.tiny_flux_components()["transformer"]
    before = weights(t)
    single = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    double = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
    txt = ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
           "transformer_blocks.0.attn.add_v_proj"]
    down, up = rnd(3, 32), rnd(224, 3)
    a1, b1, a2, b2 = rnd(96, 2), rnd(2, 32), rnd(96, 2), rnd(2, 32)
    k1, k2a, k2b = rnd(3, 4), rnd(32, 2), rnd(2, 8)
    lin1, img, txt_qkv = ("lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_attn_qkv",
                          "lora_unet_double_blocks_0_txt_attn_qkv")
    sd = {f"{lin1}.lora_down.weight": down, f"{lin1}.lora_up.weight": up, f"{lin1}.alpha": torch.tensor(1.5),
          f"{img}.hada_w1_a": a1, f"{img}.hada_w1_b": b1, f"{img}.hada_w2_a": a2, f"{img}.hada_w2_b": b2,
          f"{img}.dora_scale": rnd(96, 1).abs() + 0.5, f"{txt_qkv}.lokr_w1": k1, f"{txt_qkv}.lokr_w2_a": k2a,
          f"{txt_qkv}.lokr_w2_b": k2b, f"{txt_qkv}.alpha": torch.tensor(1.0)}
    kron = torch.einsum("ac,bd->abcd", k1.double(), k2a.double() @ k2b.double()).reshape(96, 32) * 0.5
    cases = {  # -> (diffusers modules, dW of the fused weight by hand, float64)
        "single": (single, up.double() @ down.double() * 0.5),
             "img": (double, (a1.double() @ b1.double()) * (a2.double() @ b2.double())),
             "txt": (txt, kron)}
    deltas, report = read_lora(sd, {"transformer": t})
    d = {k[len("transformer."):]: v for k, v in deltas.items()}
    assert isinstance(d[double[0]], DoRA) and isinstance(d[double[0]].delta, LoHa)
    assert isinstance(d[txt[0]], Rows) and isinstance(d[txt[0]].delta, LoKr) and isinstance(d[single[3]], LoRA)
    apply_lora({"transformer": t}, sd)
    after = weights(t)
    for name, (modules, dw) in cases.items():
        w = torch.cat([before[f"{m}.weight"] for m in modules]).double()
        if name == "img":  # DoRA on the fused weight: one norm per output row
            v = w + dw
            m = sd[f"{img}.dora_scale"].double()
            new = m * v / v.pow(2).sum(1, keepdim=True).sqrt()
        else:
            new = w + dw
        got = torch.cat([after[f"{m}.weight"] for m in modules])
        torch.testing.assert_close(got, new.float(), rtol=0, atol=2e-6, msg=name)


def test_flux_reads_without_a_model_like_with_one():
    """Without a model the split sizes come from the table's ratios (Flux linear1: 1:1:1:4) and the delta's rows."""
    original = {n: lora_for(s) for n, s in FLUX_BLOCK.items()}
    original["single_blocks.0.linear1"] = lora_for((224, 32))
    sd = kohya(original, "kohya")
    with_model, _ = read_lora(sd, {"transformer": factories.tiny_flux_components()["transformer"]})
    alone, report = read_lora(sd)
    assert report.arch.arch == "flux" and sorted(alone) == sorted(with_model)
    for key, d in with_model.items():
        assert torch.equal(d.up, alone[key].up) and torch.equal(d.down, alone[key].down), key


def test_flux_onetrainer_lycoris_and_peft_names_agree():
    """Diffusers names as OneTrainer (lora_transformer_), SimpleTuner (lycoris_) and PEFT (transformer.) write them,
    and original names in a PEFT-style file, give the same deltas."""
    t = factories.tiny_flux_components()["transformer"]
    modules = {"transformer_blocks.0.attn.add_q_proj": (32, 32), "transformer_blocks.0.ff_context.net.0.proj":
               (128, 32), "single_transformer_blocks.0.proj_mlp": (128, 32), "norm_out.linear": (64, 32)}
    lora = {m: lora_for(s) for m, s in modules.items()}
    files = {
        "peft": {f"transformer.{m}.{r}": v for m, (d, u, _) in lora.items()
                 for r, v in (("lora_A.weight", d), ("lora_B.weight", u))},
        "onetrainer": {f"lora_transformer_{m.replace('.', '_')}.{r}": v for m, (d, u, _) in lora.items()
                       for r, v in (("lora_down.weight", d), ("lora_up.weight", u))},
        "simpletuner": {f"lycoris_{m.replace('.', '_')}.{r}": v for m, (d, u, _) in lora.items()
                        for r, v in (("lora_down.weight", d), ("lora_up.weight", u))},
    }
    for target in (t, None):
        results = {}
        for name, sd in files.items():
            deltas, report = read_lora(sd, None if target is None else {"transformer": target})
            assert report.unmatched == [] and sorted(deltas) == sorted(f"transformer.{m}" for m in modules), name
            results[name] = deltas
        for name in files:
            for k, d in results[name].items():
                assert torch.equal(d.up, results["peft"][k].up), (name, k)


# ------------------------------------------------------------------------------------------------------------- SD3
SD3_SPLIT = {  # original MMDiT -> diffusers (ComfyUI mmdit_to_diffusers), tiny SD3: hidden 16, one (last) block
    "joint_blocks.0.x_block.attn.qkv": [("transformer_blocks.0.attn.to_q", slice(0, 16)),
                                        ("transformer_blocks.0.attn.to_k", slice(16, 32)),
                                        ("transformer_blocks.0.attn.to_v", slice(32, 48))],
    "joint_blocks.0.x_block.attn.proj": [("transformer_blocks.0.attn.to_out.0", None)],
    "joint_blocks.0.x_block.mlp.fc1": [("transformer_blocks.0.ff.net.0.proj", None)],
    "joint_blocks.0.x_block.mlp.fc2": [("transformer_blocks.0.ff.net.2", None)],
    "joint_blocks.0.x_block.adaLN_modulation.1": [("transformer_blocks.0.norm1.linear", None)],
    "joint_blocks.0.context_block.attn.qkv": [("transformer_blocks.0.attn.add_q_proj", slice(0, 16)),
                                              ("transformer_blocks.0.attn.add_k_proj", slice(16, 32)),
                                              ("transformer_blocks.0.attn.add_v_proj", slice(32, 48))],
    # the last block's context stream is pre-only: its adaLN is AdaLayerNormContinuous (scale, shift)
    "joint_blocks.0.context_block.adaLN_modulation.1": [("transformer_blocks.0.norm1_context.linear", "swap")],
    "context_embedder": [("context_embedder", None)],
    "x_embedder.proj": [("pos_embed.proj", None)],
    "t_embedder.mlp.0": [("time_text_embed.timestep_embedder.linear_1", None)],
    "y_embedder.mlp.2": [("time_text_embed.text_embedder.linear_2", None)],
    "final_layer.linear": [("proj_out", None)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", "swap")],
}
SD3_SHAPES = {"joint_blocks.0.x_block.attn.qkv": (48, 16), "joint_blocks.0.x_block.attn.proj": (16, 16),
              "joint_blocks.0.x_block.mlp.fc1": (64, 16), "joint_blocks.0.x_block.mlp.fc2": (16, 64),
              "joint_blocks.0.x_block.adaLN_modulation.1": (96, 16), "joint_blocks.0.context_block.attn.qkv": (48, 16),
              "joint_blocks.0.context_block.adaLN_modulation.1": (32, 16), "context_embedder": (16, 32),
              "x_embedder.proj": (16, 4, 2, 2), "t_embedder.mlp.0": (16, 256), "y_embedder.mlp.2": (16, 16),
              "final_layer.linear": (16, 16), "final_layer.adaLN_modulation.1": (32, 16)}


@pytest.mark.parametrize("style", ["kohya", "bfl", "peft"])
def test_sd3_original_mmdit_layout_matches_diffusers(tmp_path, style):
    """diffusers has no SD3 converter: the reference is diffusers' own load_lora_weights + fuse_lora of the same
    LoRA split by hand (SD3_SPLIT). Fused qkv split, adaLN rows swapped where diffusers uses (scale, shift)."""
    original = {n: lora_for(s, rank=2 + i % 2, alpha=[2.0, None][i % 2]) for i, (n, s) in
                enumerate(SD3_SHAPES.items())}
    reference = diffusers_fused(tmp_path, "sd3", diffusers_split(original, SD3_SPLIT))
    t = factories.tiny_sd3_components()["transformer"]
    before = weights(t)
    with_model, _ = read_lora(kohya(original, style), {"transformer": t})
    handle, report = apply_lora({"transformer": t}, kohya(original, style))
    assert report.unmatched == [] and report.arch.arch == "sd3"
    assert report.counts == {"transformer": 17}
    assert max_diff(weights(t), weights(reference.transformer)) <= 1e-6
    handle.unfuse()
    assert max_diff(weights(t), before) <= 1e-6
    alone, _ = read_lora(kohya(original, style))  # no model: sizes and the pre-only swap from the LoRA's shapes
    assert sorted(alone) == sorted(with_model) and all(torch.equal(alone[k].up, d.up) for k, d in with_model.items())


def test_sd3_diffusers_layout_with_loha_and_dora(tmp_path):
    """LyCORIS kinds in diffusers naming on SD3 (no diffusers loader takes them): hand math."""
    t = factories.tiny_sd3_components()["transformer"]
    before = weights(t)
    a1, b1, a2, b2 = rnd(16, 2), rnd(2, 16), rnd(16, 2), rnd(2, 16)
    down, up, m = rnd(2, 16), rnd(64, 2), rnd(64).abs() + 0.5
    sd = {"transformer.transformer_blocks.0.attn.to_out.0.hada_w1_a": a1,
          "transformer.transformer_blocks.0.attn.to_out.0.hada_w1_b": b1,
          "transformer.transformer_blocks.0.attn.to_out.0.hada_w2_a": a2,
          "transformer.transformer_blocks.0.attn.to_out.0.hada_w2_b": b2,
          "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": down,
          "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": up,
          "transformer.transformer_blocks.0.ff.net.0.proj.lora_magnitude_vector": m}
    _, report = apply_lora({"transformer": t}, sd, strength=0.5)
    assert report.kinds == {"LoHa": 1, "DoRA": 1}
    after = weights(t)
    w = before["transformer_blocks.0.attn.to_out.0.weight"].double()
    torch.testing.assert_close(after["transformer_blocks.0.attn.to_out.0.weight"],
                               (w + 0.5 * (a1.double() @ b1.double()) * (a2.double() @ b2.double())).float(),
                               rtol=0, atol=1e-6)
    w = before["transformer_blocks.0.ff.net.0.proj.weight"].double()
    v = w + up.double() @ down.double()
    dora = m.double()[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(after["transformer_blocks.0.ff.net.0.proj.weight"], (w + 0.5 * (dora - w)).float(),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- PixArt
PIXART_SPLIT = {  # original PixArt -> diffusers (ComfyUI pixart_to_diffusers), tiny PixArt: hidden 16
    "blocks.0.attn.qkv": [("transformer_blocks.0.attn1.to_q", slice(0, 16)),
                          ("transformer_blocks.0.attn1.to_k", slice(16, 32)),
                          ("transformer_blocks.0.attn1.to_v", slice(32, 48))],
    "blocks.0.attn.proj": [("transformer_blocks.0.attn1.to_out.0", None)],
    "blocks.0.cross_attn.q_linear": [("transformer_blocks.0.attn2.to_q", None)],
    "blocks.0.cross_attn.kv_linear": [("transformer_blocks.0.attn2.to_k", slice(0, 16)),
                                      ("transformer_blocks.0.attn2.to_v", slice(16, 32))],
    "blocks.0.cross_attn.proj": [("transformer_blocks.0.attn2.to_out.0", None)],
    "blocks.0.mlp.fc1": [("transformer_blocks.0.ff.net.0.proj", None)],
    "blocks.0.mlp.fc2": [("transformer_blocks.0.ff.net.2", None)],
    "t_block.1": [("adaln_single.linear", None)],
    "t_embedder.mlp.2": [("adaln_single.emb.timestep_embedder.linear_2", None)],
    "y_embedder.y_proj.fc1": [("caption_projection.linear_1", None)],
    "x_embedder.proj": [("pos_embed.proj", None)],
    "final_layer.linear": [("proj_out", None)],
}
PIXART_SHAPES = {"blocks.0.attn.qkv": (48, 16), "blocks.0.attn.proj": (16, 16),
                 "blocks.0.cross_attn.q_linear": (16, 16), "blocks.0.cross_attn.kv_linear": (32, 16),
                 "blocks.0.cross_attn.proj": (16, 16), "blocks.0.mlp.fc1": (64, 16), "blocks.0.mlp.fc2": (16, 64), "t_block.1": (96, 16),
                 "t_embedder.mlp.2": (16, 16), "y_embedder.y_proj.fc1": (16, 32), "x_embedder.proj": (16, 4, 2, 2),
                 "final_layer.linear": (32, 16)}


def peft_merged(transformer, sd: dict):
    """PixArt has no diffusers LoRA loader: PEFT inject + set_peft_model_state_dict + merge (notes section 4)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = sorted({k.rsplit(".lora_", 1)[0][len("transformer."):] for k in sd})
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=names), transformer)
    set_peft_model_state_dict(transformer, {k[len("transformer."):]: v for k, v in sd.items()})
    for m in transformer.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    return {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("style", ["peft", "kohya", "bfl"])
def test_pixart_original_layout_matches_peft(style):
    original = {n: lora_for(s, alpha=[None, 1.0][i % 2]) for i, (n, s) in enumerate(PIXART_SHAPES.items())}
    reference = peft_merged(factories.tiny_pixart_components()["transformer"], diffusers_split(original, PIXART_SPLIT))
    t = factories.tiny_pixart_components()["transformer"]
    _, report = apply_lora({"transformer": t}, kohya(original, style))
    assert report.unmatched == [] and report.counts == {"transformer": 15} and len(report.split) == 2
    assert max_diff(weights(t), reference) <= 1e-6


def test_pixart_original_layout_is_detected():
    sd = kohya({n: lora_for(s) for n, s in PIXART_SHAPES.items()}, "kohya")
    assert detect_lora_arch({k: tuple(v.shape) for k, v in sd.items()}).arch == "pixart"
    deltas, report = read_lora(sd)  # without a model
    assert report.arch.arch == "pixart" and "transformer.transformer_blocks.0.attn2.to_v" in deltas


# ------------------------------------------------------------------------------------------------------- bad input
def test_sd3_lora_on_flux_is_refused_and_flux_untouched():
    t = factories.tiny_flux_components()["transformer"]
    before = weights(t)
    sd = kohya({n: lora_for(s) for n, s in SD3_SHAPES.items()}, "kohya")
    with pytest.raises(AdapterMismatchError, match=r"for sd3 .*model is flux"):
        apply_lora({"transformer": t}, sd)
    assert max_diff(weights(t), before) == 0.0


def test_fused_module_of_another_size_is_refused_untouched():
    """A qkv LoRA with rows for another hidden size names both sizes; nothing is patched."""
    t = factories.tiny_flux_components()["transformer"]
    before = weights(t)
    original = {n: lora_for(s) for n, s in FLUX_BLOCK.items()}
    original["double_blocks.0.txt_attn.qkv"] = lora_for((99, 32))
    with pytest.raises(AdapterMismatchError, match=r"txt_attn_qkv.*99 output rows.*\[32, 32, 32\]"):
        apply_lora({"transformer": t}, kohya(original, "kohya"))
    assert max_diff(weights(t), before) == 0.0


def test_dora_per_input_channel_on_a_fused_module_is_an_error():
    sd = kohya({"double_blocks.0.img_attn.qkv": lora_for((96, 32))}, "kohya")
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.ones(1, 32)
    with pytest.raises(AdapterMismatchError, match="per input channel"):
        read_lora(sd, {"transformer": factories.tiny_flux_components()["transformer"]})


def test_unknown_dit_names_are_listed_not_guessed():
    t = factories.tiny_flux_components()["transformer"]
    sd = kohya({"double_blocks.0.img_attn.qkv": lora_for((96, 32)), "double_blocks.0.img_attn.mystery": lora_for(
        (32, 32))}, "kohya")
    with pytest.warns(UserWarning, match="1 of 4 keys match no module"):
        handle, report = apply_lora({"transformer": t}, sd)
    assert report.unmatched == ["lora_unet_double_blocks_0_img_attn_mystery"] and len(handle.applied) == 3
    with pytest.raises(WeightsFormatError, match="unknown LoRA layout"):
        read_lora({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3)})


def test_dora_rows_of_a_fused_module_keep_their_type():
    sd = kohya({"double_blocks.0.img_attn.qkv": lora_for((96, 32))}, "kohya")
    sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.ones(96, 1)
    deltas, _ = read_lora(sd, {"transformer": factories.tiny_flux_components()["transformer"]})
    d = deltas["transformer.transformer_blocks.0.attn.to_k"]
    assert isinstance(d, DoRA) and isinstance(d.delta, LoRA) and d.magnitude.shape == (32,)
