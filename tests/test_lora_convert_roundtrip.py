"""`nimblediff lora convert` writes only what loads back (issue 17 item 3): every layout it writes (peft, kohya,
comfyui), read by our loader onto the model the LoRA came from, patches the same weights as the original file.

Cases: the shipped tiny UNet (3 levels, one layer per block, no attention at the last level) with its Flash LoRA,
and SD1.5- and SDXL-shaped UNets (the real block structures at tiny widths) with LoRAs on every block kind,
downsamplers, upsamplers, conv_in/out, the time and SDXL add embeddings included. Independent references:
diffusers' own load_lora_weights fuses the original and the converted kohya file, and (through its sgm block
remapping, which reads layers_per_block from the UNet config) the ComfyUI file's LDM block numbers.
"""

import copy
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.cli import EMBEDDED_FLASH_LORA, EMBEDDED_MODEL, main  # noqa: E402
from nimblediff.errors import InvalidParameterError  # noqa: E402
from nimblediff.weights.keymaps import UNetLayout  # noqa: E402
from nimblediff.weights.lora_formats import apply_lora, read_lora  # noqa: E402
from nimblediff.weights.lora_write import save_lora  # noqa: E402
from nimblediff.weights.safetensors_io import load_with_metadata, save_state_dict  # noqa: E402

LAYOUTS = ("peft", "kohya", "comfyui")
_TARGETS = factories._LORA_TARGETS + (r"(down|up)samplers\.0\.conv$", r"conv_shortcut$", r"^conv_(in|out)$",
                                      r"time_embedding\.linear_[12]$", r"add_embedding\.linear_[12]$")


def _sdxl_layout_unet():
    """SDXL's structure at tiny widths: 3 levels of 2 layers, no attention at level 0, transformer depths 2 and 3
    (SDXL: 2 and 10), text_time add embedding (LDM label_emb)."""
    from diffusers import UNet2DConditionModel

    return factories._seeded(1, lambda: UNet2DConditionModel(
        block_out_channels=(4, 8, 16), layers_per_block=2, sample_size=16, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=16))


def _three_level_unet():
    """The shipped model's block structure (3 levels of 1 layer, attention at levels 0 and 1) at other widths and
    another text width, so nothing in its keys names its base."""
    from diffusers import UNet2DConditionModel

    return factories._seeded(2, lambda: UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16, norm_num_groups=4, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8))


def _shipped_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet").eval()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (modules, model folder, original LoRA file)."""
    root = tmp_path_factory.mktemp("cases")
    out = {"shipped": ({"unet": _shipped_unet()}, EMBEDDED_MODEL, EMBEDDED_FLASH_LORA)}
    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    pipe.save_pretrained(str(root / "sd15"), safe_serialization=True)
    sdxl, tiny3 = _sdxl_layout_unet(), _three_level_unet()
    sdxl.save_pretrained(str(root / "sdxl" / "unet"))
    tiny3.save_pretrained(str(root / "tiny3" / "unet"))
    for name, mods in (("sd15", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}), ("sdxl", {"unet": sdxl}),
                       ("tiny3", {"unet": tiny3})):
        lora = factories.random_lora(mods, rank=3, alpha=2.0, seed=5, targets=_TARGETS)
        layout = "kohya" if name == "sd15" else "peft"  # kohya: what diffusers' SD1.5 loader reads with alphas
        path = save_state_dict(factories.lora_state_dict(lora, layout), root / f"{name}_lora.safetensors")
        out[name] = (mods, root / name, path)
    return out


def _fused(mods: dict, path) -> dict:
    """Weights after our loader fuses `path` onto a copy of the modules."""
    mods = {k: copy.deepcopy(m) for k, m in mods.items()}
    _, report = apply_lora(mods, str(path))
    assert report.unmatched == [], report.unmatched[:5]
    return {f"{c}.{k}": v.clone() for c, m in mods.items() for k, v in m.state_dict().items()}


def _assert_same(got: dict, want: dict, base: dict, what: str):
    moved = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(moved) > 20, what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{what}: {k}")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["lora", "convert", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("case", ["shipped", "sd15", "sdxl", "tiny3"])
def test_every_layout_loads_back_onto_the_model_it_came_from(capsys, cases, tmp_path, case):
    mods, folder, original = cases[case]
    base = {f"{c}.{k}": v.clone() for c, m in mods.items() for k, v in m.state_dict().items()}
    want = _fused(mods, original)
    for layout in LAYOUTS:
        out = tmp_path / f"{layout}.safetensors"
        rc, stdout, err = run(capsys, original, out, "--layout", layout, "--model", folder)
        assert rc == 0, err
        assert f"wrote {out}" in stdout and f"{layout} layout" in stdout
        _assert_same(_fused(mods, out), want, base, f"{case} -> {layout}")
        # and back to peft from the written layout (the reader uses the same config-derived map)
        back = tmp_path / f"{layout}_back.safetensors"
        rc, _, err = run(capsys, out, back, "--layout", "peft", "--model", folder)
        assert rc == 0, err
        _assert_same(_fused(mods, back), want, base, f"{case} -> {layout} -> peft")


def test_shipped_flash_lora_converts_without_model_flag(capsys, cases, tmp_path):
    """The issue's command: the Flash LoRA is detected as NimbleDiff-Tiny's (context width 64), whose own UNet config
    sets the block numbers; a copy of the file elsewhere converts the same."""
    mods, _, original = cases["shipped"]
    base = {f"unet.{k}": v for k, v in mods["unet"].state_dict().items()}
    copy_path = tmp_path / "flash.safetensors"
    copy_path.write_bytes(Path(original).read_bytes())
    want = _fused(mods, original)
    for i, source in enumerate((original, copy_path)):
        out = tmp_path / f"flash_comfyui_{i}.safetensors"
        rc, _, err = run(capsys, source, out, "--layout", "comfyui")
        assert rc == 0, err
        sd, _ = load_with_metadata(out)
        # 3 levels of 1 layer: level 1's attention is input_blocks.3.1 and up_blocks.1's first output_blocks.2.1
        # (SD1.5's numbering, 2 layers per level, calls them input_blocks.4.1 and output_blocks.3.1)
        assert "diffusion_model.input_blocks.3.1.proj_in.lora_up.weight" in sd
        assert "diffusion_model.output_blocks.2.1.proj_in.lora_up.weight" in sd
        _assert_same(_fused(mods, out), want, base, f"flash -> comfyui ({source})")


def test_without_the_model_a_lora_that_does_not_fit_the_preset_is_refused(capsys, cases, tmp_path):
    """A LoRA whose keys name no base (3 levels, text width 8) read for SD1.5's numbering: its block widths
    disagree with that layout, and nothing is written; with --model it converts (see above)."""
    mods, _, original = cases["tiny3"]
    out = tmp_path / "c.safetensors"
    rc, _, err = run(capsys, original, out, "--layout", "comfyui")
    assert rc == 2 and "comfyui layout" in err and "--model" in err and "level 1" in err, err
    assert not out.exists() and not list(tmp_path.glob(".c.safetensors*"))
    # a ComfyUI file of it (written with --model) read without the model would take SD1.5's block numbers: refused
    comfy = tmp_path / "with_model.safetensors"
    assert run(capsys, original, comfy, "--layout", "comfyui", "--model", cases["tiny3"][1])[0] == 0
    rc, _, err = run(capsys, comfy, tmp_path / "p.safetensors", "--layout", "peft")
    assert rc == 2 and "sd15" in err and not (tmp_path / "p.safetensors").exists()
    # kohya and peft names do not depend on the block numbering: written and loaded back without a model
    base = {f"unet.{k}": v for k, v in mods["unet"].state_dict().items()}
    for layout in ("kohya", "peft"):
        assert run(capsys, original, tmp_path / f"{layout}.safetensors", "--layout", layout)[0] == 0
        _assert_same(_fused(mods, tmp_path / f"{layout}.safetensors"), _fused(mods, original), base, layout)


def test_a_model_of_another_base_is_refused(capsys, cases, tmp_path):
    _, _, original = cases["sd15"]
    rc, _, err = run(capsys, original, tmp_path / "x.safetensors", "--layout", "comfyui", "--model", EMBEDDED_MODEL)
    assert rc == 2 and "nimblediff-tiny" in err and not (tmp_path / "x.safetensors").exists()


def test_the_input_is_never_overwritten(capsys, cases, tmp_path):
    _, folder, original = cases["sd15"]
    before = Path(original).read_bytes()
    rc, _, err = run(capsys, original, original, "--layout", "kohya", "--model", folder, "--overwrite")
    assert rc == 2 and "is also an input" in err
    assert Path(original).read_bytes() == before


def test_api_refuses_a_layout_that_cannot_express_the_lora(cases, tmp_path):
    """The SD1.5-shaped LoRA for the shipped model's UNet: its modules are not that UNet's (4 levels vs 3)."""
    _, _, original = cases["sd15"]
    deltas, _ = read_lora(str(original))
    for target in (EMBEDDED_MODEL, UNetLayout.from_diffusers_config(_shipped_unet().config)):
        with pytest.raises(InvalidParameterError, match="comfyui layout: .*not a module of this UNet"):
            save_lora(deltas, tmp_path / "x.safetensors", "comfyui", target=target)
    assert not list(tmp_path.iterdir())


def _sgm_kohya(sd: dict) -> dict:
    """ComfyUI keys in kohya's sgm spelling (diffusion_model.input_blocks.1.1.x -> lora_unet_input_blocks_1_1_x):
    diffusers then maps the LDM block numbers itself, from the UNet config. alpha / rank is folded into up (a
    converted state dict handed to load_lora_weights loses diffusers' network alphas)."""
    out = {}
    for key, value in sd.items():
        if not key.endswith(".lora_up.weight"):
            continue
        module = key[:-len(".lora_up.weight")]
        down = sd[f"{module}.lora_down.weight"]
        alpha = sd.get(f"{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        if module.startswith("diffusion_model."):
            name = "lora_unet_" + module[len("diffusion_model."):].replace(".", "_")
        else:
            name = "lora_te_" + module.split(".transformer.", 1)[1].replace(".", "_")
        out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = value * scale, down
    return out


def test_sd15_kohya_and_comfyui_files_load_in_diffusers(capsys, cases, tmp_path):
    """diffusers' load_lora_weights + fuse_lora on the original and on our kohya file give the same weights; so
    does our ComfyUI file renamed to sgm kohya keys, which diffusers remaps with the UNet config (upsamplers of a
    level without attention, blocks 10 and 11 and the modules outside the blocks left out: diffusers' sgm remap
    calls output_blocks.<n>.1 an attention, matches block numbers by substring and maps the rest for SDXL only)."""
    mods, folder, original = cases["sd15"]
    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    kohya, comfy = tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    assert run(capsys, original, kohya, "--layout", "kohya", "--model", folder)[0] == 0
    assert run(capsys, original, comfy, "--layout", "comfyui", "--model", folder)[0] == 0

    def diffusers_fused(path_or_sd):
        p = copy.deepcopy(pipe)
        if isinstance(path_or_sd, dict):
            path_or_sd, _ = type(p).lora_state_dict(path_or_sd, unet_config=p.unet.config)
        p.load_lora_weights(path_or_sd, adapter_name="x")
        p.fuse_lora()
        p.unload_lora_weights()
        return {**{f"unet.{k}": v for k, v in p.unet.state_dict().items()},
                **{f"text_encoder.{k}": v for k, v in p.text_encoder.state_dict().items()}}

    base = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    ours = _fused(mods, original)
    reference = diffusers_fused(str(original))
    _assert_same(ours, reference, base, "our loader vs diffusers on the original")
    _assert_same(diffusers_fused(str(kohya)), reference, base, "diffusers on our kohya file")
    sd, _ = load_with_metadata(comfy)
    up0 = "diffusion_model.output_blocks.2.1.conv"  # up_blocks.0 has no attention: see the docstring
    assert any(k.startswith(up0) for k in sd)
    # diffusers' sgm remap also finds block 1's keys by substring, so blocks 10 and 11 would be claimed twice;
    # modules outside the blocks (conv_in, time_embed, out) it maps for SDXL only
    two_digit = re.compile(r"^diffusion_model\.((input|output)_blocks\.1\d\.|input_blocks\.0\.|time_embed\.|out\.)")
    sgm = _sgm_kohya({k: v for k, v in sd.items() if not k.startswith(up0) and not two_digit.match(k)})
    assert len(sgm) > 200
    got = diffusers_fused(sgm)
    skipped = re.compile(r"^unet\.(conv_in\.|conv_out\.|time_embedding\.|up_blocks\.0\.upsamplers\.|down_blocks\.3\.|"
                         r"up_blocks\.3\.(attentions|resnets)\.[12]\.)")
    without = {k: v for k, v in reference.items() if not skipped.match(k)}
    _assert_same({k: got[k] for k in without}, without, base, "diffusers on our comfyui file (sgm names)")
