"""QuantLinear / QuantConv2d: atomic swapping, LoRA on a quantized base (branch and merge-then-requantize)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nimblediff.core.quant import (LowRank, QuantConv2d, QuantLinear, quantize_model, quantized_modules, replace,
                                   resolve_scheme)
from nimblediff.errors import AdapterMismatchError, InvalidParameterError

torch.set_num_threads(1)


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(1),
                               torch.nn.Linear(32 * 4 * 4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [id(x) for x in m.modules()]


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("scheme", ["int8", "int4_g32", "int4k_g32", "nf4", "bfp8"])
def test_quantized_model_matches_dequantized_float_model(scheme):
    m = net()
    x = torch.randn(3, 4, 4, 4)
    quantize_model(m, scheme)
    assert len(quantized_modules(m)) == 3
    ref = copy.deepcopy(m)
    for name, q in quantized_modules(m).items():  # an independent float model with the dequantized weights
        f = torch.nn.Conv2d(4, 32, 3, padding=1) if isinstance(q, QuantConv2d) else torch.nn.Linear(*q.shape[::-1])
        f.weight.data, f.bias.data = q.qweight.dequantize(), q.bias.data.clone()
        replace(ref, {name: f})
    assert rel(m(x), ref(x)) < 1e-2  # kernels run bf16 activations


def test_quantize_model_is_atomic():
    m = net()
    before, ids = snapshot(m)
    calls = []

    def fails_third(w):
        calls.append(w.shape)
        if len(calls) == 3:
            raise InvalidParameterError("boom")
        return resolve_scheme("int8")(w)

    with pytest.raises(InvalidParameterError, match="boom"):
        quantize_model(m, fails_third)
    after, ids2 = snapshot(m)
    assert ids == ids2 and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InvalidParameterError, match="per_layer"):
        quantize_model(m, "int8", per_layer={"nope": "int8"})
    assert [id(x) for x in m.modules()] == ids
    m[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidParameterError, match="non-finite"):
        quantize_model(m, "int8")
    assert [id(x) for x in m.modules()] == ids


def test_replace_checks_everything_first():
    m = net()
    ids = [id(x) for x in m.modules()]
    good = torch.nn.Linear(64, 16)
    with pytest.raises(InvalidParameterError, match="no module"):
        replace(m, {"5": good, "9": torch.nn.Linear(1, 1)})
    with pytest.raises(InvalidParameterError, match="shape"):
        replace(m, {"5": good, "3": torch.nn.Linear(5, 5)})
    assert [id(x) for x in m.modules()] == ids
    old = replace(m, {"5": good})
    assert m[5] is good and isinstance(old["5"], torch.nn.Linear)


def test_per_layer_schemes_and_keep_float():
    m = net()
    quantize_model(m, "int8", per_layer={"0": None, "5": "int4_g32"})
    assert type(m[0]) is torch.nn.Conv2d and m[3].qweight.kind == "int8" and m[5].qweight.kind == "int4"


def lora(out, fan_in, r=4, scale=0.8, seed=0, name="a"):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(r, *fan_in, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1, scale, name)


def test_lora_branch_on_linear_equals_lora_on_dequantized_weight():
    f = torch.nn.Linear(128, 64)
    q = QuantLinear(resolve_scheme("int4_g32")(f.weight), f.bias)
    d1, d2 = lora(64, (128,), seed=1), lora(64, (128,), seed=2, scale=-0.5, name="b")
    x = torch.randn(10, 128)
    q.set_lora([d1, d2])
    w_deq = q.qweight.dequantize() + d1.dense(q.shape) + d2.dense(q.shape)
    assert rel(q(x), F.linear(x, w_deq, f.bias)) < 1e-2  # the base matmul runs in bf16; the branch in fp32
    # against the float LoRA model: within the base layer's quantization error
    exact = F.linear(x, f.weight + d1.dense(q.shape) + d2.dense(q.shape), f.bias)
    base_err = rel(F.linear(x, q.qweight.dequantize(), f.bias), f(x))
    assert rel(q(x), exact) < 1.5 * base_err + 1e-2
    q.clear_lora()
    assert rel(q(x), F.linear(x, q.qweight.dequantize(), f.bias)) < 1e-2


def test_lora_branch_on_conv_equals_lora_on_dequantized_weight():
    f = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    q = QuantConv2d(resolve_scheme("int8")(f.weight), f.bias, stride=2, padding=1)
    d = lora(16, (8, 3, 3))
    q.set_lora([d])
    x = torch.randn(2, 8, 9, 9)
    ref = F.conv2d(x, q.qweight.dequantize() + d.dense(q.shape), f.bias, 2, 1)
    assert rel(q(x), ref) < 1e-5


def test_merge_then_requantize_is_cached_per_lora_set_and_strength():
    f = torch.nn.Linear(64, 32)
    q = QuantLinear(resolve_scheme("int4_g32")(f.weight), f.bias)
    d = lora(32, (64,))
    x = torch.randn(4, 64)
    q.set_lora([d], merge=True)
    merged = q.active_weight()
    want = resolve_scheme("int4_g32")(q.qweight.dequantize() + d.dense(q.shape))
    assert torch.equal(merged.dequantize(), want.dequantize())
    assert rel(q(x), F.linear(x, want.dequantize(), f.bias)) < 1e-2
    q.set_lora([LowRank(d.down, d.up, 0.3, d.name)], merge=True)  # new strength: new entry
    assert q.active_weight() is not merged
    q.set_lora([d], merge=True)  # back: cached
    assert q.active_weight() is merged
    assert "_merged" not in dict(q.named_modules()) and all("merged" not in k for k in q.state_dict())


def test_lora_that_does_not_fit_is_refused_and_leaves_the_layer_unchanged():
    q = QuantLinear(resolve_scheme("int8")(torch.randn(32, 64)))
    good = lora(32, (64,))
    q.set_lora([good])
    with pytest.raises(AdapterMismatchError, match="do not fit"):
        q.set_lora([lora(32, (65,))])
    bad = LowRank(good.down.clone(), good.up.clone() * float("nan"))
    with pytest.raises(AdapterMismatchError, match="non-finite"):
        q.set_lora([bad])
    assert q.lora == (good,)


def test_move_copy_and_dtype():
    m = net()
    quantize_model(m, "int4_g64")
    c = copy.deepcopy(m).to(torch.float64)
    x = torch.randn(2, 4, 4, 4)
    assert c(x.double()).dtype == torch.float64
    assert rel(c(x.double()).float(), m(x)) < 2e-2


def test_attach_loras_from_canonical_deltas_is_all_or_nothing():
    from nimblediff.core.adapters.delta import LoRA, LoHa
    from nimblediff.core.quant.lora import attach_loras, detach_loras

    m = net()
    quantize_model(m, "int8")
    g = torch.Generator().manual_seed(0)
    good = {"unet.3": LoRA(torch.randn(4, 512, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, alpha=2.0),
            "unet.0": LoRA(torch.randn(2, 4, 3, 3, generator=g) * 0.1, torch.randn(32, 2, generator=g) * 0.1)}
    x = torch.randn(2, 4, 4, 4)
    before = m(x)
    bad = dict(good, **{"unet.5": LoRA(torch.randn(4, 63), torch.randn(16, 4))})
    with pytest.raises(AdapterMismatchError):
        attach_loras(m, bad, prefix="unet.")
    assert torch.equal(m(x), before) and not m[3].lora and not m[0].lora  # nothing attached
    loha = {"unet.5": LoHa(*(torch.randn(16, 2), torch.randn(2, 64), torch.randn(16, 2), torch.randn(2, 64)))}
    with pytest.raises(AdapterMismatchError, match="LoHa"):
        attach_loras(m, loha, prefix="unet.")
    assert sorted(attach_loras(m, good, 0.5, prefix="unet.", name="style")) == ["0", "3"]
    assert m[3].lora[0].scale == pytest.approx(0.5 * 2.0 / 4)
    assert not torch.equal(m(x), before)
    assert detach_loras(m) == 2 and torch.equal(m(x), before)
