"""Calibration (Q-Diffusion), HAWQ-V2 traces and the bit allocator, against round-to-nearest, exact Hessians and
brute force."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from nimblediff.core.quant import quantize_model
from nimblediff.core.quant.calibrate import (allocate, calibrate_layer, calibrate_model, collect, hutchinson_traces,
                                             output_error)
from nimblediff.core.quant.modules import eligible_layers
from nimblediff.errors import InvalidParameterError

torch.set_num_threads(1)
TINY_UNET = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "nimblediff-tiny" / "unet"


def ddim_trajectory(unet, seed, steps=(999, 749, 499, 249), record=None):
    """A 4-step DDIM run of an eps-prediction UNet (SD schedule) from seeded noise and a seeded random context."""
    g = torch.Generator().manual_seed(seed)
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 6, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for i, t in enumerate(steps):
            if record is not None:
                record.append((x.clone(), t, ctx))
            eps = unet(x, t, encoder_hidden_states=ctx).sample
            a = ab[t]
            a_next = ab[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(TINY_UNET)).eval()


def denoiser_error(quant, ref, inputs):
    """Relative error of the quantized denoiser's output on the float model's own trajectory, all timesteps."""
    num = den = 0.0
    with torch.no_grad():
        for x, t, ctx in inputs:
            r = ref(x, t, encoder_hidden_states=ctx).sample
            num += float((quant(x, t, encoder_hidden_states=ctx).sample - r).pow(2).sum())
            den += float(r.pow(2).sum())
    return math.sqrt(num / den)


def test_calibration_lowers_output_error_against_round_to_nearest(tiny_unet):
    held_out = []
    ddim_trajectory(tiny_unet, seed=100, record=held_out)
    rtn, cal = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    quantize_model(rtn, "int4_g32", exclude=("conv_in", "conv_out"))
    report = calibrate_model(cal, "int4_g32", lambda: [ddim_trajectory(cal, seed=s) for s in (1, 2)],
                             exclude=("conv_in", "conv_out"), rows_per_call=64, clip_grid=(1.0,))  # GPTQ only
    assert report["_timesteps"] == [999, 749, 499, 249] * 2  # every step of both calibration runs was seen
    bits = {n: m.qweight.nbytes for n, m in rtn.named_modules() if hasattr(m, "qweight")}
    assert bits == {n: m.qweight.nbytes for n, m in cal.named_modules() if hasattr(m, "qweight")}  # same bits
    e_rtn, e_cal = denoiser_error(rtn, tiny_unet, held_out), denoiser_error(cal, tiny_unet, held_out)
    assert e_cal < 0.9 * e_rtn, (e_cal, e_rtn)


def test_calibration_without_model_calls_is_refused_and_changes_nothing(tiny_unet):
    m = copy.deepcopy(tiny_unet)
    ids = [id(x) for x in m.modules()]
    with pytest.raises(InvalidParameterError, match="never called the model"):
        calibrate_model(m, "int8", lambda: None)
    assert [id(x) for x in m.modules()] == ids


def test_pipeline_calibration_needs_prompts():
    from nimblediff.pipelines.quantized import _sampler

    with pytest.raises(InvalidParameterError, match="at least one prompt"):
        _sampler(object(), [], 4, 1.0, 0)


def test_skip_splits_are_the_channels_of_h_in_cat_h_skip(tiny_unet):
    from nimblediff.pipelines.quantized import skip_splits

    splits = skip_splits(tiny_unet)
    seen = {}

    def record(i):
        def hook(mod, args, kwargs):
            seen.setdefault(i, (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape[1])
        return hook

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(tiny_unet.up_blocks)]
    try:
        ddim_trajectory(tiny_unet, seed=0, steps=(999,))
    finally:
        for h in hooks:
            h.remove()
    for i, channels in seen.items():  # the first resnet of each up block gets cat([h, skip]) with h from below
        assert splits[f"up_blocks.{i}.resnets.0.conv1"] == channels


def test_gptq_and_adaround_lower_the_layer_output_error_on_correlated_inputs():
    from nimblediff.core.quant import resolve_scheme
    from nimblediff.core.quant.calibrate import adaround

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g) * 0.05
    mix = torch.randn(128, 128, generator=g) / 128 ** 0.5 + torch.eye(128)  # correlated input features

    def inputs(n):
        return (torch.randn(n, 128, generator=g) * torch.linspace(0.1, 3, 128)) @ mix

    x, fresh = inputs(800), inputs(400)
    rtn = resolve_scheme("int4_g32")(w)
    qw, info = calibrate_layer(w, "int4_g32", x, gram=x.T @ x)
    assert info["calibrated"] < 0.8 * info["rtn"]
    assert output_error(w, qw.dequantize(), fresh).sum() < 0.8 * output_error(w, rtn.dequantize(), fresh).sum()
    ada = adaround(w, rtn, x, iters=100)
    assert output_error(w, ada.dequantize(), x).sum() < output_error(w, rtn.dequantize(), x).sum()


def test_hutchinson_trace_matches_the_exact_hessian_trace():
    """loss = mean ||W x - y||^2 over a batch: d2/dW2 = (2/B) I_out (x) X^T X, so Tr = 2 out ||X||_F^2 / B."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(6, 3, bias=False)
    X, Y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
    traces = hutchinson_traces(lambda: (lin(X) - Y).pow(2).sum(1).mean(), {"w": lin.weight}, probes=400)
    exact = 2 * 3 * float(X.pow(2).sum()) / 5
    assert traces["w"] == pytest.approx(exact, rel=0.1)


def test_allocators_against_brute_force():
    g = torch.Generator().manual_seed(3)
    options = {}
    for i in range(5):
        n = int(torch.randint(50, 500, (1,), generator=g))
        om = float(torch.rand(1, generator=g)) * 10
        options[f"l{i}"] = [("int4", 4.5 * n, om), ("int8", 8.0 * n, om / 20), (None, 16.0 * n, 0.0)]
    total = sum(o[0][1] for o in options.values()) / 4.5
    for bpw in (4.5, 5.5, 7.0, 10.0):
        budget = bpw * total
        best = min((sum(options[n][j][2] for n, j in zip(options, js)), js)
                   for js in itertools.product(range(3), repeat=5)
                   if sum(options[n][j][1] for n, j in zip(options, js)) <= budget)
        for method in ("ip", "greedy"):
            pick = allocate(options, budget, method=method, resolution=20000)
            idx = {n: [o[0] for o in options[n]].index(pick[n]) for n in options}
            bits = sum(options[n][idx[n]][1] for n in options)
            omega = sum(options[n][idx[n]][2] for n in options)
            assert bits <= budget + 1e-6
            if method == "ip":
                assert omega == pytest.approx(best[0], abs=1e-9)
            else:
                assert omega >= best[0] - 1e-9
    with pytest.raises(InvalidParameterError, match="below the smallest"):
        allocate(options, 0.5 * total)


def test_collect_samples_every_call_of_every_layer(tiny_unet):
    layers = eligible_layers(tiny_unet)
    acts = collect(tiny_unet, lambda: ddim_trajectory(tiny_unet, seed=0), layers, rows_per_call=8)
    assert acts.timesteps == [999, 749, 499, 249]
    name = "down_blocks.0.resnets.0.conv1"
    assert len(acts.rows[name]) == 4 and acts.matrix(name).shape == (32, layers[name].weight[0].numel())


def test_mixed_precision_plan_meets_the_budget_on_a_pipeline():
    from nimblediff.pipelines.quantized import KEEP_FLOAT, mixed_precision_plan, quantize_denoiser
    from tests.factories import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    layers = eligible_layers(pipe.unet, exclude=KEEP_FLOAT)
    n = sum(m.weight.numel() for m in layers.values())
    plan = mixed_precision_plan(pipe, ["int4_g32", "int8", None], 9.0, prompts=["a", "b"], steps=2, probes=2)
    assert set(plan) == set(layers)
    from nimblediff.core.quant import resolve_scheme

    bits = sum(16 * m.weight.numel() if plan[k] is None else 8 * resolve_scheme(plan[k])(m.weight).nbytes
               for k, m in layers.items())
    assert bits <= 9.0 * n
    assert len(set(plan.values())) > 1  # the budget forces a real mix
    quantize_denoiser(pipe, "int8", prompts=["a"], steps=2, per_layer=plan)
    kept = [k for k, s in plan.items() if s is None]
    assert all(type(pipe.unet.get_submodule(k)) in (torch.nn.Linear, torch.nn.Conv2d) for k in kept)


def test_dit_calibration_follows_the_sampler_it_is_given():
    """pipe_kwargs reach every calibration call: an SD3 pipeline sampled on sigmas (1, 0.5) calls its transformer
    at 1000 x the shifted sigmas (SD3's shift s: s sigma / (1 + (s - 1) sigma)), once per prompt each."""
    from nimblediff.pipelines.quantized import quantize_denoiser
    from tests.factories import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    report = quantize_denoiser(pipe, "int8", prompts=["a", "b"], steps=None, guidance_scale=1.0,
                               pipe_kwargs={"sigmas": [1.0, 0.5], "max_sequence_length": 8, "height": 32,
                                            "width": 32})
    shift = pipe.scheduler.config.shift
    t = [1000 * shift * s / (1 + (shift - 1) * s) for s in (1.0, 0.5)]
    assert report["_timesteps"] == pytest.approx(t + t)
    assert all(hasattr(m, "qweight") for n, m in pipe.transformer.named_modules()
               if n.endswith("attn.to_q"))


def test_group_clip_is_the_per_group_argmin_of_the_importance_weighted_error():
    """_group_clip against a loop over every (row, group, ratio) computing sum_k h_k (w_k - q_k)^2 by hand."""
    from nimblediff.core.quant import resolve_scheme
    from nimblediff.core.quant.calibrate import _group_clip

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 64, generator=g)
    w[:, 5] *= 6  # an outlier column: clipping its group trades its error against the rest
    h = torch.rand(64, generator=g) * torch.linspace(0.1, 4, 64)
    fn = resolve_scheme("int4_g32")
    grid = (1.0, 0.9, 0.8, 0.7)
    got = _group_clip(w, fn, h, 32, grid)
    for r in range(3):
        for j in range(2):
            cols = slice(32 * j, 32 * j + 32)
            errs = [float((h[cols] * (w[r, cols] - fn(w, clip=c).dequantize()[r, cols]) ** 2).sum()) for c in grid]
            assert got[r, j] == grid[min(range(len(grid)), key=errs.__getitem__)]
