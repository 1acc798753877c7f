"""core/quant schemes against hand-worked cases and independent references (torch.ao per-channel quantization,
gguf-py's Q4_1 blocks, scipy's normal quantiles, the NF4 table published with QLoRA, aten's int4/int8 kernels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nimblediff.core.quant import (SCHEMES, WEIGHT_KINDS, nf4_codebook, quantize_bfp, quantize_int4, quantize_int8,
                                   quantize_nf4)
from nimblediff.core.quant.act import ActQuant
from nimblediff.core.quant.packing import pack4, pack6, unpack4, unpack6
from nimblediff.errors import InvalidParameterError, WeightsFormatError

torch.set_num_threads(1)


def outlier_weight(out=64, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[:4]] *= 25  # a few outlier input channels, as in attention projections
    return w


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- hand-worked cases --------------------------------------------------------------------------------------------

def test_int8_symmetric_hand_case():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    q = quantize_int8(w)
    # scale = 1/127; codes round(127 w) = 127, -63.5 -> -64 (half to even), 31.75 -> 32, 0
    assert q.q.tolist() == [[127, -64, 32, 0]]
    assert torch.allclose(q.dequantize(), torch.tensor([[127, -64, 32, 0]]) / 127)
    assert q.bits_per_weight == pytest.approx(8 + 32 / 4)


def test_int4_affine_hand_case():
    # 32 values on the 16-level grid of [-1.5, 6.0]: step 0.5 -> reconstructed exactly
    row = torch.tensor([-1.5 + 0.5 * (i % 16) for i in range(32)])
    q = quantize_int4(row[None], group=32)
    assert torch.equal(q.dequantize(), row[None])
    assert q.bits_per_weight == pytest.approx(4 + 32 / 32)
    assert unpack4(q.packed)[0, :4].tolist() == [0, 1, 2, 3]


def test_int4_symmetric_hand_case():
    row = torch.zeros(32)
    row[0], row[1], row[2] = 7.0, -3.5, 1.2  # absmax 7 -> step 1: codes 7, -3.5 -> -4 (half to even), 1
    q = quantize_int4(row[None], group=32, symmetric=True)
    want = torch.zeros(32)
    want[0], want[1], want[2] = 7, -4, 1
    assert torch.equal(q.dequantize()[0], want)


def test_bfp_hand_case():
    # m = 8: qmax 127, block absmax 1 -> shared exponent e = ceil(log2(1/127)) + 6 = 0, step 2^(e-6) = 1/64
    w = torch.tensor([[1.0, 0.3, -0.2, 0.01]])
    q = quantize_bfp(w, mantissa=8, block=4, permute=False)
    assert q.exp.tolist() == [[0]]
    assert torch.equal(q.dequantize(), torch.tensor([[64.0, 19.0, -13.0, 1.0]]) / 64)


def test_nf4_hand_case():
    cb = nf4_codebook()
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 2] = 2.0, -2.0, 0.7 * 2.0  # absmax 2: 0.7 is nearest to 0.7230 (code 14)
    q = quantize_nf4(w, block=64)
    d = q.dequantize()[0]
    assert d[0] == 2.0 and d[1] == -2.0 and d[2] == pytest.approx(2 * float(cb[14]), rel=1e-3) and d[3] == 0


# ---- independent references --------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_matches_torch_per_channel_quantization(symmetric):
    w = outlier_weight()
    q = quantize_int8(w, symmetric=symmetric)
    zp = torch.zeros(w.shape[0], dtype=torch.long) if symmetric else q.zero.long()
    ref = torch.quantize_per_channel(w, q.scale.double(), zp, 0, torch.qint8).dequantize()
    assert torch.allclose(q.dequantize(), ref, atol=1e-7)


def test_int4_g32_matches_gguf_q4_1():
    """Q4_1 is group-32 affine 4-bit (d = (max - min)/15, m = min), the same grid as int4_g32."""
    from gguf import GGMLQuantizationType, quants

    w = outlier_weight(16, 256)
    ref = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1),
                                             GGMLQuantizationType.Q4_1)).reshape(w.shape)
    ours = quantize_int4(w, group=32).dequantize()
    # ggml rounds with the fp32 step and stores fp16; we round with the stored fp16 step: codes may differ at ties
    assert (ours - ref).abs().max() <= (w.amax() - w.amin()) / 15 * 1.01
    assert rel(ours, w) == pytest.approx(rel(ref, w), rel=0.05)
    assert float((ours != ref).float().mean()) < 0.02 or torch.allclose(ours, ref, atol=2e-3)


def test_nf4_codebook_from_normal_quantiles_and_qlora_table():
    from scipy.stats import norm

    off = 0.9677083
    pos = norm.ppf(np.linspace(off, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(off, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v = v / np.abs(v).max()
    assert np.allclose(nf4_codebook().numpy(), v, atol=1e-6)
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
             1.0]  # QLoRA / bitsandbytes NF4 table
    assert np.allclose(nf4_codebook().numpy(), qlora, atol=1e-6)


def test_nf4_picks_nearest_codebook_entry():
    w = outlier_weight(8, 128)
    q = quantize_nf4(w, block=64)
    g = w.reshape(8, 2, 64)
    absmax = g.abs().amax(-1, keepdim=True).half().float()
    nearest = nf4_codebook()[(g / absmax)[..., None].sub(nf4_codebook()).abs().argmin(-1)] * absmax
    assert torch.allclose(q.dequantize(), nearest.reshape(w.shape), atol=1e-6)


def test_bfp_outlier_permutation_helps_and_is_folded_back():
    """4 outlier columns in 4 different blocks flush 4 x 15 small columns to zero; sorted, they share one block."""
    w = outlier_weight(64, 512)
    plain = quantize_bfp(w, mantissa=4, block=16, permute=False)
    perm = quantize_bfp(w, mantissa=4, block=16)
    assert rel(perm.dequantize(), w) < rel(plain.dequantize(), w)

    def ruined(q):  # columns whose own relative error is > 50% (in the original column order)
        return int(((q.dequantize() - w).norm(dim=0) / w.norm(dim=0) > 0.5).sum())

    assert ruined(perm) <= 16 - 4 and ruined(plain) >= 3 * 12


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_round_trips_its_tensors_and_requantizes(name):
    w = torch.randn(48, 8, 3, 3) * 0.05
    q = SCHEMES[name](w)
    assert q.shape == w.shape and rel(q.dequantize(), w) < 0.3
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())
    again = WEIGHT_KINDS[q.kind].from_tensors(q.shape, q.config(), q.tensors())
    assert torch.equal(again.dequantize(), q.dequantize())
    assert torch.equal(q.requantize(w).dequantize(), q.dequantize())


def test_bits_per_weight_include_scales():
    w = torch.randn(1280, 1280)
    assert SCHEMES["int8"](w).bits_per_weight == pytest.approx(8 + 32 / 1280)
    assert SCHEMES["int4_g64"](w).bits_per_weight == pytest.approx(4 + 32 / 64)
    assert SCHEMES["int4k_g32"](w).bits_per_weight == pytest.approx(4 + 12 / 32 + 32 / 1280)
    assert SCHEMES["nf4"](w).bits_per_weight == pytest.approx(4 + 16 / 64)
    assert SCHEMES["bfp8"](w).bits_per_weight == pytest.approx(8 + 8 / 32 + 16 / 1280)


def test_packing_round_trips():
    c = torch.randint(0, 16, (3, 10))
    assert torch.equal(unpack4(pack4(c)).long(), c)
    c6 = torch.randint(0, 64, (3, 7))
    assert torch.equal(unpack6(pack6(c6), 7).long(), c6)


# ---- kernels against F.linear on the dequantized weight -----------------------------------------------------------

@pytest.mark.parametrize("k", [24, 256])  # aten's kernel crashes for K % 16 != 0: those layers must dequantize
def test_int8_kernel_matches_dequantized_linear(k):
    q = quantize_int8(outlier_weight(64, k))
    x = torch.randn(5, 3, k)
    ref = F.linear(x, q.dequantize())
    assert rel(q.linear(x), ref) < 1e-2  # bf16 activations inside the kernel


@pytest.mark.parametrize("kernel", ["bf16", "aten", "dequant"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernels_fold_the_bias(kernel, symmetric, dtype):
    """Every int8 path with a bias (folded into the output pass) equals F.linear(x, W, b) on the dequantized weight,
    in the activations' dtype (bf16 in, bf16 out; fp32 in, fp32 out)."""
    q = quantize_int8(outlier_weight(64, 256), symmetric=symmetric)
    q.kernel = kernel
    x, b = torch.randn(5, 256).to(dtype), torch.randn(64) * 3
    ref = F.linear(x.float(), q.dequantize(), b)
    y = q.linear(x, b)
    assert y.dtype == dtype and y.shape == ref.shape
    assert rel(y.float(), ref) < 1e-2
    assert rel(q.linear(x).float(), ref - b) < 1e-2


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_matches_dequantized_linear(symmetric):
    q = quantize_int4(outlier_weight(64, 256), group=64, symmetric=symmetric)
    x = torch.randn(7, 256)
    assert q._fast_ok(x)
    assert rel(q.linear(x), F.linear(x, q.dequantize())) < 1e-2


def test_w8a8_integer_path_matches_hand_quantized_activations():
    q = quantize_int8(outlier_weight(32, 64))
    x = torch.randn(6, 64)
    s = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    ref = F.linear(xq, q.dequantize())
    assert rel(ActQuant().linear(x, q), ref) < 1e-5


def test_split_activation_quantizer_uses_one_scale_per_segment():
    x = torch.cat([torch.randn(2, 4, 3, 3), 100 * torch.randn(2, 4, 3, 3)], 1)  # (B, C, H, W), skip half is large
    a = ActQuant(torch.tensor([x[:, :4].abs().max() / 127, x[:, 4:].abs().max() / 127]), (4,), channel_dim=1)
    one = ActQuant(torch.tensor([x.abs().max() / 127]), (), channel_dim=1)
    assert rel(a(x)[:, :4], x[:, :4]) < 0.1 * rel(one(x)[:, :4], x[:, :4])


def test_bad_parameters_and_tensors_are_named():
    with pytest.raises(InvalidParameterError, match="group"):
        quantize_int4(torch.randn(4, 64), group=48)
    q = quantize_int4(torch.randn(4, 64), group=32)
    t = q.tensors()
    t["scale"] = t["scale"][:, :1]
    with pytest.raises(WeightsFormatError, match="scale"):
        WEIGHT_KINDS["int4"].from_tensors(q.shape, q.config(), t)
