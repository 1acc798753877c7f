"""LoHa, LoKr (incl. Tucker), DoRA, sparse and factored deltas: core/adapters (fuse) against hand-written math, the
readers (weights/lora_formats.py) on the tiny SD1.5 pipeline, PEFT's own DoRA merge, and bad input."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.apply import fuse, fuse_many  # noqa: E402
from nimblediff.core.adapters.delta import DoRA, Factored, LoHa, LoKr, LoRA, Sparse  # noqa: E402
from nimblediff.errors import AdapterMismatchError, WeightsFormatError  # noqa: E402
from nimblediff.weights.lora_formats import apply_lora, read_lora  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402


def rnd(*shape, seed=[100]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.3


def toy():
    torch.manual_seed(0)
    m = nn.Module()
    m.lin = nn.Linear(6, 4)       # (4, 6)
    m.wide = nn.Linear(8, 6)      # (6, 8) = kron of (2, 2) and (3, 4)
    m.conv = nn.Conv2d(3, 6, 3)   # (6, 3, 3, 3)
    return {"unet": m}


def snapshot(mods):
    return {f"{c}.{k}": v.detach().clone() for c, m in mods.items() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ hand-written math, element by element (float64)
def matmul(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(a[i, k] * b[k, j] for k in range(a.shape[1]))
    return out


def tucker(t, a, b):
    """W[p, q, k, l] = sum_ij t[i, j, k, l] a[i, p] b[j, q] (LyCORIS CP form: a (r, out), b (r, in))."""
    t, a, b = t.double(), a.double(), b.double()
    out = torch.zeros(a.shape[1], b.shape[1], *t.shape[2:], dtype=torch.float64)
    for p in range(a.shape[1]):
        for q in range(b.shape[1]):
            for i in range(t.shape[0]):
                for j in range(t.shape[1]):
                    out[p, q] += t[i, j] * a[i, p] * b[j, q]
    return out


def kron(x, y):
    """K[a*o2 + b, c*i2 + d, ...] = x[a, c] y[b, d, ...]."""
    x, y = x.double(), y.double()
    out = torch.zeros(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1], *y.shape[2:], dtype=torch.float64)
    for a in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[a * y.shape[0]:(a + 1) * y.shape[0], c * y.shape[1]:(c + 1) * y.shape[1]] = x[a, c] * y
    return out


def dora_ref(w, dw, m, per_output: bool):
    """Liu et al. 2024, eq. 5: m * V / ||V|| with V = W + dW, the norm per output row or per input column."""
    v = w.double() + dw
    dims = tuple(d for d in range(v.ndim) if d != (0 if per_output else 1))
    norm = v.pow(2).sum(dims, keepdim=True).sqrt()
    return m.double().reshape(norm.shape) * v / norm - w.double()


W1A, W1B, W2A, W2B = rnd(4, 2), rnd(2, 6), rnd(4, 2), rnd(2, 6)
C1A, C1B, C2A, C2B = rnd(6, 2), rnd(2, 27), rnd(6, 2), rnd(2, 27)
T1, T2, TA1, TB1, TA2, TB2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3), rnd(2, 6), rnd(2, 3), rnd(2, 6), rnd(2, 3)
K1, K2, K2A, K2B, K1A, K1B = rnd(2, 2), rnd(3, 4), rnd(3, 1), rnd(1, 4), rnd(2, 1), rnd(1, 2)
KC1, KC2, KT, KTA, KTB = rnd(2, 1), rnd(3, 3, 3, 3), rnd(2, 2, 3, 3), rnd(2, 3), rnd(2, 3)
LD, LU, MAG_OUT, MAG_IN = rnd(2, 6), rnd(4, 2), rnd(4).abs() + 0.5, rnd(1, 6).abs() + 0.5
SP_IDX, SP_VAL = torch.tensor([0, 5, 23, 5]), rnd(4)
U, V = rnd(4, 3), rnd(3, 6)

CASES = {  # name -> (key, delta, dW(W) by hand, float64)
    "loha": ("unet.lin", LoHa(W1A, W1B, W2A, W2B, alpha=1.0),
             lambda w: matmul(W1A, W1B) * matmul(W2A, W2B) * 0.5),
    "loha_conv": ("unet.conv", LoHa(C1A, C1B, C2A, C2B, alpha=4.0),
                  lambda w: (matmul(C1A, C1B) * matmul(C2A, C2B) * 2.0).reshape(6, 3, 3, 3)),
    "loha_tucker": ("unet.conv", LoHa(TA1, TB1, TA2, TB2, alpha=1.0, t1=T1, t2=T2),
                    lambda w: tucker(T1, TA1, TB1) * tucker(T2, TA2, TB2) * 0.5),
    "lokr_full": ("unet.wide", LoKr(K1, K2, alpha=5.0), lambda w: kron(K1, K2)),  # two full factors: no alpha
    "lokr_w2_lowrank": ("unet.wide", LoKr(K1, None, 0.5, w2a=K2A, w2b=K2B),
                        lambda w: kron(K1, matmul(K2A, K2B)) * 0.5),
    "lokr_w1_lowrank": ("unet.wide", LoKr(None, K2, 2.0, w1a=K1A, w1b=K1B), lambda w: kron(matmul(K1A, K1B), K2) * 2),
    "lokr_conv": ("unet.conv", LoKr(KC1, KC2), lambda w: kron(KC1[:, :, None, None], KC2)),
    "lokr_conv_tucker": ("unet.conv", LoKr(KC1, None, 1.0, w2a=KTA, w2b=KTB, t2=KT),
                         lambda w: kron(KC1[:, :, None, None], tucker(KT, KTA, KTB)) * 0.5),
    "sparse_flat": ("unet.lin", Sparse(SP_IDX, SP_VAL), lambda w: torch.zeros(24, dtype=torch.float64).index_put(
        (SP_IDX,), SP_VAL.double(), accumulate=True).reshape(4, 6)),
    "sparse_coo": ("unet.lin", Sparse(torch.stack([SP_IDX // 6, SP_IDX % 6]), SP_VAL),
                   lambda w: torch.zeros(4, 6, dtype=torch.float64).index_put(
                       (SP_IDX // 6, SP_IDX % 6), SP_VAL.double(), accumulate=True)),
    "factored_add": ("unet.lin", Factored(U, V, replace=False), lambda w: matmul(U, V)),
    "factored_replace": ("unet.lin", Factored(U, V), lambda w: matmul(U, V) - w.double()),
    "dora_out": ("unet.lin", DoRA(LoRA(LD, LU, 1.0), MAG_OUT, True),
                 lambda w: dora_ref(w, matmul(LU, LD) * 0.5, MAG_OUT, True)),
    "dora_in": ("unet.lin", DoRA(LoRA(LD, LU, 1.0), MAG_IN),  # (1, in): dispatched on its shape
                lambda w: dora_ref(w, matmul(LU, LD) * 0.5, MAG_IN, False)),
    "dora_loha": ("unet.lin", DoRA(LoHa(W1A, W1B, W2A, W2B, alpha=1.0), MAG_OUT.reshape(4, 1)),
                  lambda w: dora_ref(w, matmul(W1A, W1B) * matmul(W2A, W2B) * 0.5, MAG_OUT, True)),
}


@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_matches_hand_math_and_unfuses(case, strength):
    key, delta, dw = CASES[case]
    mods = toy()
    before = snapshot(mods)
    w = before[f"{key}.weight"]
    handle = fuse(mods, {key: delta}, strength)
    expected = (w.double() + strength * dw(w)).float()
    torch.testing.assert_close(snapshot(mods)[f"{key}.weight"], expected, rtol=0, atol=2e-6)
    handle.unfuse()
    after = snapshot(mods)
    if getattr(delta, "needs_weight", False):  # DoRA / replace keep the weight they replaced: back bit for bit
        assert torch.equal(after[f"{key}.weight"], w)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["loha_tucker", "lokr_w2_lowrank", "dora_in", "factored_replace"])
def test_low_precision_models_are_rounded_once(case, dtype):
    key, delta, dw = CASES[case]
    mods = {"unet": toy()["unet"].to(dtype)}
    w = snapshot(mods)[f"{key}.weight"]
    handle = fuse(mods, {key: delta}, 0.7)
    expected = (w.float() + 0.7 * dw(w.float()).float()).to(dtype)  # float32 math, one rounding
    got = snapshot(mods)[f"{key}.weight"]
    assert float((got.float() - expected.float()).abs().max()) <= float(torch.finfo(dtype).eps) * 4
    handle.unfuse()
    if getattr(delta, "needs_weight", False):
        assert torch.equal(snapshot(mods)[f"{key}.weight"], w)


def test_dora_stacks_in_order_and_unfuses_out_of_order():
    """A LoRA then a DoRA on one layer: the DoRA normalises the weight as the LoRA left it (ComfyUI's order).
    Unfusing the DoRA first restores exactly; unfusing the LoRA's handle first keeps the DoRA's change."""
    key, lora = "unet.lin", LoRA(rnd(3, 6), rnd(4, 3), alpha=1.5)
    dora = CASES["dora_out"][1]
    mods = toy()
    w = snapshot(mods)[f"{key}.weight"].double()
    handle = fuse_many(mods, [({key: lora}, 0.5), ({key: dora}, 0.8)])
    w1 = w + 0.5 * 0.5 * matmul(lora.up, lora.down)
    expected = w1 + 0.8 * dora_ref(w1, matmul(LU, LD) * 0.5, MAG_OUT, True)
    torch.testing.assert_close(mods["unet"].lin.weight.double(), expected, rtol=0, atol=2e-6)
    handle.unfuse()
    torch.testing.assert_close(mods["unet"].lin.weight.double(), w, rtol=0, atol=1e-6)
    # two handles, the older one unfused first
    h_dora = fuse(mods, {key: dora}, 1.0)
    after_dora = mods["unet"].lin.weight.detach().double().clone()
    h_lora = fuse(mods, {key: lora}, 1.0)
    h_dora.unfuse()  # subtracts its own change: the LoRA's stays
    torch.testing.assert_close(mods["unet"].lin.weight.double(), w + 0.5 * matmul(lora.up, lora.down),
                               rtol=0, atol=1e-6)
    h_lora.unfuse()
    torch.testing.assert_close(mods["unet"].lin.weight.double(), w, rtol=0, atol=1e-6)
    assert not torch.equal(after_dora, w.float().double())


# --------------------------------------------------------------------------------------- readers on tiny SD1.5
def sd15():
    pipe = factories.tiny_sd15_pipeline()
    return pipe, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


MODULES = {  # canonical key -> how the test file stores it
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "loha",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": "lokr",        # (64, 8) = (8, 2) x (8, 4)
    "unet.down_blocks.0.resnets.0.conv1": "loha_tucker",
    "unet.down_blocks.1.resnets.0.conv1": "locon_tucker",
    "unet.up_blocks.0.attentions.0.proj_in": "dora_out",                                # 1x1 conv
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "dora_in",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": "lora_rank3",
    "text_encoder.encoder.layers.0.self_attn.q_proj": "loha_te",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "sparse",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0": "factored",
}


def kohya_name(key: str) -> str:
    comp, path = key.split(".", 1)
    return ("lora_unet_" if comp == "unet" else "lora_te_text_model_") + path.replace(".", "_")


def lycoris_file(mods) -> tuple[dict, dict]:
    """A kohya-named LyCORIS file mixing kinds and ranks, and {key: dW(W)} by hand (float64)."""
    shapes = {k: mods[k.split(".", 1)[0]].get_submodule(k.split(".", 1)[1]).weight.shape for k in MODULES}
    sd, ref = {}, {}
    for key, kind in MODULES.items():
        n, shape = kohya_name(key), shapes[key]
        out, fan_in = shape[0], shape[1:].numel()
        if kind in ("loha", "loha_te"):
            a1, b1, a2, b2 = rnd(out, 2), rnd(2, fan_in), rnd(out, 2), rnd(2, fan_in)
            sd.update({f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1, f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2,
                       f"{n}.alpha": torch.tensor(1.0)})
            ref[key] = lambda w, a1=a1, b1=b1, a2=a2, b2=b2: (matmul(a1, b1) * matmul(a2, b2) * 0.5).reshape(w.shape)
        elif kind == "loha_tucker":
            t1, t2, a1, b1, a2, b2 = rnd(3, 3, 3, 3), rnd(3, 3, 3, 3), rnd(3, out), rnd(3, shape[1]), rnd(3, out), \
                rnd(3, shape[1])
            sd.update({f"{n}.hada_t1": t1, f"{n}.hada_t2": t2, f"{n}.hada_w1_a": a1, f"{n}.hada_w1_b": b1,
                       f"{n}.hada_w2_a": a2, f"{n}.hada_w2_b": b2, f"{n}.alpha": torch.tensor(1.5)})
            ref[key] = lambda w, t1=t1, t2=t2, a1=a1, b1=b1, a2=a2, b2=b2: tucker(t1, a1, b1) * tucker(t2, a2, b2) * 0.5
        elif kind == "lokr":
            w1, w2a, w2b = rnd(8, 2), rnd(8, 2), rnd(2, 4)
            sd.update({f"{n}.lokr_w1": w1, f"{n}.lokr_w2_a": w2a, f"{n}.lokr_w2_b": w2b,
                       f"{n}.alpha": torch.tensor(1.0)})
            ref[key] = lambda w, w1=w1, w2a=w2a, w2b=w2b: kron(w1, matmul(w2a, w2b)) * 0.5
        elif kind == "locon_tucker":
            down, mid, up = rnd(2, shape[1], 1, 1), rnd(2, 2, 3, 3), rnd(out, 2, 1, 1)
            sd.update({f"{n}.lora_down.weight": down, f"{n}.lora_mid.weight": mid, f"{n}.lora_up.weight": up,
                       f"{n}.alpha": torch.tensor(2.0)})
            ref[key] = lambda w, d=down, m=mid, u=up: tucker(m, u.flatten(1).T, d.flatten(1))  # 2 / r = 1
        elif kind in ("dora_out", "dora_in", "lora_rank3"):
            r = 3 if kind == "lora_rank3" else 2
            down, up = rnd(r, *shape[1:]), rnd(out, r, *shape[2:])
            sd.update({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(1.0)})
            dw = lambda w, d=down, u=up, r=r: (matmul(u, d) / r).reshape(w.shape)  # noqa: E731
            if kind == "lora_rank3":
                ref[key] = dw
            else:  # LyCORIS wd_on_out: (out, 1, ...); otherwise (1, in, ...)
                m = rnd(out, *[1] * (len(shape) - 1)).abs() + 0.5 if kind == "dora_out" else \
                    rnd(1, shape[1], *[1] * (len(shape) - 2)).abs() + 0.5
                sd[f"{n}.dora_scale"] = m
                ref[key] = lambda w, dw=dw, m=m, o=kind == "dora_out": dora_ref(w, dw(w), m, o)
        elif kind == "sparse":
            idx, val = torch.tensor([[0, 3, 7], [5, 30, 1]]), rnd(3)
            sd.update({f"{n}.sparse_indices": idx, f"{n}.sparse_values": val})
            ref[key] = lambda w, idx=idx, val=val: torch.zeros(w.shape, dtype=torch.float64).index_put(
                tuple(idx), val.double(), accumulate=True)
        elif kind == "factored":
            u, v = rnd(out, 2), rnd(2, fan_in)
            sd.update({f"{n}.factor_u": u, f"{n}.factor_v": v})
            ref[key] = lambda w, u=u, v=v: matmul(u, v).reshape(w.shape) - w.double()
    return sd, ref


def _weights(mods):
    return {f"{c}.{k}": v.detach().clone() for c, m in mods.items() for k, v in m.state_dict().items()}


def test_lycoris_kohya_file_on_sd15_matches_hand_math(tmp_path):
    """LoHa (plain, Tucker, text encoder), LoKr, Tucker LoCon, DoRA (both axes), LoRA of another rank, sparse and
    factored layers in one file; most layers have no adapter at all."""
    _, mods = sd15()
    sd, ref = lycoris_file(mods)
    path = save_state_dict(sd, tmp_path / "lyco.safetensors")
    before = _weights(mods)
    handle, report = apply_lora(mods, path, strength=0.8)
    assert report.unmatched == [] and sorted(handle.applied) == sorted(MODULES)
    assert report.kinds == {"LoHa": 3, "LoKr": 1, "LoRA": 2, "DoRA": 2, "Sparse": 1, "Factored": 1}
    after = _weights(mods)
    for key in MODULES:
        w = before[f"{key}.weight"]
        expected = (w.double() + 0.8 * ref[key](w)).float()
        torch.testing.assert_close(after[f"{key}.weight"], expected, rtol=0, atol=2e-6, msg=key)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {f"{k}.weight" for k in MODULES}
    handle.unfuse()
    restored = _weights(mods)
    assert max(float((restored[k] - before[k]).abs().max()) for k in before) <= 1e-6
    for key, kind in MODULES.items():
        if kind.startswith("dora") or kind == "factored":
            assert torch.equal(restored[f"{key}.weight"], before[f"{key}.weight"]), key


def test_kohya_dora_scale_vs_diffusers_which_drops_it(tmp_path):
    """diffusers warns and loads a dora_scale file as a plain LoRA (notes section 4); we apply the decomposition."""
    pipe, mods = sd15()
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    n, down, up, m = kohya_name(key), rnd(2, 8), rnd(8, 2), rnd(8, 1).abs() + 0.5
    sd = {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(2.0),
          f"{n}.dora_scale": m}
    path = save_state_dict(sd, tmp_path / "dora.safetensors")
    w = mods["unet"].get_submodule(key.split(".", 1)[1]).weight.detach().clone()
    apply_lora(mods, path)
    ours = mods["unet"].get_submodule(key.split(".", 1)[1]).weight.detach()
    torch.testing.assert_close(ours, (w.double() + dora_ref(w, matmul(up, down), m, True)).float(), rtol=0, atol=2e-6)
    reference = factories.tiny_sd15_pipeline()
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    theirs = reference.unet.get_submodule(key.split(".", 1)[1]).weight.detach()
    torch.testing.assert_close(theirs, (w.double() + matmul(up, down)).float(), rtol=0, atol=2e-6)  # plain LoRA


def test_peft_dora_saved_by_diffusers_matches_peft_merge(tmp_path):
    """PEFT use_dora=True on the tiny UNet (Linear and Conv layers), magnitudes moved away from their init, saved
    with diffusers' save_lora_weights: ours equals PEFT's own merge."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    source, _ = sd15()
    config = LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False,
                        target_modules=["to_q", "to_v", "proj_in", "conv1", "time_emb_proj", "ff.net.2"])
    source.unet.add_adapter(config)
    g = torch.Generator().manual_seed(7)
    for module in source.unet.modules():
        if isinstance(module, BaseTunerLayer):
            mag = module.lora_magnitude_vector["default"].weight
            mag.data *= 0.5 + torch.rand(mag.shape, generator=g)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(source.unet),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    for module in source.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    reference = {k.replace(".base_layer", ""): v for k, v in source.unet.state_dict().items() if "lora_" not in k}
    _, mods = sd15()
    _, report = apply_lora(mods, tmp_path / "pytorch_lora_weights.safetensors")
    assert report.kinds == {"DoRA": sum(report.counts.values())} and report.counts["unet"] > 20
    ours = mods["unet"].state_dict()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) <= 1e-6


# ------------------------------------------------------------------------------------------------------ bad input
def _bad(mods, key):
    n, shape = kohya_name(key), mods["unet"].get_submodule(key.split(".", 1)[1]).weight.shape
    return n, shape


BAD = {  # name -> (edit of a valid LyCORIS file, error, pattern)
    "nan_in_loha": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("hada_w2_b")),
                                              torch.full_like(sd[next(k for k in sd if k.endswith("hada_w2_b"))],
                                                              float("nan"))),
                    WeightsFormatError, r"w2b tensor .* NaN or inf"),
    "lokr_shape": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("lokr_w1")), rnd(8, 3)),
                   AdapterMismatchError, r"ff\.net\.0\.proj.*LoKr.*\(64, 12\).*\(64, 8\)"),
    "sparse_range": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("sparse_indices")),
                                               torch.tensor([0, 9999, 1])),
                     AdapterMismatchError, r"Sparse.*outside"),
    "dora_size": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("dora_scale")), torch.ones(5, 1)),
                  AdapterMismatchError, r"DoRA magnitude \(5, 1\) fits neither axis"),
    "mixed_kinds": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("lokr_w1")).replace(
        "lokr_w1", "hada_w1_a"), rnd(2, 2)), WeightsFormatError, r"mixes loha and lokr"),
    "loha_half": (lambda sd: sd.pop(next(k for k in sd if k.endswith("hada_w2_a"))), WeightsFormatError,
                  r"no hada_w2_a"),
    "wd_for_diff": (lambda sd: sd.__setitem__(next(k for k in sd if k.endswith("dora_scale")).replace(
        "dora_scale", "wd_for_diff"), torch.tensor(True)), WeightsFormatError, r"wd_for_diff"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lycoris_input_leaves_the_model_identical(case):
    edit, error, pattern = BAD[case]
    _, mods = sd15()
    sd, _ = lycoris_file(mods)
    edit(sd)
    before = _weights(mods)
    with pytest.raises(error, match=pattern):
        apply_lora(mods, sd)
    after = _weights(mods)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_truncated_lycoris_file_names_it_and_leaves_the_model_identical(tmp_path):
    _, mods = sd15()
    sd, _ = lycoris_file(mods)
    path = save_state_dict(sd, tmp_path / "lyco.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    before = _weights(mods)
    with pytest.raises(WeightsFormatError, match=r"lyco\.safetensors.*truncated"):
        apply_lora(mods, path)
    assert all(torch.equal(v, _weights(mods)[k]) for k, v in before.items())


def test_unknown_layout_and_magnitude_alone():
    with pytest.raises(WeightsFormatError, match="unknown LoRA layout"):
        read_lora({"lora_unet_x.oft_blocks": torch.zeros(2, 2)})
    with pytest.raises(WeightsFormatError, match="DoRA magnitude but no LoRA"):
        read_lora({"lora_unet_conv_in.dora_scale": torch.ones(4, 1)})
