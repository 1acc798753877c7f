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
