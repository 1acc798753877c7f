"""Key maps (weights/keymaps.py) against diffusers' own single-file loader, the independent reference."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.errors import InvalidParameterError, WeightsFormatError  # noqa: E402
from nimblediff.weights import keymaps  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("layout", ["tiny", "sd15"])
def test_single_file_round_trip_through_diffusers(tmp_path, layout):
    """Our LDM file, read by diffusers' from_single_file, gives back the same pipeline bit for bit."""
    from diffusers import StableDiffusionPipeline

    pipe = factories.save_tiny_sd15(tmp_path / "folder", layout=layout)
    ckpt = save_state_dict(factories.sd15_to_ldm(pipe), tmp_path / "model.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tmp_path / "folder"),
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert _max_diff(getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()) == 0.0, name


def _sdxl_layout_unet():
    """3 levels, 2 resnets, transformer depths (0, 2, 3) and text_time embedding: SDXL's structure, tiny."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8, 8), layers_per_block=2, sample_size=16, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=16).eval()


def test_sdxl_shaped_unet_round_trip_through_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = _sdxl_layout_unet()
    unet.save_pretrained(tmp_path / "folder" / "unet")
    sd = factories.unet_to_ldm(unet.state_dict(), unet.config)
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight" in sd
    ckpt = save_state_dict(sd, tmp_path / "unet.safetensors")
    loaded = UNet2DConditionModel.from_single_file(str(ckpt), config=str(tmp_path / "folder"), subfolder="unet",
                                                   local_files_only=True)
    assert _max_diff(unet.state_dict(), loaded.state_dict()) == 0.0


@pytest.mark.parametrize("build", [factories.tiny_sd15_unet, factories.tiny_sd15_layout_unet,
                                   factories.tiny_sdxl_unet, _sdxl_layout_unet])
def test_module_list_is_exactly_the_models_weight_modules(build):
    unet = build()
    layout = keymaps.UNetLayout.from_diffusers_config(unet.config)
    actual = {n for n, m in unet.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    listed = [d for d, _ in keymaps.unet_module_names(layout)]
    assert len(listed) == len(set(listed)) and set(listed) == actual
    ldm = [l for _, l in keymaps.unet_module_names(layout)]
    assert len(set(ldm)) == len(ldm)


def test_state_dict_round_trips():
    pipe = factories.tiny_sd15_pipeline(layout="sd15")
    unet, vae, te = pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict()
    layout = keymaps.UNetLayout.from_diffusers_config(pipe.unet.config)
    assert _max_diff(keymaps.unet_ldm_to_diffusers(keymaps.unet_diffusers_to_ldm(unet, layout), layout), unet) == 0
    assert _max_diff(keymaps.vae_ldm_to_diffusers(keymaps.vae_diffusers_to_ldm(vae, pipe.vae.config),
                                                  pipe.vae.config), vae) == 0
    assert _max_diff(keymaps.clip_ldm_to_diffusers(keymaps.clip_diffusers_to_ldm(te)), te) == 0
    ldm_vae = keymaps.vae_diffusers_to_ldm(vae, pipe.vae.config)
    assert ldm_vae["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)  # 1x1 conv in LDM


# Hand-checked against the SD1.5 / SDXL original checkpoints' key lists.
SD15_CASES = [
    ("conv_in", "input_blocks.0.0"),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "input_blocks.2.1.transformer_blocks.0.attn2.to_k"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.resnets.2.norm1", "output_blocks.2.0.in_layers.0"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_norm_out", "out.0"),
]
SDXL_CASES = [
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
     "input_blocks.4.1.transformer_blocks.1.ff.net.0.proj"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0",
     "input_blocks.8.1.transformer_blocks.9.attn1.to_out.0"),
    ("mid_block.attentions.0.transformer_blocks.9.norm3", "middle_block.1.transformer_blocks.9.norm3"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
]


@pytest.mark.parametrize("layout,cases", [(keymaps.UNetLayout.sd15(), SD15_CASES),
                                          (keymaps.UNetLayout.sdxl(), SDXL_CASES)], ids=["sd15", "sdxl"])
def test_known_module_names(layout, cases):
    m = keymaps.unet_keymap(layout)
    for diffusers_name, ldm_name in cases:
        assert m.to_b(diffusers_name) == ldm_name
        assert m.to_a(ldm_name) == diffusers_name


SD15_DIFFUSERS = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_DIFFUSERS = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      addition_embed_type="text_time")
# ComfyUI's model_detection output (supported_models.py / detect_unet_config) for the same models
SD15_COMFY = dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1, model_channels=320)
SDXL_COMFY = dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                  transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                  model_channels=320, adm_in_channels=2816)


@pytest.mark.parametrize("diffusers_cfg,comfy_cfg,expected", [
    (SD15_DIFFUSERS, SD15_COMFY, keymaps.UNetLayout.sd15()),
    (SDXL_DIFFUSERS, SDXL_COMFY, keymaps.UNetLayout.sdxl())], ids=["sd15", "sdxl"])
def test_layout_from_diffusers_and_comfy_configs_agree(diffusers_cfg, comfy_cfg, expected):
    # SDXL's first level carries transformer_layers_per_block=1 but has no attention: depth 0 there
    assert keymaps.UNetLayout.from_diffusers_config(diffusers_cfg) == expected
    assert keymaps.UNetLayout.from_comfy_config(comfy_cfg) == expected


def test_bad_inputs_raise_with_the_keys():
    layout = keymaps.UNetLayout.sd15()
    with pytest.raises(WeightsFormatError, match="no mapping.*up_blocks.7.resnets.0.conv1.weight"):
        keymaps.unet_diffusers_to_ldm({"up_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, layout)
    with pytest.raises(WeightsFormatError, match="vae.weight"):
        keymaps.unet_ldm_to_diffusers({"vae.weight": torch.zeros(1)}, layout)
    with pytest.raises(InvalidParameterError, match="transformer_depth"):
        keymaps.UNetLayout((4,), (2,), (1,), (1, 1), 1)
    with pytest.raises(InvalidParameterError, match="transformer_depth_middle"):
        keymaps.UNetLayout.from_comfy_config({**SD15_COMFY, "transformer_depth_middle": -1})


# ------------------------------------------------------------------- the shipped UNet; fit checks; config files
TINY = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "nimblediff-tiny"


def test_shipped_tiny_unet_round_trip_through_diffusers(tmp_path):
    """The shipped UNet (3 levels of 1 layer, no attention at the last level): our LDM names, read by diffusers'
    from_single_file (which numbers blocks from the same config), give back the same weights."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(TINY), subfolder="unet")
    layout = keymaps.UNetLayout.nimblediff_tiny()
    assert layout == keymaps.UNetLayout.from_diffusers_config(keymaps.read_unet_config(TINY))
    assert layout.num_res_blocks == (1, 1, 1) and layout.transformer_depth == (1, 1, 0)
    sd = factories.unet_to_ldm(unet.state_dict(), unet.config)
    assert "model.diffusion_model.input_blocks.3.1.proj_in.weight" in sd           # SD1.5 numbering: 4.1
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd             # up_blocks.0's upsampler
    ckpt = save_state_dict(sd, tmp_path / "unet.safetensors")
    loaded = UNet2DConditionModel.from_single_file(str(ckpt), config=str(TINY), subfolder="unet",
                                                   local_files_only=True)
    assert _max_diff(unet.state_dict(), loaded.state_dict()) == 0.0


def test_fit_problems_name_modules_and_widths():
    tiny = keymaps.UNetLayout.nimblediff_tiny()
    fits = {"down_blocks.1.attentions.0.proj_in": (128, 128, 1, 1), "mid_block.resnets.0.conv1": (128, 128, 3, 3),
            "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj": (512, 64), "conv_in": (64, 4, 3, 3)}
    assert keymaps.unet_fit_problems(tiny, fits) == []
    problems = keymaps.unet_fit_problems(tiny, {"down_blocks.3.resnets.0.conv1": (8, 8, 3, 3),
                                                "down_blocks.0.resnets.0.conv1": (32, 64, 3, 3)})
    assert problems == ["'down_blocks.3.resnets.0.conv1' is not a module of this UNet",
                        "'down_blocks.0.resnets.0.conv1' has weight shape (32, 64, 3, 3), but level 0 of this UNet "
                        "has 64 channels"]
    # relative: SD1.5's 4 levels put up_blocks.2 at level 1 with down_blocks.1; the shipped LoRA's widths disagree
    shipped = {"down_blocks.1.attentions.0.proj_in": (128, 128, 1, 1),
               "up_blocks.2.attentions.0.proj_in": (64, 64, 1, 1)}
    assert keymaps.unet_fit_problems(keymaps.UNetLayout.sd15(), shipped, widths="none") == []
    (problem,) = keymaps.unet_fit_problems(keymaps.UNetLayout.sd15(), shipped, widths="relative")
    assert "'up_blocks.2.attentions.0.proj_in' is 64 channels wide" in problem and "level 1" in problem
    assert keymaps.unet_fit_problems(tiny, shipped, widths="relative") == []
    with pytest.raises(InvalidParameterError, match="widths='exact'; valid"):
        keymaps.unet_fit_problems(tiny, {}, widths="exact")


def test_read_unet_config_accepts_model_unet_and_file_and_names_bad_paths(tmp_path):
    want = keymaps.read_unet_config(TINY)
    assert keymaps.read_unet_config(TINY / "unet") == want == keymaps.read_unet_config(TINY / "unet" / "config.json")
    with pytest.raises(WeightsFormatError, match=f"{tmp_path}: no UNet config found"):
        keymaps.read_unet_config(tmp_path)
    with pytest.raises(WeightsFormatError, match="not a diffusers UNet2DConditionModel config.*AutoencoderKL"):
        keymaps.read_unet_config(TINY / "vae")
