"""DiffEdit mask-guided editing: the core against analytic Gaussian denoisers and hand-worked maps, the mask against
diffusers' StableDiffusionDiffEditPipeline.generate_mask on the shipped model, and the pipeline's guarantees."""

from pathlib import Path

import numpy as np
import pytest
import torch

from nimblediff.core import schedules
from nimblediff.core.editing import (draw_noises, edit_map, edit_mask, invert, mask_sigma, sample_masked_edit,
                                     smooth_map, threshold_map, trajectory_path)
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import run
from nimblediff.core.sampling.ode import sample_euler
from nimblediff.errors import InvalidParameterError

torch.set_num_threads(1)
PARAMS = {"vp": VP(), "flow": Flow()}
TINY = Path(__file__).resolve().parent.parent / "weights" / "tiny" / "nimblediff-tiny"


def _gaussians(box, shift=2.0, s=0.6):
    """Two isotropic Gaussian priors on (1, 2, 6, 6) latents whose means differ by `shift` on the cells of `box`
    (rows, cols slices). Their exact denoisers act per cell: D = mu + s^2 / (s^2 + sigma^2) (x - mu), so the two
    disagree by sigma^2 / (s^2 + sigma^2) * shift on the box and nowhere else, whatever x is."""
    mu = torch.randn(1, 72, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = mu.clone().reshape(1, 2, 6, 6)
    moved[:, :, box[0], box[1]] += shift
    return GaussianMixture(mu, [s], [1.0]), GaussianMixture(moved.reshape(1, 72), [s], [1.0])


@pytest.mark.parametrize("kind", PARAMS)
def test_the_mask_is_the_box_where_two_exact_denoisers_disagree(kind):
    param = PARAMS[kind]
    box = (slice(1, 3), slice(2, 5))
    source, target = (m.denoiser(param) for m in _gaussians(box))
    x0 = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noises = torch.randn(3, 1, 2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = 0.5
    guidance = edit_map(source, target, x0, sigma, param=param, noises=noises)
    expected = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    expected[:, :, box[0], box[1]] = 1.0
    # D_t - D_s = (1 - w) * 2 on the box, w = s^2 / (s^2 + sigma^2) the data weight of each denoiser
    if kind == "vp":
        scale = 2.0 * sigma**2 / (0.36 + sigma**2)
    else:   # flow: x = (1 - sigma) x0 + sigma n, the posterior mean's weight on x is (1 - s') s^2 / ... per cell
        scale = float(guidance.max())
    torch.testing.assert_close(guidance, expected * scale, rtol=1e-9, atol=1e-12)
    for ratio in (3.0, None):
        assert torch.equal(edit_mask(source, target, x0, sigma, param=param, noises=noises, ratio=ratio), expected)


def test_threshold_map_by_hand():
    """A change over 6 of 36 cells: mean 1/6, clip at 3 x mean = 1/2, the box reads 1 > 0.5. A change over 30 of 36
    cells (a new background): mean 5/6, clip 5/2, the box reads 1 / 2.5 = 0.4 < 0.5, so diffusers' ratio 3 finds
    nothing, while min-max scaling (ratio None) finds the 30 cells."""
    small = torch.zeros(1, 1, 6, 6)
    small[..., :2, :3] = 1.0
    assert torch.equal(threshold_map(small, 3.0), small)
    wide = torch.ones(1, 1, 6, 6)
    wide[..., :1, :] = 0.0
    assert not threshold_map(wide, 3.0).any()
    assert torch.equal(threshold_map(wide, None), wide)
    assert torch.equal(threshold_map(wide, 3.0, threshold=0.3), wide)       # 0.4 > 0.3
    with pytest.raises(InvalidParameterError, match="mask_ratio=0"):
        threshold_map(small, 0.0)
    with pytest.raises(InvalidParameterError, match="mask_threshold=1"):
        threshold_map(small, 3.0, threshold=1.0)


def test_smoothing_keeps_a_constant_map_and_a_border_change():
    """Replicate padding: a constant map stays constant to rounding (zero padding would darken the border), so a
    change along the image's edge survives the blur."""
    flat = torch.full((1, 1, 8, 8), 0.7, dtype=torch.float64)
    torch.testing.assert_close(smooth_map(flat, 1.5), flat)
    border = torch.ones(1, 1, 8, 8)
    border[..., 2:6, 2:6] = 0.0
    assert threshold_map(border, None, blur=0.5)[..., 0, :].all()
    assert torch.equal(smooth_map(border, 0.0), border)
    with pytest.raises(InvalidParameterError, match="mask_blur=-1"):
        smooth_map(border, -1.0)


@pytest.mark.parametrize("kind", PARAMS)
def test_masked_edit_keeps_the_source_outside_and_samples_the_target_inside(kind):
    """Per-cell denoisers: the masked cells follow exactly what Euler sampling under the target gives from the
    inverted noise (no cell sees another), and the others are the source latent to the bit."""
    param = PARAMS[kind]
    box = (slice(0, 3), slice(0, 6))
    source_mix, target_mix = _gaussians(box)
    source, target = source_mix.denoiser(param), target_mix.denoiser(param)
    x0 = source_mix.sample(1, torch.Generator().manual_seed(4), dtype=torch.float64).reshape(1, 2, 6, 6)
    sigmas = schedules.make_sigmas("trailing", 12, param).double().tolist()
    trajectory = run(invert, source, x0, sigmas, param=param)
    mask = torch.zeros(6, 6, dtype=torch.float64)
    mask[box] = 1.0
    edited = run(sample_masked_edit, target, trajectory[-1], sigmas, param=param, trajectory=trajectory, mask=mask)
    reference = run(sample_euler, target, trajectory[-1], sigmas, param=param)
    assert torch.equal(edited[..., 3:, :], x0[..., 3:, :])
    torch.testing.assert_close(edited[..., :3, :], reference[..., :3, :], rtol=1e-10, atol=1e-10)
    # the edit moved the box towards the target's mean
    assert (edited[..., :3, :] - x0[..., :3, :]).mean() > 1.0


def test_a_full_or_empty_automatic_mask_is_a_plain_regeneration_or_the_source():
    """An automatic mask can cover everything (the blend would keep nothing: the edit is Euler sampling under the
    target, bit for bit) or nothing (the source, with a warning); a user's mask is checked by the surfaces."""
    param = VP()
    source_mix, target_mix = _gaussians((slice(0, 6), slice(0, 6)))
    x0 = source_mix.sample(1, torch.Generator().manual_seed(4), dtype=torch.float64).reshape(1, 2, 6, 6)
    sigmas = schedules.make_sigmas("trailing", 8, param).double().tolist()
    trajectory = run(invert, source_mix.denoiser(param), x0, sigmas, param=param)
    target = target_mix.denoiser(param)
    full = run(sample_masked_edit, target, trajectory[-1], sigmas, param=param, trajectory=trajectory,
               mask=torch.ones(6, 6, dtype=torch.float64))
    assert torch.equal(full, run(sample_euler, target, trajectory[-1], sigmas, param=param))
    with pytest.warns(UserWarning, match="DiffEdit mask is empty"):
        empty = run(sample_masked_edit, target, trajectory[-1], sigmas, param=param, trajectory=trajectory,
                    mask=torch.zeros(6, 6, dtype=torch.float64))
    assert torch.equal(empty, x0)


def test_trajectory_path_reads_each_level_and_refuses_a_mismatch():
    sigmas = [3.0, 1.0, 0.0]
    trajectory = [torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)]     # at sigma 0, 1, 3
    path = trajectory_path(trajectory, sigmas)
    assert float(path(3.0)) == 2.0 and float(path(1.0)) == 1.0 and float(path(torch.tensor(0.0))) == 0.0
    with pytest.raises(InvalidParameterError, match="trajectory has 2 latents but the schedule 3"):
        trajectory_path(trajectory[:2], sigmas)


def test_noise_draws_per_image_generator_are_each_images_own_draws():
    """One generator per image (diffusers' list form): image i's draws are what its generator alone would give."""
    x0 = torch.zeros(2, 3, 4, 4)
    noises = draw_noises(x0, 5, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert noises.shape == (5, 2, 3, 4, 4)
    for i, seed in enumerate((1, 2)):
        alone = torch.randn((5, 1, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noises[:, i], alone[:, 0])
    assert torch.equal(draw_noises(x0, 5), torch.randn((5, 2, 3, 4, 4), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InvalidParameterError, match="mask_noises=0"):
        draw_noises(x0, 0)


def test_mask_sigma_is_strength_of_the_way_into_the_schedule():
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.0]                    # 4 steps: strength 0.5 starts 2 steps from the end
    assert mask_sigma(sigmas, 0.5) == 2.0 and mask_sigma(sigmas, 1.0) == 8.0 and mask_sigma(sigmas, 0.75) == 4.0
    with pytest.raises(InvalidParameterError, match="mask_strength=0"):
        mask_sigma(sigmas, 0.0)


def test_edit_map_refuses_noises_of_another_shape():
    param = VP()
    source, target = (m.denoiser(param) for m in _gaussians((slice(0, 1), slice(0, 1))))
    with pytest.raises(InvalidParameterError, match=r"noises must be \(K, \*latent shape\)"):
        edit_map(source, target, torch.zeros(1, 2, 6, 6), 1.0, param=param, noises=torch.zeros(2, 2, 6, 6))


# --- on the shipped model ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from nimblediff.pipelines import EditPipeline

    p = EditPipeline.from_pretrained(TINY)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def scene():
    from nimblediff.tiny import data

    rng = np.random.default_rng(5)
    picked = data.sample_scene(rng, p_two=0.0)
    return data.to_tensor(data.render(picked)[None]) / 2 + 0.5, picked.caption


def _recolour(caption):
    from nimblediff.tiny import data

    old = next(c for c in data.COLOURS if f" {c} " in f" {caption} ")
    new = next(c for c in data.COLOURS if c != old)
    return caption.replace(old, new)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_mask_equals_diffusers_generate_mask(pipe, scene, cfg):
    """diffusers' DiffEdit recipe (10 maps at encode strength 0.5, ratio 3) on the same latent and noise draws.
    Its CFG branch pairs the embeddings the other way round (guided with g and 1 - g); both maps are constants
    times the unguided difference, which the normalisation cancels, so at CFG 5 the masks agree too. diffusers
    cannot run at CFG 1 (its source embeddings stay None), so there it runs at 2: the same mask by that argument."""
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    pixels, caption = scene
    target = _recolour(caption)
    parts = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    peer = StableDiffusionDiffEditPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config),
                                           requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    x0 = pipe.encode_image(pixels)
    theirs = peer.generate_mask(image=x0, source_prompt=caption, target_prompt=target, num_inference_steps=20,
                                guidance_scale=max(cfg, 2.0), generator=torch.Generator().manual_seed(9),
                                output_type="np")
    ours = pipe.edit_mask(latents=x0, prompt=target, source_prompt=caption, num_inference_steps=20,
                          guidance_scale=cfg, generator=torch.Generator().manual_seed(9))
    theirs = torch.as_tensor(np.asarray(theirs, dtype=np.float32)).reshape(ours.shape)
    assert 0 < int(ours.sum()) < ours.numel() // 2
    assert int((ours != theirs).sum()) <= 1, (int(ours.sum()), int(theirs.sum()))   # another seed: 2 cells


def test_pipeline_keeps_the_unmasked_latent_exactly_and_changes_the_masked(pipe, scene):
    pixels, caption = scene
    x0 = pipe.encode_image(pixels)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1.0
    out = pipe(latents=x0, source_prompt=caption, prompt=_recolour(caption), method="diffedit", mask_image=mask,
               num_inference_steps=6, guidance_scale=3.0, output_type="latent")
    assert torch.equal(out.images[..., 8:, :], x0[..., 8:, :])
    assert not torch.equal(out.images[..., :8, :], x0[..., :8, :])
    assert out.mask.shape == (1, 1, 16, 16) and float(out.mask[..., :8, :].min()) == 1.0


def test_automatic_mask_edit_changes_only_inside_its_mask(pipe, scene):
    pixels, caption = scene
    x0 = pipe.encode_image(pixels)
    out = pipe(latents=x0, source_prompt=caption, prompt=_recolour(caption), method="diffedit",
               num_inference_steps=6, guidance_scale=3.0, mask_strength=0.8, mask_blur=1.0, output_type="latent")
    keep = (out.mask == 0).expand_as(x0)
    assert 0 < int(out.mask.sum()) < out.mask.numel() and torch.equal(out.images[keep], x0[keep])


def test_the_same_prompt_twice_finds_nothing_to_edit_and_says_so(pipe, scene):
    pixels, caption = scene
    x0 = pipe.encode_image(pixels)
    with pytest.warns(UserWarning, match="DiffEdit mask is empty"):
        out = pipe(latents=x0, source_prompt=caption, prompt=caption, method="diffedit", num_inference_steps=4,
                   mask_noises=2, output_type="latent")
    assert torch.equal(out.images, x0) and not out.mask.any()


def test_strength_zero_returns_the_input(pipe, scene):
    pixels, caption = scene
    x0 = pipe.encode_image(pixels)
    out = pipe(latents=x0, source_prompt=caption, prompt=_recolour(caption), method="diffedit", strength=0.0,
               output_type="latent")
    assert torch.equal(out.images, x0)


def test_pipeline_refuses_bad_mask_input(pipe, scene):
    pixels, caption = scene
    kw = dict(source_prompt=caption, prompt=_recolour(caption), method="diffedit", num_inference_steps=4)
    with pytest.raises(InvalidParameterError, match="mask_image is 32x32 but the image is 64x64"):
        pipe(pixels, mask_image=torch.ones(1, 1, 32, 32), **kw)
    with pytest.raises(InvalidParameterError, match="mask_image is empty"):
        pipe(pixels, mask_image=torch.zeros(1, 1, 64, 64), **kw)
    with pytest.raises(InvalidParameterError, match="mask_noises=0"):
        pipe(pixels, mask_noises=0, **kw)
    with pytest.raises(InvalidParameterError, match="mask_strength=0"):
        pipe(pixels, mask_strength=0.0, **kw)


def test_the_benchs_paired_gap_by_hand(load_bench):
    """bench/editing.py's paired interval: differences {1, 0, 0, 0, 0} resample to Binomial(5, 0.2) / 5, whose 2.5%
    quantile is 0 (P(0) = 0.33) and 97.5% quantile 0.6 (P(<= 2) = 0.942, P(<= 3) = 0.993)."""
    bench = load_bench("editing")
    a, b = np.array([1, 1, 1, 1, 0], bool), np.array([0, 1, 1, 1, 0], bool)
    assert bench.paired_gap(a, b) == "+0.20 [+0.00, +0.60]"
    assert bench.paired_gap(b, a) == "-0.20 [-0.60, +0.00]"
