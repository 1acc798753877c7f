"""A LoRA load is validate-then-commit in both modes (fused weights, run-time hooks): a load that raises leaves the
model's OUTPUTS exactly as before (compared with outputs computed before the load), in core and in FewStepPipeline.

Each bad case is one broken part (alpha, factor values, shape, kind, strength) among otherwise valid deltas of two
components, so a loader that applies the valid part first (the bug of issue 11) changes the outputs and fails here.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.apply import fuse, fuse_many, resolve_module  # noqa: E402
from nimblediff.core.adapters.attach import attach, attach_many  # noqa: E402
from nimblediff.core.adapters.delta import LoHa, LoRA  # noqa: E402
from nimblediff.errors import (AdapterMismatchError, InvalidParameterError, NimbleDiffError,  # noqa: E402
                               WeightsFormatError)

MODES = {"fused": fuse_many, "hooked": attach_many}


# ------------------------------------------------------------------------------------------------------- helpers
def _models():
    return {"unet": factories.tiny_sd15_unet(0), "text_encoder": factories.tiny_clip_text_encoder(8, seed=2)}


def _outputs(mods) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) on fixed inputs: what a user of the model sees."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        return mods["unet"](x, 500, ctx).sample, mods["text_encoder"](ids)[0]


def _deltas(mods) -> dict:
    """A valid two-component LoRA (UNet attention / convs, text-encoder projections)."""
    return {k: LoRA(*v) for k, v in factories.random_lora(mods, rank=2, seed=1, scale=0.3).items()}


def _first(deltas, component):
    return next(k for k in deltas if k.startswith(component + "."))


def _hooks(mods) -> int:
    return sum(len(m._forward_hooks) for root in mods.values() for m in root.modules())


def _break(deltas, component, **changes):
    """The deltas with the first key of `component` replaced by a LoRA with `changes`."""
    key = _first(deltas, component)
    d = deltas[key]
    fields = dict(down=d.down, up=d.up, alpha=d.alpha) | changes
    return {**deltas, key: LoRA(**fields)}, key


# name -> (how to break a valid LoRA, expected error class, words the message must contain)
BAD = {
    "nan alpha (unet)": (lambda d: _break(d, "unet", alpha=float("nan")), WeightsFormatError, ["alpha=nan"]),
    "inf alpha (text encoder)": (lambda d: _break(d, "text_encoder", alpha=math.inf), WeightsFormatError,
                                 ["alpha=inf"]),
    "string alpha": (lambda d: _break(d, "unet", alpha="one"), WeightsFormatError, ["not a number"]),
    "nan factor (text encoder)": (lambda d: _break(d, "text_encoder", up=d[_first(d, "text_encoder")].up * math.nan),
                                  WeightsFormatError, ["NaN or inf"]),
    "wrong shape (text encoder)": (lambda d: _break(d, "text_encoder", down=torch.ones(2, 3)), AdapterMismatchError,
                                   ["does not fit", "valid"]),
    "rank 0": (lambda d: _break(d, "unet", down=torch.ones(0, 8), up=torch.ones(8, 0)), AdapterMismatchError,
               ["rank >= 1"]),
    "1-D factor": (lambda d: _break(d, "unet", down=torch.ones(8)), AdapterMismatchError, ["2-D"]),
}


# ---------------------------------------------------------------------------------------------------------- core
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BAD)
def test_failed_core_load_leaves_outputs_unchanged(case, mode):
    mods = _models()
    before = _outputs(mods)
    make, error, words = BAD[case]
    deltas, key = make(_deltas(mods))
    unet = {k: d for k, d in deltas.items() if k.startswith("unet.")}
    text = {k: d for k, d in deltas.items() if k not in unet}
    with pytest.raises(error) as info:
        MODES[mode](mods, [(unet, 1.0), (text, 0.5)], source="bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message and key in message, message
    assert all(w in message for w in words), message
    after = _outputs(mods)
    assert _hooks(mods) == 0
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strength", [math.nan, math.inf, "1", True])
def test_bad_strength_is_rejected_naming_it(mode, strength):
    mods = _models()
    before = _outputs(mods)
    with pytest.raises(InvalidParameterError, match="strength="):
        MODES[mode](mods, [(_deltas(mods), strength)])
    after = _outputs(mods)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_the_valid_deltas_of_every_bad_case_do_change_the_outputs():
    """Guards the tests above: without the broken key, the same load changes both components' outputs."""
    for mode, load in MODES.items():
        mods = _models()
        before = _outputs(mods)
        deltas = _deltas(mods)
        load(mods, [(deltas, 1.0)])
        after = _outputs(mods)
        assert (after[0] - before[0]).abs().max() > 1e-3 and (after[1] - before[1]).abs().max() > 1e-3, mode


@pytest.mark.parametrize("mode", MODES)
def test_partial_match_warns_with_the_same_counts(mode):
    mods = _models()
    deltas = _deltas(mods)
    extra = {"unet.no.such.layer": LoRA(torch.ones(2, 8), torch.ones(8, 2)),
             "text_encoder.nothing": LoRA(torch.ones(2, 8), torch.ones(8, 2))}
    n = len(deltas) + len(extra) + 1
    with pytest.warns(UserWarning, match=rf"3 of {n} keys match no module and are skipped.*{len(deltas)} applied"):
        handle = MODES[mode](mods, [({**deltas, **extra}, 1.0)], source="partial", unresolved=["lora_te_unknown"])
    assert handle.unmatched == ["lora_te_unknown", *extra]


def test_nothing_matches_raises_in_both_modes():
    mods = _models()
    for load in MODES.values():
        with pytest.raises(AdapterMismatchError, match="none of its 1 keys"):
            load(mods, [({"unet.nope": LoRA(torch.ones(2, 8), torch.ones(8, 2))}, 1.0)])
    assert _hooks(mods) == 0


def test_hooked_rejects_kinds_it_cannot_hook_before_hooking_anything():
    mods = _models()
    before = _outputs(mods)
    deltas = _deltas(mods)
    key = _first(deltas, "text_encoder")
    w = resolve_module(mods, key).weight
    r = 2
    deltas[key] = LoHa(torch.ones(w.shape[0], r), torch.ones(r, w.shape[1]), torch.ones(w.shape[0], r),
                       torch.ones(r, w.shape[1]))
    with pytest.raises(InvalidParameterError, match=rf"{key}.*LoHa.*fuse=True"):
        attach(mods, deltas)
    after = _outputs(mods)
    assert _hooks(mods) == 0 and torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    fuse(mods, deltas).unfuse()  # the fused path takes it


def test_interrupted_fuse_takes_back_what_it_fused(monkeypatch):
    """An interrupt after three of the layers were patched: those three are unfused again before it propagates."""
    import nimblediff.core.adapters.apply as apply_mod

    mods = _models()
    before = _outputs(mods)
    real, fused = apply_mod._add, []

    def interrupted(p, sign):
        if sign > 0 and len(fused) == 3:
            raise KeyboardInterrupt
        if sign > 0:
            fused.append(p.key)
        real(p, sign)

    monkeypatch.setattr(apply_mod, "_add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fuse_many(mods, [(_deltas(mods), 1.0)])
    after = _outputs(mods)
    assert len(fused) == 3
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-6)


def test_hooked_linear_and_conv_match_hand_computed_outputs():
    """W x + b + s (alpha / r) B A x, written out by hand in float64, for a Linear and a 3x3 Conv2d."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(3, 2), torch.nn.Conv2d(2, 3, 3, padding=1)
    mods = {"m": torch.nn.ModuleDict({"lin": lin, "conv": conv})}
    a_l, b_l = torch.randn(2, 3), torch.randn(2, 2)
    a_c, b_c = torch.randn(2, 2, 3, 3), torch.randn(3, 2, 1, 1)
    handle = attach(mods, {"m.lin": LoRA(a_l, b_l, alpha=1.0), "m.conv": LoRA(a_c, b_c, alpha=4.0)}, 0.5)
    x, img = torch.randn(4, 3), torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        y, z = lin(x), conv(img)
    w_l = lin.weight.double() + 0.5 * (1.0 / 2) * (b_l.double() @ a_l.double())
    torch.testing.assert_close(y.double(), x.double() @ w_l.T + lin.bias.double(), rtol=0, atol=1e-6)
    w_c = conv.weight.double() + 0.5 * (4.0 / 2) * torch.einsum("or,rikl->oikl", b_c.double().flatten(1), a_c.double())
    ref = torch.nn.functional.conv2d(img.double(), w_c, conv.bias.double(), padding=1)
    torch.testing.assert_close(z.double(), ref, rtol=0, atol=1e-5)
    handle.detach()


def test_peft_wrapped_layers_take_both_modes_alike():
    """A layer PEFT still wraps: fuse patches its base weight, attach hooks its base layer; same outputs."""
    from peft import LoraConfig

    results = {}
    for mode in MODES:
        mods = _models()
        deltas = {k: d for k, d in _deltas(mods).items() if k.startswith("unet.") and k.endswith(("to_q", "to_v"))}
        torch.manual_seed(0)  # the same PEFT adapter in both runs
        mods["unet"].add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
        peft_only = _outputs(mods)[0]
        handle = MODES[mode](mods, [(deltas, 0.7)])
        results[mode] = _outputs(mods)[0]
        assert (results[mode] - peft_only).abs().max() > 1e-3
        (handle.unfuse if mode == "fused" else handle.detach)()
        torch.testing.assert_close(_outputs(mods)[0], peft_only, rtol=0, atol=1e-6)
    torch.testing.assert_close(results["hooked"], results["fused"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ pipeline
def _pipe():
    from nimblediff.pipelines import FewStepPipeline

    pipe = FewStepPipeline(**factories.tiny_sd15_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe) -> torch.Tensor:
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def _file(pipe, folder, name, edit=None) -> str:
    """A kohya LoRA of the pipeline's UNet and text encoder; `edit(state dict)` breaks it."""
    from safetensors.torch import save_file

    lora = factories.random_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, rank=2, seed=4, scale=0.3)
    sd = factories.lora_state_dict(lora, "kohya")
    if edit is not None:
        edit(sd)
    path = Path(folder) / name
    save_file(sd, str(path))
    return str(path)


def _te_key(sd, suffix):
    return next(k for k in sorted(sd) if k.startswith("lora_te_") and k.endswith(suffix))


FILE_BAD = {
    "nan alpha": lambda sd: sd.__setitem__(_te_key(sd, ".alpha"), torch.tensor(float("nan"))),
    "inf factor": lambda sd: sd[_te_key(sd, "lora_up.weight")].fill_(math.inf),
    "text-encoder shape": lambda sd: sd.__setitem__(_te_key(sd, "lora_down.weight"), torch.ones(2, 5)),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooked"])
@pytest.mark.parametrize("case", FILE_BAD)
def test_failed_pipeline_load_leaves_images_unchanged(tmp_path, case, fused):
    pipe = _pipe()
    good = _file(pipe, tmp_path, "good.safetensors")
    pipe.load_lora(good, weight=0.5, fuse=True)        # an earlier LoRA stays loaded through the failure
    before = _images(pipe)
    bad = _file(pipe, tmp_path, "bad.safetensors", FILE_BAD[case])
    with pytest.raises(NimbleDiffError, match="bad.safetensors"):
        pipe.load_lora(bad, weight=1.0, fuse=fused)
    assert torch.equal(_images(pipe), before)
    assert _hooks({"unet": pipe.unet, "text_encoder": pipe.text_encoder}) == 0 and len(pipe._adapters) == 1
    pipe.unload_loras()
    torch.testing.assert_close(_images(pipe), _images(_pipe()), rtol=1e-5, atol=1e-5)


def test_pipeline_modes_agree_and_both_warn_on_a_partial_match(tmp_path):
    pipe = _pipe()
    base = _images(pipe)
    path = _file(pipe, tmp_path, "partial.safetensors",
                 lambda sd: sd.update({"lora_unet_nowhere.lora_down.weight": torch.ones(2, 4),
                                       "lora_unet_nowhere.lora_up.weight": torch.ones(4, 2)}))
    out = {}
    for fused in (True, False):
        with pytest.warns(UserWarning, match="1 of .* keys match no module"):
            pipe.load_lora(path, weight=0.8, fuse=fused)
        out[fused] = _images(pipe)
        pipe.unload_loras()
        torch.testing.assert_close(_images(pipe), base, rtol=1e-5, atol=1e-5)
    assert (out[True] - base).abs().max() > 1e-3
    torch.testing.assert_close(out[False], out[True], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- another base model
TINY_LORA = Path(__file__).parents[1] / "weights" / "tiny" / "nimblediff-tiny-flash-lora.safetensors"


def _sd15_width_pipe():
    """FewStepPipeline whose UNet has SD1.5's block layout and its 768-wide cross-attention (tiny channels)."""
    from nimblediff.pipelines import FewStepPipeline

    return FewStepPipeline(**(factories.tiny_sd15_components(0) | {"unet": factories.tiny_sd15_layout_unet(
        0, cross_attention_dim=768)}))


def _nimblediff_tiny_pipe():
    from nimblediff.pipelines import FewStepPipeline
    from nimblediff.tiny import model

    torch.manual_seed(0)
    return FewStepPipeline(**(factories.tiny_sd15_components(0) | {"unet": model.make_unet().eval(),
                                                                   "text_encoder": model.make_text_encoder(1000)}))


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 16, 16, generator=g), 500,
                    torch.randn(1, 3, unet.config.cross_attention_dim, generator=g)).sample


def _kohya_file(folder, unet, name, targets=None) -> str:
    from safetensors.torch import save_file

    kw = {} if targets is None else {"targets": targets}
    save_file(factories.lora_state_dict(factories.random_lora({"unet": unet}, rank=2, **kw), "kohya"),
              str(Path(folder) / name))
    return str(Path(folder) / name)


def _arch_cases(folder):
    """(LoRA file, pipeline, expected message): tiny LoRA on SD1.5, SD1.5 LoRA on tiny, same names other widths."""
    sd15_lora = _kohya_file(folder, factories.tiny_sd15_layout_unet(0, cross_attention_dim=768), "sd15.safetensors")
    wide_convs = _kohya_file(folder, factories.tiny_sd15_layout_unet(0, block_out_channels=(8, 16, 16, 16)),
                             "wide.safetensors", targets=(r"resnets\.\d+\.conv[12]$",))
    return [(str(TINY_LORA), _sd15_width_pipe, r"this LoRA is for nimblediff-tiny .*but the model is sd15 "),
            (sd15_lora, _nimblediff_tiny_pipe, r"this LoRA is for sd15 .*but the model is nimblediff-tiny "),
            (wide_convs, lambda: factories.tiny_sd15_pipeline(0, layout="sd15"),
             r"this LoRA is for another base model than this one \(both have sd15 module names\).* modules they share "
             r"have other widths")]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooked"])
def test_lora_of_another_base_is_named_as_such(tmp_path, fused):
    from nimblediff.pipelines import FewStepPipeline

    for path, make, message in _arch_cases(tmp_path):
        pipe = make()
        before = _unet_out(pipe.unet)
        with pytest.raises(AdapterMismatchError, match=message) as info:
            FewStepPipeline.load_lora(pipe, path, fuse=fused)
        assert "load the base model it was trained for" in str(info.value)
        assert torch.equal(_unet_out(pipe.unet), before) and _hooks({"unet": pipe.unet}) == 0


def test_lora_for_its_own_base_still_loads(tmp_path):
    """Guards the test above: each file loads into the base it was made for, and changes its output."""
    from nimblediff.pipelines import FewStepPipeline

    made_for = [_nimblediff_tiny_pipe, _sd15_width_pipe,
                lambda: FewStepPipeline(**(factories.tiny_sd15_components(0) | {
                    "unet": factories.tiny_sd15_layout_unet(0, block_out_channels=(8, 16, 16, 16))}))]
    for (path, _, _), make in zip(_arch_cases(tmp_path), made_for):
        pipe = make()
        before = _unet_out(pipe.unet)
        FewStepPipeline.load_lora(pipe, path, fuse=False)
        assert (_unet_out(pipe.unet) - before).abs().max() > 1e-4, path


# ---------------------------------------------------------------------------------------------- ComfyUI loader
@pytest.fixture
def comfy_stub():
    import fake_comfy

    fake_comfy.install()
    yield fake_comfy
    fake_comfy.uninstall()


def _comfy(fake_comfy, pipe, context_dim):
    """A ComfyUI-like MODEL / CLIP over an SD1.5-layout pipeline, with ComfyUI's unet_config for it."""
    import types

    ldm = factories.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config, prefix="diffusion_model.")
    te = {f"clip_l.transformer.text_model.{k.removeprefix('text_model.')}": v
          for k, v in pipe.text_encoder.state_dict().items()}
    unet_config = {"model_channels": pipe.unet.config.block_out_channels[0], "channel_mult": [1, 2, 2, 2],
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1,
                   "context_dim": context_dim}
    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(state_dict=lambda: ldm), None, unet_config)
    return model, fake_comfy.FakeCLIP(types.SimpleNamespace(state_dict=lambda: te))


def test_comfy_loader_rejects_nan_alpha_and_names_the_key(comfy_stub, tmp_path):
    from nimblediff.nodes.adapters import load_lora

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    model, clip = _comfy(comfy_stub, pipe, 8)
    bad = _file(pipe, tmp_path, "bad.safetensors", FILE_BAD["nan alpha"])
    with pytest.raises(WeightsFormatError, match=r"bad.safetensors: key 'text_encoder\..*alpha=nan"):
        load_lora(model, clip, bad, 1.0, 1.0)
    assert model.patches == {} and clip.patcher.patches == {}
    new_model, new_clip, _ = load_lora(model, clip, _file(pipe, tmp_path, "good.safetensors"), 1.0, 1.0)
    assert new_model.patches and new_clip.patcher.patches


@pytest.mark.parametrize("lora,context_dim,message", [
    ("tiny", 768, r"this LoRA is for nimblediff-tiny .*but the model is sd15 "),
    ("sd15", 64, r"this LoRA is for sd15 .*but the model is nimblediff-tiny "),
])
def test_comfy_loader_names_both_architectures(comfy_stub, tmp_path, lora, context_dim, message):
    from nimblediff.nodes.adapters import load_lora

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    model, clip = _comfy(comfy_stub, pipe, context_dim)
    path = str(TINY_LORA) if lora == "tiny" else \
        _kohya_file(tmp_path, factories.tiny_sd15_layout_unet(0, cross_attention_dim=768), "sd15.safetensors")
    with pytest.raises(AdapterMismatchError, match=message):
        load_lora(model, clip, path, 1.0, 1.0)
    assert model.patches == {} and clip.patcher.patches == {}


def test_comfy_loader_names_same_named_base_of_other_widths(comfy_stub, tmp_path):
    from nimblediff.nodes.adapters import load_lora

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    model, clip = _comfy(comfy_stub, pipe, 8)
    path = _kohya_file(tmp_path, factories.tiny_sd15_layout_unet(0, block_out_channels=(8, 16, 16, 16)),
                       "wide.safetensors", targets=(r"resnets\.\d+\.conv[12]$",))
    with pytest.raises(AdapterMismatchError, match=r"another base model than this one.*modules they share"):
        load_lora(model, clip, path, 1.0, 1.0)
