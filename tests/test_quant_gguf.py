"""GGML block math (core/quant/gguf_*.py) against the `gguf` package and ggml's reference algorithms.

References: gguf.quants.dequantize / quantize (numpy, the package llama.cpp ships), GGML_QUANT_SIZES, and a
loop-by-loop transcription of ggml-quants.c's K-quant writers (quantize_row_q4_K_ref / q5_K / q6_K with
make_qkx2_quants / make_qx_quants) run on single blocks. Fixture files quantized by llama.cpp itself are checked in
tests/test_quant_gguf_io.py.
"""

import math

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nimblediff.core.quant import gguf_dequant as G
from nimblediff.core.quant import gguf_quantize as Q
from nimblediff.core.quant.gguf_weight import GGUFWeight, gguf_weight_from_float
from nimblediff.core.quant.modules import LowRank, QuantConv2d, QuantLinear
from nimblediff.errors import WeightsFormatError

torch.set_num_threads(1)
QT = gguf.GGMLQuantizationType
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]


def _finite_blocks(qtype: str, n: int, rng) -> np.ndarray:
    """Random blocks whose fp16 scale fields are finite (random bytes elsewhere): every bit pattern of the packed
    values is exercised, and both sides must agree to the last bit."""
    block, size = G.BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    halves = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}.get(qtype, [])
    for at in halves:
        raw[:, at:at + 2] = (rng.standard_normal(n).astype(np.float16) * 0.01).view(np.uint8).reshape(n, 2)
    return raw


def _data(rows=32, cols=512, seed=0) -> np.ndarray:
    """Weights with per-row scales, a heavy tail and the awkward cases: an all-zero row, a constant row, a row
    with one outlier, exact halves (rounding ties)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 1.0, (rows, 1)).astype(np.float32)
    x[1] = 0.0
    x[2] = 0.25
    x[3, 7] = 40.0
    x[4] = np.round(x[4] * 8) / 8 + 1 / 16
    x[5, :256] = rng.standard_t(3, 256)
    return x


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------- dequantizers
def test_block_table_matches_gguf():
    for name, sizes in G.BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[QT[name]] == sizes
        assert G.GGML_TYPES[name] == int(QT[name])


@pytest.mark.parametrize("qtype", sorted(G.DEQUANTIZERS))
def test_dequantize_equals_gguf(qtype):
    rng = np.random.default_rng(int(QT[qtype]))
    raw = _finite_blocks(qtype, 96, rng)
    if qtype == "F32":
        raw = rng.standard_normal(96).astype(np.float32).view(np.uint8).reshape(96, 4)
    if qtype == "F16":
        raw = rng.standard_normal(96).astype(np.float16).view(np.uint8).reshape(96, 2)
    ref = gguf.quants.dequantize(raw.reshape(8, -1), QT[qtype]).reshape(-1)
    ours = G.dequantize_blocks(torch.from_numpy(raw), qtype).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_dequantize_shapes_and_errors():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x, QT.Q8_0))
    out = G.dequantize(raw, "Q8_0", (4, 64), torch.float16)
    assert out.shape == (4, 64) and out.dtype == torch.float16
    with pytest.raises(ValueError, match="Q8_0"):
        G.dequantize(raw[:, :-2], "Q8_0", (4, 64))
    assert G.ggml_type(QT.Q4_K) == G.ggml_type(12) == G.ggml_type("q4_k") == "Q4_K"


# ------------------------------------------------------------------------------------------------------ writers
@pytest.mark.parametrize("qtype", LEGACY + ["F16", "BF16"])
def test_legacy_writers_byte_equal_gguf(qtype):
    x = _data()
    ours = Q.quantize_rows(torch.from_numpy(x), qtype).numpy()
    ref = gguf.quants.quantize(x, QT[qtype])
    np.testing.assert_array_equal(ours, ref.view(np.uint8).reshape(ours.shape))


def test_bf16_writer_keeps_nan_quiet():
    x = np.array([[np.nan, np.inf, -np.inf, 1.0, 3.0000002, -0.0]], dtype=np.float32)
    ours = Q.quantize_rows(torch.from_numpy(x), "BF16").numpy()
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, QT.BF16).view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_writers_round_trip_through_gguf(qtype):
    """The bytes we write mean, to gguf's own dequantizer, what they mean to ours (layout), and the values are close
    to the input (the writer quantizes, it does not scramble)."""
    x = _data()
    raw = Q.quantize_rows(torch.from_numpy(x), qtype).numpy()
    assert raw.shape == (x.shape[0], x.shape[1] // 256 * G.BLOCK_SIZES[qtype][1])
    theirs = gguf.quants.dequantize(raw, QT[qtype])
    ours = G.dequantize(torch.from_numpy(raw), qtype, x.shape).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(theirs[1], 0)                      # an all-zero row stays exactly zero
    bound = {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.022}[qtype]      # ~ 2^-bits relative RMS on Gaussian rows
    ok = [r for r in range(x.shape[0]) if r != 1]
    assert _rel(theirs[ok], x[ok]) < bound


def test_error_levels_ordered_like_llama_cpp():
    """At equal or fewer bits the K-quants beat the legacy types gguf writes (llama.cpp's published ordering:
    Q4_0 > Q4_1 > Q4_K, Q5_0 > Q5_1 > Q5_K > Q6_K > Q8_0 in error)."""
    x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    err = {}
    for t in LEGACY:
        err[t] = _rel(gguf.quants.dequantize(gguf.quants.quantize(x, QT[t]), QT[t]), x)
    for t in KQUANTS:
        err[t] = _rel(gguf.quants.dequantize(Q.quantize_rows(torch.from_numpy(x), t).numpy(), QT[t]), x)
    assert err["Q4_0"] > err["Q4_1"] > err["Q4_K"]
    assert err["Q5_0"] > err["Q5_1"] > err["Q5_K"] > err["Q6_K"] > err["Q8_0"]
    # Gaussian data: 4.5 bpw K-quant within 10% of the per-group affine optimum's neighbourhood, not far off
    assert err["Q4_K"] < 0.95 * err["Q4_1"] and err["Q5_K"] < 0.98 * err["Q5_1"]


def test_writer_rejects_rows_not_multiple_of_block():
    with pytest.raises(ValueError, match="block size 256"):
        Q.quantize_rows(torch.zeros(2, 96), "Q4_K")


# --------------------------------------------- ggml reference K-quants, transcribed loop by loop (float32)
f32 = np.float32


def _nearest_int(v) -> int:
    return int(np.round(f32(v)))  # ggml's nearest_int: round half to even


def _fp16(v) -> float:
    return float(np.float16(f32(v)))


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = f32(x[0]), f32(x[0])
    sum_w, sum_x = f32(w[0]), f32(w[0] * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    mn = min(mn, f32(0))
    if mx == mn:
        return f32(0), f32(-mn), [0] * n
    iscale = f32(nmax / f32(mx - mn))
    scale = f32(1 / iscale)
    L = [max(0, min(nmax, _nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
    best = f32(0)
    for i in range(n):
        diff = f32(scale * L[i] + mn - x[i])
        best = f32(best + f32(w[i] * diff * diff))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax) / f32(mx - mn))
        La = [max(0, min(nmax, _nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
        sl = sl2 = sxl = f32(0)
        for i in range(n):
            sl, sl2, sxl = f32(sl + w[i] * La[i]), f32(sl2 + w[i] * La[i] * La[i]), f32(sxl + w[i] * La[i] * x[i])
        D = f32(sum_w * sl2 - sl * sl)
        if D > 0:
            ts, tm = f32((sum_w * sxl - sum_x * sl) / D), f32((sl2 * sum_x - sl * sxl) / D)
            if tm > 0:
                tm, ts = f32(0), f32(sxl / sl2)
            mad = f32(0)
            for i in range(n):
                diff = f32(ts * La[i] + tm - x[i])
                mad = f32(mad + w[i] * diff * diff)
            if mad < best:
                L, best, scale, mn = La, mad, ts, tm
    return scale, f32(-mn), L


def _ref_qk_affine(x, nmax, rmin, nstep):
    scales, mins, L = [], [], []
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        av = f32(math.sqrt(f32(np.sum(sub * sub, dtype=f32)) / 32))
        s, m, l = _make_qkx2(sub, av + np.abs(sub), nmax, rmin, 0.1, nstep)
        scales.append(s), mins.append(m), L.extend(l)
    max_scale, max_min = max(scales), max(mins)
    inv_s = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_m = f32(63 / max_min) if max_min > 0 else f32(0)
    ls = [min(63, _nearest_int(inv_s * s)) for s in scales]
    lm = [min(63, _nearest_int(inv_m * m)) for m in mins]
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    for j in range(8):
        dj = f32(d * ls[j])
        if dj == 0:
            continue
        dm = f32(dmin * lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, _nearest_int(f32(x[32 * j + i] + dm) / dj)))
    sc = [0] * 12
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    head = list(np.array([d, dmin], np.float16).view(np.uint8)) + sc
    return head, L


def _ref_q4_k(x):
    head, L = _ref_qk_affine(x, 15, -1.0, 20)
    q = []
    for j in range(0, 256, 64):
        q += [L[j + i] | (L[j + i + 32] << 4) for i in range(32)]
    return np.array(head + q, np.uint8)


def _ref_q5_k(x):
    head, L = _ref_qk_affine(x, 31, -0.5, 15)
    qh, ql = [0] * 32, []
    m1, m2 = 1, 2
    for n in range(0, 256, 64):
        for j in range(32):
            l1, l2 = L[n + j], L[n + j + 32]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1, m2 = m1 << 2, m2 << 2
    return np.array(head + qh + ql, np.uint8)


def _make_qx(x, nmax):
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = f32(abs(v)), f32(v)
    if amax < 1e-15:
        return f32(0), [0] * len(x)

    def fit(iscale):
        l = [max(-nmax, min(nmax - 1, _nearest_int(iscale * v))) for v in x]
        slx = sl2 = f32(0)
        for v, li in zip(x, l):
            w = f32(v * v)
            slx, sl2 = f32(slx + w * v * li), f32(sl2 + w * li * li)
        return l, slx, sl2

    l, slx, sl2 = fit(f32(-nmax / mx))
    scale = f32(slx / sl2) if sl2 else f32(0)
    best = f32(scale * slx)
    for step in range(-9, 10):
        if step == 0:
            continue
        la, slx, sl2 = fit(f32(-(nmax + f32(0.1) * step) / mx))
        if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
            l, scale = la, f32(slx / sl2)
            best = f32(scale * slx)
    return scale, [li + nmax for li in l]


def _ref_q6_k(x):
    scales, L = [], []
    for ib in range(16):
        s, l = _make_qx(x[16 * ib:16 * ib + 16], 32)
        scales.append(s), L.extend(l)
    max_scale = max(scales, key=abs)
    if abs(max_scale) < 1e-15:
        return np.zeros(210, np.uint8)
    iscale = f32(-128 / max_scale)
    d = _fp16(1 / iscale)
    sc = [min(127, _nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dj = f32(d * sc[j])
        if dj == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(x[16 * j + i] / dj))) + 32
    ql, qh = [0] * 128, [0] * 64
    for j in range(0, 256, 128):
        for i in range(32):
            a, b, c, e = L[j + i], L[j + i + 32], L[j + i + 64], L[j + i + 96]
            ql[j // 2 + i] = (a & 0xF) | ((c & 0xF) << 4)
            ql[j // 2 + i + 32] = (b & 0xF) | ((e & 0xF) << 4)
            qh[j // 4 + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return np.array(ql + qh + list(np.array(sc, np.int8).view(np.uint8)) + list(np.array([d], np.float16)
                                                                                      .view(np.uint8)), np.uint8)


@pytest.mark.parametrize("qtype,ref", [("Q4_K", _ref_q4_k), ("Q5_K", _ref_q5_k), ("Q6_K", _ref_q6_k)])
def test_kquant_writers_match_ggml_reference_transcription(qtype, ref):
    """Our vectorised writer against a scalar transcription of ggml's C on whole blocks. Sums run in another
    order, so an exact float tie can round the other way: allow a few differing bytes, and require the same error."""
    x = _data(6, 256, seed=3)
    ours = Q.quantize_rows(torch.from_numpy(x), qtype).numpy()
    theirs = np.stack([ref(row) for row in x])
    same = (ours == theirs).mean()
    assert same > 0.99, f"{qtype}: only {same:.3f} of the bytes agree"
    e_ours = _rel(gguf.quants.dequantize(ours, QT[qtype]), x)
    e_ref = _rel(gguf.quants.dequantize(theirs, QT[qtype]), x)
    assert abs(e_ours - e_ref) <= 0.02 * e_ref


# ------------------------------------------------------------------------------------------------- GGUFWeight
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K", "F16"])
def test_gguf_weight_interface(qtype):
    w = torch.from_numpy(_data(64, 256, seed=5)).reshape(64, 16, 4, 4)   # a conv kernel: last axis 4
    g = gguf_weight_from_float(w, qtype)
    assert g.shape == w.shape and g.kind == "gguf"
    block, size = G.BLOCK_SIZES[qtype]
    assert g.bits_per_weight == pytest.approx(8 * size / block)
    back = GGUFWeight.from_tensors(g.shape, g.config(), g.tensors())
    assert torch.equal(back.dequantize(), g.dequantize())
    raw = g.blocks.numpy()
    np.testing.assert_array_equal(g.dequantize().reshape(-1).numpy(),
                                  gguf.quants.dequantize(raw, QT[qtype]).reshape(-1))
    again = g.requantize(g.dequantize())
    assert again.qtype == qtype and again.shape == g.shape
    assert g.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_gguf_weight_rejects_truncated_blocks():
    g = gguf_weight_from_float(torch.randn(8, 256), "Q4_K")
    with pytest.raises(WeightsFormatError, match="expected 1152 bytes"):
        GGUFWeight((8, 256), "Q4_K", g.blocks.reshape(-1)[:-1])
    with pytest.raises(WeightsFormatError, match="IQ4_NL"):
        GGUFWeight((8, 256), "IQ4_NL", g.blocks)


def test_quant_layers_over_gguf_weights_and_lora():
    """QuantLinear / QuantConv2d over GGUF blocks compute F.linear / F.conv2d with the dequantized weight, and a
    LoRA branch equals the LoRA applied to the dequantized weight (no whole-model dequantization involved)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) / 16
    lin = QuantLinear(gguf_weight_from_float(w, "Q4_K"), torch.randn(32, generator=g))
    x = torch.randn(3, 256, generator=g)
    wq = lin.qweight.dequantize()
    torch.testing.assert_close(lin(x), F.linear(x, wq, lin.bias), rtol=1e-5, atol=1e-5)
    down, up = torch.randn(4, 256, generator=g) / 16, torch.randn(32, 4, generator=g) / 4
    lin.set_lora([LowRank(down, up, 0.7, "a")])
    torch.testing.assert_close(lin(x), F.linear(x, wq + 0.7 * up @ down, lin.bias), rtol=1e-5, atol=1e-5)
    k = torch.randn(16, 32, 3, 3, generator=g) / 8          # stored as rows of 256 (ComfyUI-GGUF's reshape)
    conv = QuantConv2d(gguf_weight_from_float(k, "Q4_K"), None, padding=1)
    xi = torch.randn(2, 32, 6, 6, generator=g)
    torch.testing.assert_close(conv(xi), F.conv2d(xi, conv.qweight.dequantize(), padding=1), rtol=1e-5, atol=1e-5)
