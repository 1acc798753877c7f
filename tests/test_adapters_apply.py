"""core/adapters/apply.py: fusing canonical deltas, against hand-written math; atomic failures."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.apply import fuse, fuse_many  # noqa: E402
from nimblediff.core.adapters.delta import Diff, LoRA  # noqa: E402
from nimblediff.errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError  # noqa: E402
from nimblediff.weights.lora_formats import BiasedLoRA, apply_lora  # noqa: E402


class TextModel(nn.Module):  # shaped like transformers' CLIPTextModelWithProjection: text_model + text_projection
    def __init__(self):
        super().__init__()
        self.text_model = nn.Sequential()
        self.text_model.add_module("fc", nn.Linear(6, 5))
        self.text_projection = nn.Linear(5, 3, bias=False)


def toy(dtype=torch.float32):
    torch.manual_seed(0)
    unet = nn.Module()
    unet.lin = nn.Linear(6, 4)
    unet.conv = nn.Conv2d(3, 5, 3)
    unet.pw = nn.Conv2d(6, 4, 1)
    unet.norm = nn.LayerNorm(4)
    return {"unet": unet.to(dtype), "text_encoder": TextModel().to(dtype)}


def snapshot(modules):
    return {f"{c}.{k}": v.detach().clone() for c, m in modules.items() for k, v in m.state_dict().items()}


def assert_identical(modules, before):
    after = snapshot(modules)
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed by a failed call"


def rnd(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def hand(w, up, down, alpha, strength):
    """W + strength * alpha / r * up @ down, in float64."""
    s = strength * (1.0 if alpha is None else alpha / down.shape[0])
    return (w.double() + s * (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)).to(w.dtype)


CASES = {  # key -> delta, on toy()
    "unet.lin": LoRA(rnd(2, 6), rnd(4, 2), alpha=1.0),
    "unet.conv": LoRA(rnd(2, 3, 3, 3), rnd(5, 2, 1, 1), alpha=4.0),            # LoCon 3x3
    "unet.pw": LoRA(rnd(3, 6), rnd(4, 3)),                                     # linear-shaped LoRA on a 1x1 conv
    "text_encoder.fc": LoRA(rnd(2, 6), rnd(5, 2), alpha=2.0),                  # through text_model
    "text_encoder.text_projection": LoRA(rnd(1, 5), rnd(3, 1)),                # beside text_model
}


@pytest.mark.parametrize("strength", [1.0, 0.35, -0.5])
def test_fuse_matches_hand_math_and_unfuses(strength):
    mods = toy()
    before = snapshot(mods)
    handle = fuse(mods, CASES, strength)
    assert sorted(handle.applied) == sorted(CASES)
    after = snapshot(mods)
    for key, d in CASES.items():
        name = key.replace("text_encoder.fc", "text_encoder.text_model.fc")  # state-dict name
        expected = hand(before[f"{name}.weight"], d.up, d.down, d.alpha, strength)
        torch.testing.assert_close(after[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(after["unet.lin.bias"], before["unet.lin.bias"])
    handle.unfuse()
    restored = snapshot(mods)
    assert max(float((restored[k] - before[k]).abs().max()) for k in before) <= 1e-6
    with pytest.raises(InvalidParameterError, match="already unfused"):
        handle.unfuse()


def test_exact_unfuse_restores_bit_for_bit():
    mods = toy()
    before = snapshot(mods)
    handle = fuse(mods, CASES, 0.8, exact_unfuse=True)
    handle.unfuse()
    assert_identical(mods, before)


def test_diff_biased_lora_and_tucker():
    mods = toy()
    before = snapshot(mods)
    dw, db, dn = rnd(4, 6), rnd(4), rnd(4)
    mid = rnd(2, 2, 3, 3)
    tucker = LoRA(rnd(2, 3), rnd(5, 2), alpha=1.0, mid=mid)
    deltas = {"unet.lin": Diff(dw, db), "unet.norm": Diff(dn), "unet.conv": tucker,
              "unet.pw": BiasedLoRA(rnd(2, 6), rnd(4, 2), None, None, rnd(4))}
    fuse(mods, deltas, 0.5)
    after = snapshot(mods)
    torch.testing.assert_close(after["unet.lin.weight"], before["unet.lin.weight"] + 0.5 * dw)
    torch.testing.assert_close(after["unet.lin.bias"], before["unet.lin.bias"] + 0.5 * db)
    torch.testing.assert_close(after["unet.norm.weight"], before["unet.norm.weight"] + 0.5 * dn)
    # Tucker: up (o, r) x mid (r, s, kh, kw) x down (s, i) -> (o, i, kh, kw), written out as loops
    expected = torch.zeros(5, 3, 3, 3, dtype=torch.float64)
    for o in range(5):
        for i in range(3):
            for r in range(2):
                for s in range(2):
                    expected[o, i] += tucker.up[o, r].double() * mid[r, s].double() * tucker.down[s, i].double()
    torch.testing.assert_close(after["unet.conv.weight"], (before["unet.conv.weight"].double()
                                                           + 0.5 * 0.5 * expected).float())
    pw = deltas["unet.pw"]
    torch.testing.assert_close(after["unet.pw.weight"], hand(before["unet.pw.weight"], pw.up, pw.down, None, 0.5))
    torch.testing.assert_close(after["unet.pw.bias"], before["unet.pw.bias"] + 0.5 * pw.bias)


def test_fuse_many_sums_strengths():
    mods = toy()
    before = snapshot(mods)
    a, b = LoRA(rnd(2, 6), rnd(4, 2)), LoRA(rnd(3, 6), rnd(4, 3), alpha=1.5)
    handle = fuse_many(mods, [({"unet.lin": a}, 0.7), ({"unet.lin": b}, 0.3)])
    expected = hand(hand(before["unet.lin.weight"], a.up, a.down, None, 0.7), b.up, b.down, 1.5, 0.3)
    torch.testing.assert_close(snapshot(mods)["unet.lin.weight"], expected, rtol=0, atol=1e-6)
    handle.unfuse()
    torch.testing.assert_close(snapshot(mods)["unet.lin.weight"], before["unet.lin.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_are_rounded_once(dtype):
    mods = toy(dtype)
    before = snapshot(mods)
    d = CASES["unet.lin"]
    fuse(mods, {"unet.lin": d}, 1.0)
    expected = hand(before["unet.lin.weight"].float(), d.up, d.down, d.alpha, 1.0).to(dtype)
    assert torch.equal(snapshot(mods)["unet.lin.weight"], expected)


# ------------------------------------------------------------------------------------------ failures: untouched
BAD = {
    "shape": ({"unet.lin": CASES["unet.lin"], "unet.conv": LoRA(rnd(2, 4, 3, 3), rnd(5, 2, 1, 1))},
              AdapterMismatchError, r"'unet\.conv'.*down \(2, 4, 3, 3\).*weight \(5, 3, 3, 3\)"),
    "nan": ({"unet.lin": CASES["unet.lin"], "unet.pw": LoRA(rnd(3, 6), torch.full((4, 3), float("nan")))},
            WeightsFormatError, r"'unet\.pw'.*up tensor \(4, 3\).*NaN or inf"),
    "inf_alpha": ({"unet.lin": CASES["unet.lin"], "unet.pw": LoRA(rnd(3, 6), rnd(4, 3), alpha=float("inf"))},
                  WeightsFormatError, r"'unet\.pw'.*alpha=inf"),
    "bias_on_biasless": ({"unet.lin": CASES["unet.lin"], "text_encoder.text_projection": Diff(None, rnd(3))},
                         AdapterMismatchError, r"text_projection.*no bias"),
    "diff_shape": ({"unet.lin": Diff(rnd(4, 5))}, AdapterMismatchError, r"'unet\.lin'.*\(4, 5\).*\(4, 6\)"),
    "nothing_matches": ({"unet.nope": CASES["unet.lin"], "vae.x": CASES["unet.lin"]}, AdapterMismatchError,
                        r"my.safetensors \(kohya\): none of its 2 keys.*'unet\.nope'.*'vae\.x'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_failures_name_the_key_and_leave_the_model_identical(case):
    deltas, error, pattern = BAD[case]
    mods = toy()
    before = snapshot(mods)
    with pytest.raises(error, match=pattern):
        fuse(mods, deltas, 1.0, source="my.safetensors (kohya)")
    assert_identical(mods, before)


def test_fp16_overflow_is_refused_before_any_change():
    mods = toy(torch.float16)
    before = snapshot(mods)
    big = LoRA(torch.full((1, 6), 300.0), torch.full((4, 1), 300.0))  # 9e4 > 65504
    with pytest.raises(WeightsFormatError, match=r"'unet\.pw'.*overflow torch\.float16"):
        fuse(mods, {"unet.lin": CASES["unet.lin"], "unet.pw": big}, 1.0)
    assert_identical(mods, before)


@pytest.mark.parametrize("strength", [float("nan"), "1", None])
def test_bad_strength(strength):
    mods = toy()
    with pytest.raises(InvalidParameterError, match="strength"):
        fuse(mods, CASES, strength)


def test_partial_match_warns_with_counts():
    mods = toy()
    with pytest.warns(UserWarning, match=r"2 of 7 keys match no module.*'unet\.gone'.*5 applied"):
        handle = fuse(mods, {**CASES, "unet.gone": CASES["unet.lin"]}, unresolved=["lora_unet_weird"])
    assert handle.unmatched == ["lora_unet_weird", "unet.gone"]


def test_sdxl_lora_on_sd15_names_both_and_leaves_model_identical():
    pipe = factories.tiny_sd15_pipeline()
    mods = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    before = snapshot(mods)
    sd = {  # real SDXL widths: 2048-wide cross-attention context, and a second text encoder
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
    }
    with pytest.raises(AdapterMismatchError, match=r"for sdxl .*model is sd15"):
        apply_lora(mods, sd)
    assert_identical(mods, before)


def test_failed_apply_on_a_pipeline_leaves_it_identical():
    """The last of 84 layers is corrupt: nothing may have been written."""
    pipe = factories.tiny_sd15_pipeline()
    mods = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    lora = factories.random_lora(mods, rank=2, alpha=1.0)
    sd = factories.lora_state_dict(lora, "kohya")
    last = [k for k in sd if k.endswith("lora_up.weight")][-1]
    sd[last] = sd[last].clone()
    sd[last][0, 0] = float("inf")
    before = snapshot(mods)
    with pytest.raises(WeightsFormatError, match="NaN or inf"):
        apply_lora(mods, sd)
    assert_identical(mods, before)


def test_core_imports_without_host_frameworks():
    code = ("import sys; import nimblediff.core.adapters.apply; "
            "bad = [m for m in ('diffusers', 'transformers', 'peft', 'comfy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
