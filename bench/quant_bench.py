"""Weight quantization: NimbleDiff's schemes (round-to-nearest and calibrated) against GGUF (the `gguf` package's own
quantize / dequantize; Q4_K written by our block writer and read back by `gguf.quants.dequantize`, since gguf-py
cannot write K-quants) and optimum-quanto, in one process.

1. Layers with realistic statistics: SD1.5-shaped (attention 1280x1280, conv 320x320x3x3) and DiT-shaped
   (PixArt attention 1152x1152, MLP 1152x4608) weights with per-row scale spread and a few outlier input channels;
   inputs with log-normal channel scales, a few outlier channels and correlated features. Per scheme: bits per
   weight including scales, relative weight error, relative output error on held-out inputs. "cal" = calibrated on a
   separate input split (GPTQ on the round-to-nearest grid + per-row clip search, held-out acceptance).
2. CPU latency of x[64x1280] @ W[1280x1280]^T, paired rounds (bench/timing.py) against fp32 and bf16 F.linear, and
   the cost of one rank-16 LoRA branch on the int8 layer.
3. NimbleDiff-Tiny (weights/tiny, Flash LoRA fused, 4 steps): every Linear/Conv2d except conv_in/conv_out
   quantized. Bits per weight over those layers (float layers a scheme cannot hold count 16), the file size, the
   denoiser's output error on held-out prompts' trajectories across all 4 timesteps (teacher-forced: the float
   model's own inputs), the decoded image error after a 4-step generation from the same noise, and evaluator v2's
   shape and colour accuracy on --n-eval held-out scenes (tiny/evaluate.py), relative to the fp32 model.
   3b. The same for NimbleDiff-Tiny-DiT (weights/tiny/nimblediff-tiny-dit) when the folder is present.

Usage: python bench/quant_bench.py [--quick] [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Conditions, interleave, median, ratio, write_result  # noqa: E402

from nimblediff.core.quant import LowRank, QuantLinear, quantize_model, resolve_scheme  # noqa: E402
from nimblediff.core.quant.act import ActQuant  # noqa: E402
from nimblediff.core.quant.calibrate import calibrate_layer  # noqa: E402
from nimblediff.core.quant.gguf_weight import gguf_weight_from_float, stored_shape_for  # noqa: E402

LAYERS = {"sd15 attn 1280x1280": (1280, 1280), "sd15 conv 320x320x3x3": (320, 320, 3, 3),
          "dit attn 1152x1152": (1152, 1152), "dit mlp 1152x4608": (1152, 4608)}
OURS = ["int8", "int8_asym", "int4_g64", "int4k_g32", "int4s_g32", "nf4", "bfp8", "bfp4"]
CALIBRATED = ["int8", "int4_g64", "int4k_g32"]
# the tiny DiT's first and last layers stay float, as bench/quality.py's quantized DiT rows
DIT_KEEP_FLOAT = ("pos_embed.proj", "proj_out")


# ---- 1. layers ---------------------------------------------------------------------------------------------------
def realistic_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    out, k = shape[0], math.prod(shape[1:])
    row_scale = torch.exp(0.3 * torch.randn(out, 1, generator=g)) * 0.02
    w = torch.randn(out, k, generator=g) * row_scale
    w[:, torch.randperm(k, generator=g)[: max(2, k // 256)]] *= 8  # outlier input channels
    return w.reshape(shape)


def realistic_inputs(k, n, layer_seed, split_seed):
    """Rows of one layer's input distribution (fixed by layer_seed); split_seed draws the rows."""
    g = torch.Generator().manual_seed(layer_seed)
    scale = torch.exp(0.5 * torch.randn(k, generator=g))
    scale[torch.randperm(k, generator=g)[: max(2, k // 200)]] *= 20  # outlier activation channels
    mix = torch.randn(16, k, generator=g) / 4  # correlated component
    g = torch.Generator().manual_seed(split_seed)
    return (torch.randn(n, k, generator=g) + torch.randn(n, 16, generator=g) @ mix) * scale


def gguf_peer(w, qtype):
    """(dequantized weight, bits per weight) through gguf-py; Q4_K: our writer, gguf-py's reader."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    t = getattr(T, qtype)
    stored = stored_shape_for(tuple(w.shape), qtype)
    if stored is None:
        return None, None
    x = w.detach().float().reshape(stored).numpy()
    raw = quants.quantize(x, t) if qtype != "Q4_K" else gguf_weight_from_float(w, qtype).blocks.numpy()
    deq = torch.from_numpy(np.asarray(quants.dequantize(raw, t), dtype=np.float32)).reshape(w.shape)
    return deq, 8.0 * raw.nbytes / w.numel()


def quanto_peer(w, qtype_name):
    try:
        from optimum import quanto
    except ImportError:
        return None, None
    lin = torch.nn.Linear(w[0].numel(), w.shape[0], bias=False)
    lin.weight.data = w.detach().float().reshape(w.shape[0], -1).clone()
    m = torch.nn.Sequential(lin)
    quanto.quantize(m, weights=getattr(quanto, qtype_name))
    quanto.freeze(m)
    qw = m[0].weight
    bits = 0.0
    for name in qw.__tensor_flatten__()[0]:
        t = getattr(qw, name)
        bits += t.numel() * (4 if qtype_name == "qint4" and name == "_data" else 8 * t.element_size())
    return qw.dequantize().reshape(w.shape).float(), bits / w.numel()


def layer_rows(quick: bool):
    rows = []
    for li, (lname, shape) in enumerate(LAYERS.items()):
        if quick and li % 2:
            continue
        w = realistic_weight(shape, li)
        k = math.prod(shape[1:])
        x_cal, x_test = realistic_inputs(k, 8192, li, 100), realistic_inputs(k, 2048, li, 200)  # disjoint draws
        w2 = w.reshape(shape[0], -1)
        ref = x_test @ w2.T

        def add(name, deq, bpw):
            if deq is None:
                rows.append((lname, name, None, None, None))
                return
            d2 = deq.reshape(w2.shape)
            rows.append((lname, name, bpw, float((d2 - w2).norm() / w2.norm()),
                         float((x_test @ d2.T - ref).norm() / ref.norm())))

        for s in OURS:
            q = resolve_scheme(s)(w)
            add(s, q.dequantize(), q.bits_per_weight)
        for s in CALIBRATED:
            q, _ = calibrate_layer(w, s, x_cal, gram=x_cal.T @ x_cal)
            add(f"{s} cal", q.dequantize(), q.bits_per_weight)
        for t in ("Q8_0", "Q4_0", "Q4_K"):
            add(f"GGUF {t}", *gguf_peer(w, t))
        for t in ("qint8", "qint4"):
            add(f"quanto {t}", *quanto_peer(w, t))
        print(f"  layer {lname} done", file=sys.stderr)
    return rows


# ---- 2. latency --------------------------------------------------------------------------------------------------
def latency(rounds: int):
    torch.manual_seed(0)
    w, b = realistic_weight((1280, 1280), 0), torch.zeros(1280)
    x = torch.randn(64, 1280)
    xb, wb = x.bfloat16(), w.bfloat16()
    int8 = QuantLinear(resolve_scheme("int8")(w), b)
    int8_aten = QuantLinear(resolve_scheme("int8")(w), b)
    int8_aten.qweight.kernel = "aten"
    int8_deq = QuantLinear(resolve_scheme("int8")(w), b)
    int8_deq.qweight.fast = False
    w8a8 = QuantLinear(resolve_scheme("int8")(w), b)
    w8a8.act_quant = ActQuant()
    int4 = QuantLinear(resolve_scheme("int4k_g32")(w), b)
    int4_deq = QuantLinear(resolve_scheme("int4k_g32")(w), b)
    int4_deq.qweight.fast = False
    lora = QuantLinear(resolve_scheme("int8")(w), b)
    g = torch.Generator().manual_seed(1)
    lora.set_lora([LowRank(torch.randn(16, 1280, generator=g) * 0.01, torch.randn(1280, 16, generator=g) * 0.01)])
    arms = {"fp32": lambda: F.linear(x, w, b), "bf16": lambda: F.linear(xb, wb, b.bfloat16()),
            "int8 (bf16 matmul of int8 codes)": lambda: int8(x), "int8 aten _weight_int8pack_mm": lambda: int8_aten(x),
            "int8 dequantize per call": lambda: int8_deq(x),
            "int8 W8A8 (_int_mm)": lambda: w8a8(x), "int4k_g32 (aten int4 kernel)": lambda: int4(x),
            "int4k_g32 dequantize per call": lambda: int4_deq(x), "int8 + rank-16 LoRA branch": lambda: lora(x),
            "int8, bf16 activations in and out": lambda: int8(xb)}
    try:  # the issue's peer figure is torchao's int8 weight-only with bf16 activations (pip install torchao)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        m = torch.nn.Sequential(torch.nn.Linear(1280, 1280))
        m[0].weight.data, m[0].bias.data = w.clone(), b.clone()
        m = m.to(torch.bfloat16)
        quantize_(m, Int8WeightOnlyConfig())
        arms[TORCHAO] = (lambda m=m: m(xb))
    except ImportError:
        pass
    try:
        from optimum import quanto

        for qn in ("qint8", "qint4"):
            m = torch.nn.Sequential(torch.nn.Linear(1280, 1280))
            m[0].weight.data, m[0].bias.data = w.clone(), b.clone()
            quanto.quantize(m, weights=getattr(quanto, qn))
            quanto.freeze(m)
            arms[f"quanto {qn}"] = (lambda m=m: m(x))
    except ImportError:
        pass
    reps = 20

    def timed(fn):
        def run():
            with torch.no_grad():
                for _ in range(reps):
                    fn()
        return run

    samples = interleave({k: timed(f) for k, f in arms.items()}, rounds)
    out = []
    for k in arms:
        us = median(samples, k) / reps * 1e6
        out.append((k, us, ratio(samples, k, "fp32"), ratio(samples, k, "bf16"),
                    ratio(samples, k, "int8 (bf16 matmul of int8 codes)") if k.startswith("int8 +") else None,
                    ratio(samples, k, TORCHAO) if TORCHAO in arms and k.startswith("int8") else None))
    return out


TORCHAO = "torchao int8 weight-only (bf16 activations in and out)"


# ---- 3. NimbleDiff-Tiny ------------------------------------------------------------------------------------------
def attribute_accuracy(p, held_eval, net):
    """Evaluator v2 shape and colour accuracy of 4-step images for held-out scenes (their fixed noise seeds)."""
    from nimblediff.tiny import evaluate

    gens = [torch.Generator().manual_seed(int(s)) for s in held_eval.noise_seeds]
    imgs = p(held_eval.captions, num_inference_steps=4, generator=gens, output_type="np").images
    r = evaluate.evaluate_v2((imgs * 255).round().clip(0, 255).astype(np.uint8), held_eval.scenes, net)
    return r["accuracy"]["shape"], r["accuracy"]["colour"]


def tiny_rows(quick: bool, n_eval: int):
    from nimblediff import TINY_FLASH_LORA, TINY_MODEL
    from nimblediff.cli import DEMO_PROMPTS
    from nimblediff.pipelines import FewStepPipeline
    from nimblediff.pipelines.quantized import KEEP_FLOAT, quantize_denoiser
    from nimblediff.tiny.heldout import heldout_scenes
    from nimblediff.weights.quant_format import save_quantized

    pipe = FewStepPipeline.from_pretrained(TINY_MODEL, dtype=torch.float32)
    pipe.load_acceleration_lora(TINY_FLASH_LORA, recipe="nimblediff-tiny-flash")
    pipe.set_progress_bar_config(disable=True)
    float_unet = pipe.unet
    held = heldout_scenes(4 if quick else 8).captions
    from nimblediff.tiny import evaluate

    held_eval = heldout_scenes(n_eval)  # the same scenes with their fixed seeds for every arm
    net = evaluate.load_evaluator()
    calib = DEMO_PROMPTS[: 2 if quick else 4]

    def generate(p):
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(held))]
        return p(held, num_inference_steps=4, generator=gens, output_type="pt").images  # (B, 3, H, W) in [0, 1]

    inputs = []
    hook = float_unet.register_forward_pre_hook(
        lambda m, a, kw: inputs.append((a[0].clone(), a[1], kw["encoder_hidden_states"].clone())), with_kwargs=True)
    ref_images = generate(pipe)
    hook.remove()
    with torch.no_grad():
        ref_out = [float_unet(x, t, encoder_hidden_states=c).sample for x, t, c in inputs]
    eligible = {n: m for n, m in float_unet.named_modules()
                if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not any(k in n for k in KEEP_FLOAT)}
    n_weights = sum(m.weight.numel() for m in eligible.values())

    rows = []
    tmp = Path(tempfile.mkdtemp())
    for label, spec in _arms(quick):
        t0 = time.time()
        p = copy.copy(pipe)
        unet = copy.deepcopy(float_unet)
        p.register_modules(unet=unet)
        if spec is None:
            bits = 32.0
        elif isinstance(spec, str) and spec.startswith("Q"):
            quantize_model(unet, "int8", per_layer=_gguf_per_layer(eligible, spec), exclude=KEEP_FLOAT)
            bits = _bits(unet, eligible, n_weights)
        else:
            scheme, cal = (spec, False) if isinstance(spec, str) else spec
            quantize_denoiser(p, scheme, prompts=calib, steps=4, calibrate=cal, rows_per_call=64)
            bits = _bits(unet, eligible, n_weights)
        size = None
        if spec is not None:
            size = save_quantized(unet, tmp / f"{len(rows)}.safetensors").stat().st_size / 1e6
        with torch.no_grad():
            num = sum(float((unet(x, t, encoder_hidden_states=c).sample - r).pow(2).sum())
                      for (x, t, c), r in zip(inputs, ref_out))
        den = sum(float(r.pow(2).sum()) for r in ref_out)
        rows.append(_error_row(label, bits, size, num / den, generate(p), ref_images,
                               *attribute_accuracy(p, held_eval, net)))
        print(f"  tiny {label} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    return rows, len(held), len(calib)


def dit_rows(quick: bool, n_eval: int):
    """Section 3b: NimbleDiff-Tiny-DiT (weights/tiny/nimblediff-tiny-dit), the stock StableDiffusion3Pipeline without
    T5 (max_sequence_length 24), flow Euler on 4 uniform sigmas at its CFG; the same measurements as tiny_rows.
    Calibration prompts come from the calibration split, never the held-out prompts. None when the folder is absent."""
    from diffusers import StableDiffusion3Pipeline

    from nimblediff import TINY_DIT
    from nimblediff.pipelines.quantized import KEEP_FLOAT, quantize_denoiser
    from nimblediff.tiny import dit, evaluate
    from nimblediff.tiny.heldout import calibration_scenes, heldout_scenes
    from nimblediff.weights.quant_format import save_quantized

    if not Path(TINY_DIT).is_dir():
        return None
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_DIT, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    float_tr = pipe.transformer
    exclude = KEEP_FLOAT + DIT_KEEP_FLOAT
    kw = dict(sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=dit.CFG, max_sequence_length=24, height=64, width=64)
    held = heldout_scenes(4 if quick else 8).captions
    held_eval = heldout_scenes(n_eval)
    net = evaluate.load_evaluator()
    calib = calibration_scenes(2 if quick else 4)

    def generate(p, caps, seeds, output_type="pt"):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return p(caps, generator=gens, output_type=output_type, **kw).images

    inputs = []
    hook = float_tr.register_forward_pre_hook(
        lambda m, a, k: inputs.append({n: (v.clone() if torch.is_tensor(v) else v) for n, v in k.items()}),
        with_kwargs=True)
    seeds = [1000 + i for i in range(len(held))]
    ref_images = generate(pipe, held, seeds)  # (B, 3, H, W) in [0, 1]
    hook.remove()
    with torch.no_grad():
        ref_out = [float_tr(**dict(k, return_dict=False))[0] for k in inputs]
    eligible = {n: m for n, m in float_tr.named_modules()
                if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not any(e in n for e in exclude)}
    n_weights = sum(m.weight.numel() for m in eligible.values())
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for label, spec in _arms(quick, skip=("nf4", "bfp8")):
        t0 = time.time()
        p = copy.copy(pipe)
        tr = copy.deepcopy(float_tr)
        p.register_modules(transformer=tr)
        if spec is None:
            bits = 32.0
        elif isinstance(spec, str) and spec.startswith("Q"):
            quantize_model(tr, "int8", per_layer=_gguf_per_layer(eligible, spec), exclude=exclude)
            bits = _bits(tr, eligible, n_weights)
        else:
            scheme, cal = (spec, False) if isinstance(spec, str) else spec
            quantize_denoiser(p, scheme, prompts=calib.captions, steps=None, guidance_scale=dit.CFG, calibrate=cal,
                              exclude=exclude, seed=int(calib.noise_seeds[0]), rows_per_call=64,
                              pipe_kwargs=dict(sigmas=kw["sigmas"], max_sequence_length=24, height=64, width=64))
            bits = _bits(tr, eligible, n_weights)
        size = None
        if spec is not None:
            size = save_quantized(tr, tmp / f"dit{len(rows)}.safetensors").stat().st_size / 1e6
        with torch.no_grad():
            num = sum(float((tr(**dict(k, return_dict=False))[0] - r).pow(2).sum()) for k, r in zip(inputs, ref_out))
        den = sum(float(r.pow(2).sum()) for r in ref_out)
        ev = generate(p, held_eval.captions, held_eval.noise_seeds, "np")
        r = evaluate.evaluate_v2((ev * 255).round().clip(0, 255).astype(np.uint8), held_eval.scenes, net)
        rows.append(_error_row(label, bits, size, num / den, generate(p, held, seeds), ref_images,
                               r["accuracy"]["shape"], r["accuracy"]["colour"]))
        print(f"  tiny DiT {label} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    return rows, len(held), len(calib.captions)


# the arms of sections 3 and 3b: (label, None = the float model | GGUF type "Q..." | scheme | (scheme, calibrate))
ARMS = [("fp32 (reference)", None), ("int8", "int8"), ("int8 cal", ("int8", True)),
        ("int4k_g32", "int4k_g32"), ("int4k_g32 cal", ("int4k_g32", True)), ("int4_g64 cal", ("int4_g64", True)),
        ("nf4", "nf4"), ("bfp8", "bfp8"), ("GGUF Q8_0", "Q8_0"), ("GGUF Q4_0", "Q4_0"), ("GGUF Q4_K", "Q4_K")]
QUICK_ARMS = ("fp32 (reference)", "int8", "int4k_g32", "int4k_g32 cal", "GGUF Q4_K")


def _arms(quick, skip=()):
    return [a for a in ARMS if a[0] not in skip and (not quick or a[0] in QUICK_ARMS)]


def _gguf_per_layer(eligible, qtype):
    """quantize_model's per_layer for a GGUF type: gguf's own round trip per layer, None (float) where its blocks do
    not fit the layer's shape."""
    return {n: (None if stored_shape_for(tuple(m.weight.shape), qtype) is None else
                (lambda w, q=qtype: gguf_weight_from_float(w, q))) for n, m in eligible.items()}


def _error_row(label, bits, size, denoiser_rel_sq, imgs, ref_images, shape_acc, colour_acc):
    """(label, bits, MB, relative denoiser error, relative image error, image PSNR, shape, colour): a table row."""
    mse = float((imgs - ref_images).pow(2).mean())
    return (label, bits, size, math.sqrt(denoiser_rel_sq), float((imgs - ref_images).norm() / ref_images.norm()),
            10 * math.log10(1 / max(mse, 1e-12)), shape_acc, colour_acc)


def _bits(unet, eligible, n_weights):
    mods = dict(unet.named_modules())
    total = 0.0
    for n, m in eligible.items():
        q = mods[n]
        total += q.qweight.nbytes * 8 if hasattr(q, "qweight") else 16 * m.weight.numel()
    return total / n_weights


# ---- report ------------------------------------------------------------------------------------------------------
def _tiny_table(rows):
    base = rows[0]
    return [f"| {label} | {bits:.2f} | {fmt(size, '.2f')} | {de:.4f} | {ie:.4f} | "
            f"{'inf' if psnr > 119 else format(psnr, '.1f')} | {sa:.3f} ({sa / base[6]:.1%}) | "
            f"{ca:.3f} ({ca / base[7]:.1%}) |" for label, bits, size, de, ie, psnr, sa, ca in rows]


def _vs_q4k(rows, name):
    q4k = {r[0]: r[3] for r in rows}.get("GGUF Q4_K")
    cal = [(r[0], r[3] / q4k) for r in rows if r[0].endswith(" cal") and "int4" in r[0]] if q4k else []
    return f"{name} " + ", ".join(f"{label} {x:.2f}x" for label, x in cal)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-eval", type=int, default=64, help="held-out scenes for the attribute evaluator")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cond = Conditions()
    lrows = layer_rows(args.quick)
    lat = latency(args.rounds if not args.quick else 6)
    trows, n_held, n_cal = tiny_rows(args.quick, args.n_eval)
    drows = dit_rows(args.quick, args.n_eval)
    cond.finish()

    out = ["## 1. Layers with realistic statistics (relative errors; output error on held-out inputs)", "",
           "| layer | scheme | bits/weight | weight error | output error | output error / GGUF Q4_K |",
           "|---|---|---|---|---|---|"]
    q4k = {r[0]: r[4] for r in lrows if r[1] == "GGUF Q4_K"}
    for lname, name, bpw, we, oe in lrows:
        rel = None if oe is None or q4k.get(lname) is None else oe / q4k[lname]
        out.append(f"| {lname} | {name} | {fmt(bpw, '.3f')} | {fmt(we, '.4f')} | {fmt(oe, '.4f')} | {fmt(rel, '.2f')} |")
    out += ["", "## 2. CPU latency, x[64x1280] @ W[1280x1280]^T (fp32 activations in and out unless named)", "",
            "| arm | median us | / fp32 [95% CI] | / bf16 [95% CI] | / int8 without LoRA | / torchao int8 [95% CI] |",
            "|---|---|---|---|---|---|"]
    for k, us, rf, rb, rl, rt in lat:
        out.append(f"| {k} | {us:.0f} | {rf} | {rb} | {'' if rl is None else rl} | {'' if rt is None else rt} |")
    if not any(k == TORCHAO for k, *_ in lat):
        out.append(f"\n(torchao is not installed here: no torchao row; `pip install torchao --no-deps` adds it)")
    out += ["", f"## 3. NimbleDiff-Tiny (Flash LoRA fused, 4 steps; {n_held} held-out prompts, calibration on "
            f"{n_cal} other prompts)", "",
            "| scheme | bits/weight (quantized layers) | file MB | denoiser output error (4 timesteps) | "
            f"image rel. error | image PSNR dB | shape acc. / fp32 ({args.n_eval} scenes) | colour acc. / fp32 |",
            "|---|---|---|---|---|---|---|---|"]
    out += _tiny_table(trows)
    if drows is not None:
        dr, d_held, d_cal = drows
        out += ["", f"## 3b. NimbleDiff-Tiny-DiT (flow Euler on 4 uniform sigmas, CFG 3, max_sequence_length 24; "
                f"{d_held} held-out prompts, calibration on {d_cal} calibration-split prompts; patch embedding and "
                "output projection float)", "",
                "| scheme | bits/weight (quantized layers) | file MB | denoiser output error (4 timesteps) | "
                f"image rel. error | image PSNR dB | shape acc. / fp32 ({args.n_eval} scenes) | colour acc. / fp32 |",
                "|---|---|---|---|---|---|---|---|"]
        out += _tiny_table(dr)
    out += ["", "Denoiser output error / GGUF Q4_K's (the goal: calibrated int4 at <= 4.5 bits per weight <= 0.8x): "
            + "; ".join(_vs_q4k(r, name) for r, name in ((trows, "tiny UNet"), (drows and drows[0], "tiny DiT"))
                        if r) + ".", "", str(cond)]
    text = "\n".join(out)
    print(text)
    write_result("quant_bench", __file__, text, argv, mode="quick" if args.quick else "")


if __name__ == "__main__":
    main()
