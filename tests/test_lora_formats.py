"""LoRA readers (weights/lora_formats.py): every layout against diffusers+peft or hand-written math."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.delta import DoRA, LoRA  # noqa: E402
from nimblediff.errors import WeightsFormatError  # noqa: E402
from nimblediff.weights.arch import detect_lora_arch, detect_model_arch  # noqa: E402
from nimblediff.weights.lora_formats import apply_lora, read_lora, split_key  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402

LAYOUTS = ["peft", "legacy", "lora_dot", "kohya", "kohya_sgm", "comfyui"]


def sd15():
    pipe = factories.tiny_sd15_pipeline()
    return pipe, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def weights(modules: dict) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c, m in modules.items() for k, v in m.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def lora():
    _, mods = sd15()
    return factories.random_lora(mods, rank=2, alpha=1.0, seed=1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_to_the_same_deltas(lora, layout):
    pipe, mods = sd15()
    sd = factories.lora_state_dict(lora, layout, pipe.unet.config)
    deltas, report = read_lora(sd, mods)
    assert report.unmatched == [] and set(deltas) == set(lora)
    assert report.counts == {"unet": 72, "text_encoder": 12}
    assert report.layout == {"kohya_sgm": "kohya", "legacy": "diffusers", "lora_dot": "diffusers"}.get(layout, layout)
    for key, (down, up, alpha) in lora.items():
        shape = (up.shape[0], *down.shape[1:])
        expected = (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / down.shape[0]
        torch.testing.assert_close(deltas[key].delta_weight(torch.Size(shape)), expected, rtol=1e-6, atol=1e-7)


def test_kohya_and_diffusers_copies_patch_identically(lora):
    results = {}
    for layout in LAYOUTS:
        pipe, mods = sd15()
        apply_lora(mods, factories.lora_state_dict(lora, layout, pipe.unet.config))
        results[layout] = weights(mods)
    for layout in LAYOUTS[1:]:
        assert max_diff(results["peft"], results[layout]) <= 1e-7, layout


def _diffusers_fused(tmp_path, sd: dict, name: str, sdxl: bool = False, via_unet_config: bool = False):
    path = save_state_dict(sd, tmp_path / f"{name}.safetensors")
    pipe = factories.tiny_sdxl_pipeline() if sdxl else factories.tiny_sd15_pipeline()
    if via_unet_config:  # sgm names on SD1.5: diffusers needs unet_config (notes section 4)
        converted, _ = type(pipe).lora_state_dict(str(path), unet_config=pipe.unet.config)
        pipe.load_lora_weights(converted, adapter_name="x")
    else:
        pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


@pytest.mark.parametrize("layout,alpha", [("peft", None), ("kohya", 1.0), ("kohya_sgm", None)])
def test_sd15_matches_diffusers_load_and_fuse(tmp_path, layout, alpha):
    _, mods = sd15()
    lora = factories.random_lora(mods, rank=2, alpha=alpha, seed=2)
    sd = factories.lora_state_dict(lora, layout, mods["unet"].config)
    reference = _diffusers_fused(tmp_path, sd, layout, via_unet_config=layout == "kohya_sgm")
    before = weights(mods)
    handle, report = apply_lora(mods, sd)
    ours = weights(mods)
    assert max_diff(ours, weights({"unet": reference.unet, "text_encoder": reference.text_encoder})) <= 1e-6
    assert sum(int(not torch.equal(before[k], ours[k])) for k in ours) == 84  # every targeted weight moved
    handle.unfuse()
    assert max_diff(weights(mods), before) <= 1e-6


def test_sdxl_kohya_te1_te2_and_sgm_names_match_diffusers(tmp_path):
    pipe = factories.tiny_sdxl_pipeline()
    mods = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    lora = factories.random_lora(mods, rank=4, alpha=2.0, seed=3)
    sd = factories.lora_state_dict(lora, "kohya_sgm", pipe.unet.config)
    assert any(k.startswith("lora_te2_") for k in sd) and any(k.startswith("lora_unet_input_blocks_") for k in sd)
    reference = _diffusers_fused(tmp_path, sd, "sdxl", sdxl=True)
    _, report = apply_lora(mods, sd)
    assert report.arch.arch == "sdxl" and report.unmatched == []
    ref = {"unet": reference.unet, "text_encoder": reference.text_encoder, "text_encoder_2": reference.text_encoder_2}
    assert max_diff(weights(mods), weights(ref)) <= 1e-6


def test_diffusers_saved_file_with_alpha_in_metadata(tmp_path):
    """A file written by diffusers' save_lora_weights from a peft adapter (lora_alpha != r in the metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source, _ = sd15()
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v", "proj_in"])
    source.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source.unet),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    reference, _ = sd15()
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    reference.unload_lora_weights()
    _, mods = sd15()
    _, report = apply_lora(mods, path)
    # 4 attention blocks x (attn1, attn2) x (q, v) + 4 proj_in
    assert report.layout == "peft" and report.counts == {"unet": 20}
    assert max_diff(weights(mods), weights({"unet": reference.unet, "text_encoder": reference.text_encoder})) <= 1e-6


def test_comfyui_lorasave_with_diff_and_diff_b_against_hand_math(lora):
    _, mods = sd15()
    unet, te = mods["unet"], mods["text_encoder"]
    sd = factories.lora_state_dict(lora, "comfyui", unet.config)
    sd = {k: v.half() for k, v in sd.items()}  # LoraSave writes fp16
    g = torch.Generator().manual_seed(4)
    norm_diff = torch.randn(unet.down_blocks[1].attentions[0].norm.weight.shape, generator=g).half()
    bias_diff = torch.randn(unet.down_blocks[1].attentions[0].proj_in.bias.shape, generator=g).half()
    ln_diff = torch.randn(te.encoder.layers[0].layer_norm1.weight.shape, generator=g).half()
    sd["diffusion_model.input_blocks.3.1.norm.diff"] = norm_diff
    sd["diffusion_model.input_blocks.3.1.proj_in.diff_b"] = bias_diff
    sd["text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.diff"] = ln_diff
    before = weights(mods)
    _, report = apply_lora(mods, sd, strength=0.7)
    assert report.layout == "comfyui" and report.unmatched == []
    after = weights(mods)
    for key, (down, up, alpha) in lora.items():
        comp, path = key.split(".", 1)
        s = alpha / down.shape[0]
        w = before[f"{key}.weight"]
        expected = factories.lora_reference(w, down.half().float(), (up * s).half().float(), None, strength=0.7)
        torch.testing.assert_close(after[f"{key}.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(after["unet.down_blocks.1.attentions.0.norm.weight"],
                               before["unet.down_blocks.1.attentions.0.norm.weight"] + 0.7 * norm_diff.float())
    torch.testing.assert_close(after["unet.down_blocks.1.attentions.0.proj_in.bias"],
                               before["unet.down_blocks.1.attentions.0.proj_in.bias"] + 0.7 * bias_diff.float())
    torch.testing.assert_close(after["text_encoder.encoder.layers.0.layer_norm1.weight"],
                               before["text_encoder.encoder.layers.0.layer_norm1.weight"] + 0.7 * ln_diff.float())


def test_dora_scale_becomes_a_dora_delta(lora):
    """kohya / LyCORIS dora_scale is applied (weight decomposition): the math is in tests/test_lycoris_dora.py."""
    pipe, mods = sd15()
    sd = factories.lora_state_dict(lora, "kohya", pipe.unet.config)
    scale = torch.ones(8, 1)
    sd["lora_unet_down_blocks_1_attentions_0_proj_in.dora_scale"] = scale
    deltas, report = read_lora(sd, mods)
    dora = deltas["unet.down_blocks.1.attentions.0.proj_in"]
    assert isinstance(dora, DoRA) and isinstance(dora.delta, LoRA) and dora.magnitude is scale
    assert report.kinds == {"LoRA": 83, "DoRA": 1}
    assert list(report.magnitude) == ["unet.down_blocks.1.attentions.0.proj_in"]  # applied, and listed
    assert report.magnitude["unet.down_blocks.1.attentions.0.proj_in"] is scale


def test_reads_real_layout_names_without_a_model():
    down, up = torch.zeros(2, 320), torch.zeros(320, 2)
    sd = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
          "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up,
          "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0),
          "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_down.weight": torch.zeros(2, 3072),
          "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight": torch.zeros(768, 2)}
    deltas, report = read_lora(sd)
    assert report.arch.arch == "sd15"
    assert set(deltas) == {"unet.down_blocks.0.attentions.0.proj_in", "text_encoder.encoder.layers.11.mlp.fc2"}
    assert deltas["unet.down_blocks.0.attentions.0.proj_in"].alpha == 1.0


def test_bare_peft_state_dict_is_the_denoiser(lora):
    _, mods = sd15()
    sd = {k[len("unet."):]: v for k, v in factories.lora_state_dict(lora, "peft").items() if k.startswith("unet.")}
    deltas, report = read_lora(sd, mods)
    assert report.counts == {"unet": 72} and all(k.startswith("unet.") for k in deltas)


def test_unmatched_keys_are_reported_and_warned(lora):
    pipe, mods = sd15()
    sd = factories.lora_state_dict(lora, "kohya", pipe.unet.config)
    sd["lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_down_blocks_9_resnets_0_conv1.lora_up.weight"] = torch.zeros(4, 2)
    sd["some_other_tensor"] = torch.zeros(1)
    with pytest.warns(UserWarning, match="2 of 86 keys match no module"):
        handle, report = apply_lora(mods, sd)
    assert report.unmatched == ["some_other_tensor", "lora_unet_down_blocks_9_resnets_0_conv1"]
    assert len(handle.applied) == 84


def test_split_key_roles():
    assert split_key("unet.a.lora_A.default.weight") == ("unet.a", "down")
    assert split_key("unet.a.attn1.processor.to_out_lora.up.weight") == ("unet.a.attn1.processor.to_out", "up")
    assert split_key("text_encoder.x.lora_linear_layer.down.weight") == ("text_encoder.x", "down")
    assert split_key("lora_unet_x.alpha") == ("lora_unet_x", "alpha")
    assert split_key("diffusion_model.x.diff_b") == ("diffusion_model.x", "diff_b")
    assert split_key("model.diffusion_model.x.weight") is None


def test_attention_processor_layout(lora):
    """diffusers < 0.21 attention-processor keys: attn1.processor.to_out_lora.down.weight -> attn1.to_out.0."""
    _, mods = sd15()
    sd = {}
    for key, (down, up, _) in lora.items():
        if ".attn1.to_" in key:
            head, proj = key.rsplit(".attn1.", 1)
            proj = proj.replace("to_out.0", "to_out")
            sd[f"{head}.attn1.processor.{proj}_lora.down.weight"] = down
            sd[f"{head}.attn1.processor.{proj}_lora.up.weight"] = up
    deltas, report = read_lora(sd, mods)
    assert report.unmatched == [] and len(deltas) == 16  # 4 attention blocks x q, k, v, out
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0" in deltas


# ------------------------------------------------------------------------------------------------------ bad input
def test_unknown_layout_lists_first_keys():
    with pytest.raises(WeightsFormatError, match=r"unknown LoRA layout.*'foo\.weight'"):
        read_lora({"foo.weight": torch.zeros(1), "bar.weight": torch.zeros(1)})
    with pytest.raises(WeightsFormatError, match="looks like a model checkpoint"):
        read_lora({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_half_a_lora_is_an_error():
    with pytest.raises(WeightsFormatError, match="no up"):
        read_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "header_only"])
def test_corrupt_files_name_the_file(tmp_path, lora, damage):
    pipe, mods = sd15()
    path = save_state_dict(factories.lora_state_dict(lora, "kohya", pipe.unet.config), tmp_path / "l.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "header_only":
        n = int.from_bytes(data[:8], "little")
        path.write_bytes(data[: 8 + n])
    else:
        path.unlink()
    before = weights(mods)
    with pytest.raises(WeightsFormatError, match=str(path).replace(".", r"\.")):
        apply_lora(mods, path)
    assert max_diff(weights(mods), before) == 0.0


# ---------------------------------------------------------------------------------------------- architectures
ARCH_CASES = [
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)}, "sdxl"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)}, "sd15"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}, "sdxl"),
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight": (4, 1024)}, "sd2"),
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 320)}, "sd15"),
    ({"diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.lora_down.weight": (4, 640)}, "sdxl"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": (4, 8)}, "unet"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}, "flux"),
    ({"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 1536)}, "mmdit"),
    ({"transformer_blocks.0.attn2.to_q.lora_A.weight": (4, 1152)}, "pixart"),
    ({"lora_te2_x.lora_down.weight": (4, 4), "lora_unet_down_blocks_3_resnets_0_conv1.lora_down.weight": (4, 4)},
     "unknown"),
    ({"lora_unet_conv_in.lora_down.weight": (4, 4), "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": ()},
     "sdxl"),  # evidence on any line, not only the first
]


@pytest.mark.parametrize("shapes,expected", ARCH_CASES)
def test_detect_lora_arch(shapes, expected):
    assert detect_lora_arch(shapes).arch == expected


def test_detect_model_arch():
    assert detect_model_arch(factories.tiny_sd15_unet()).arch == "sd15"
    assert detect_model_arch(factories.tiny_sdxl_unet()).arch == "sdxl"
    for name, arch in [("sd3", "sd3"), ("flux", "flux"), ("pixart", "pixart")]:
        components = getattr(factories, f"tiny_{name}_components")()
        assert detect_model_arch(components["transformer"]).arch == arch
        assert detect_model_arch(dict(components["transformer"].config)).arch == arch


DIT_TARGETS = (r"attn[12]?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
               r"ff\.net\.(0\.proj|2)$")


def _peft_merged(transformer, sd: dict, rank: int):
    """PixArt has no diffusers LoRA loader: plain peft inject + set_peft_model_state_dict + merge (notes section 4)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = sorted({k.rsplit(".lora_", 1)[0][len("transformer."):] for k in sd})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), transformer)
    set_peft_model_state_dict(transformer, {k[len("transformer."):]: v for k, v in sd.items()})
    for m in transformer.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    return {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_transformer_loras_match_diffusers_or_peft(tmp_path, family):
    build = getattr(factories, f"tiny_{family}_components")
    mods = {"transformer": build()["transformer"]}
    lora = factories.random_lora(mods, rank=2, alpha=None, targets=DIT_TARGETS, seed=5)
    sd = factories.lora_state_dict(lora, "peft")
    if family == "pixart":
        reference = _peft_merged(build()["transformer"], sd, rank=2)
    else:
        pipe = getattr(factories, f"tiny_{family}_pipeline")()
        pipe.load_lora_weights(str(save_state_dict(sd, tmp_path / "l.safetensors")))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        reference = pipe.transformer.state_dict()
    _, report = apply_lora(mods, sd)
    assert report.unmatched == [] and report.counts == {"transformer": len(lora)}
    assert report.arch.arch in {"sd3": ("mmdit",), "flux": ("flux",), "pixart": ("pixart",)}[family]
    ours = mods["transformer"].state_dict()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6
