"""Prompt Tuning Inversion on MM-DiTs: core/editing/pti.py with tuples of streams, and DiTEditPipeline(method="pti")
on the shipped NimbleDiff-Tiny-DiT, against independent references.

- core: a hand-worked step (both streams move under one Adam; a stream the model ignores stays put), the
  interpolation stream by stream against lerp written out;
- pipeline: the stock StableDiffusion3Pipeline sampling our inverted noise under the source prompt is the plain
  inversion + regeneration; PTI at 0 Adam steps (alpha 1) equals it, and PTI at alpha 1 with tuning reconstructs the
  image better than it at the same steps and CFG; bad parameters raise InvalidParameterError naming them.
"""

import numpy as np
import pytest
import torch

import nimblediff
from nimblediff.core.editing.inversion import latent_psnr
from nimblediff.core.editing.pti import interpolate, tune_prompt
from nimblediff.errors import InvalidParameterError
from nimblediff.tiny import data

torch.set_num_threads(1)
STEPS, CFG, ROWS = 6, 3.0, 24


# ------------------------------------------------------------------------------------------------------ core
def test_tuple_streams_are_tuned_together_and_keep_their_structure():
    """model x0 = a * tokens.mean() + b * pooled.mean() (the ignored third stream: no gradient). One step from
    sigma 1 to 0 lands on x0 itself, so the loss is (x0 - target)^2 and Adam's first step moves every used element
    by exactly lr against the sign of its gradient (Adam's first step is lr * g / |g|)."""
    a, b, lr = 2.0, -3.0, 0.1

    def model(x, sigma, c):
        tokens, pooled, _ = c
        return torch.zeros_like(x) + a * tokens.mean() + b * pooled.mean()

    cond = (torch.zeros(1, 2, 3), torch.zeros(1, 4), torch.ones(1, 5))
    target = torch.full((1, 1, 2, 2), 1.0)               # x0 = 0 now, so d loss / d x0 < 0
    (tuned,) = tune_prompt(model, [target, torch.randn(1, 1, 2, 2)], [1.0, 0.0], cond, iters=1, lr=lr)
    assert isinstance(tuned, tuple) and len(tuned) == 3
    torch.testing.assert_close(tuned[0], torch.full((1, 2, 3), lr))        # sign(-a) = -1: moves up
    torch.testing.assert_close(tuned[1], torch.full((1, 4), -lr))          # sign(-b) = +1: moves down
    assert torch.equal(tuned[2], cond[2])                                   # unused stream unchanged
    single = tune_prompt(lambda x, s, c: model(x, s, (c, cond[1], cond[2])), [target, target], [1.0, 0.0],
                         cond[0], iters=1, lr=lr)
    assert isinstance(single[0], torch.Tensor)                              # one tensor in, one tensor out


def test_interpolate_stream_by_stream():
    g = torch.Generator().manual_seed(0)
    tuned = [(torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, generator=g)) for _ in range(3)]
    target = (torch.randn(1, 3, 4, generator=g), torch.randn(1, 5, generator=g))
    mixed = interpolate(tuned, target, 0.3)
    for (t, p), (mt, mp) in zip(tuned, mixed):
        torch.testing.assert_close(mt, 0.3 * t + 0.7 * target[0])
        torch.testing.assert_close(mp, 0.3 * p + 0.7 * target[1])
    with pytest.raises(InvalidParameterError, match="2 streams, target 1"):
        interpolate(tuned, target[0], 0.5)


# -------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def rig():
    from diffusers import StableDiffusion3Pipeline

    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    pipe = DiTEditPipeline.from_pretrained(nimblediff.TINY_DIT, dtype=torch.float32)
    stock = StableDiffusion3Pipeline(**pipe.components)          # scheduler shift 1: given sigmas are used as given
    assert stock.scheduler.config.shift == 1.0 and not stock.scheduler.config.use_dynamic_shifting
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    scene = data.sample_scene(np.random.default_rng(77), p_two=0.0)
    pixels = data.to_tensor(data.render(scene)[None]) / 2 + 0.5          # (1, 3, 64, 64) in [0, 1]
    return pipe, stock, pipe.encode_image(pixels), scene.caption


def _kw(caption, **kw):
    return dict(prompt="a blue square at the top", source_prompt=caption, num_inference_steps=STEPS,
                guidance_scale=CFG, max_sequence_length=ROWS, output_type="latent", **kw)


def _stock_regeneration(rig):
    """Plain inversion + regeneration: the stock pipeline samples our inverted noise under the source prompt."""
    pipe, stock, x0, caption = rig
    inv = pipe.invert(latents=x0, prompt=caption, num_inference_steps=STEPS, max_sequence_length=ROWS)
    with torch.no_grad():
        return stock(prompt=caption, latents=inv.latents, sigmas=inv.sigmas[:-1], num_inference_steps=STEPS,
                     guidance_scale=CFG, max_sequence_length=ROWS, output_type="latent").images


def test_zero_tuning_steps_is_the_plain_inversion_path(rig):
    pipe, _, x0, caption = rig
    plain = _stock_regeneration(rig)
    zero = pipe(latents=x0, method="pti", pti_iters=0, alpha=1.0, **_kw(caption)).images
    torch.testing.assert_close(zero, plain, rtol=0, atol=2e-5)
    # untuned, alpha interpolates the prompts: EIM at strength 1 - alpha
    half = pipe(latents=x0, method="pti", pti_iters=0, alpha=0.25, **_kw(caption)).images
    eim = pipe(latents=x0, strength=0.75, **_kw(caption)).images
    torch.testing.assert_close(half, eim, rtol=0, atol=2e-5)


def test_tuned_embedding_reconstructs_better_than_plain_inversion(rig):
    pipe, _, x0, caption = rig
    plain = latent_psnr(_stock_regeneration(rig), x0)
    tuned = latent_psnr(pipe(latents=x0, method="pti", pti_iters=5, pti_lr=0.05, alpha=1.0,
                             **_kw(caption)).images, x0)
    assert tuned > plain + 3.0, (tuned, plain)


@pytest.mark.parametrize("kw, match", [
    ({"method": "paint"}, "method='paint'"),
    ({"method": "pti", "pti_iters": -1}, "pti_iters=-1"),
    ({"method": "pti", "pti_iters": 2.5}, "pti_iters=2.5"),
    ({"method": "pti", "pti_lr": 0.0}, "pti_lr=0.0"),
    ({"method": "pti", "alpha": 1.5}, "alpha=1.5"),
    ({"method": "pti", "hsds_steps": 3}, "hsds_steps=3"),
    ({"method": "pti", "num_inference_steps": 0}, "num_inference_steps=0"),
])
def test_bad_parameters_name_the_input(rig, kw, match):
    pipe, _, x0, caption = rig
    args = {**_kw(caption), **kw}
    with pytest.raises(InvalidParameterError, match=match):
        pipe(latents=x0, **args)

