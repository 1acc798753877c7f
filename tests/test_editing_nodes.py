"""Editing nodes through the stub ComfyUI surface (tests/fake_comfy.py), on an exact mixture denoiser."""

import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core.editing import latent_psnr
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP
from nimblediff.core.sampling import run
from nimblediff.core.sampling.ode import sample_euler
from nimblediff.errors import InvalidParameterError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402

PARAM = VP()
MIX = GaussianMixture.random(k=4, dim=64, seed=3)
DENOISER = MIX.denoiser(PARAM)


def _sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, **_):
    """comfy.sample.sample_custom's contract for a KSAMPLER: the sampler gets KSamplerX0Inpaint (the guided model
    with latent_image) and x = noise_scaling(sigmas[0], noise, latent_image)."""
    guided = fake_comfy.GuidedModel(DENOISER, model.model_sampling)
    guided.latent_image = latent_image
    x = latent_image + noise * float(sigmas[0])
    return sampler.sampler_function(guided, x, sigmas, extra_args={})


@pytest.fixture(autouse=True)
def comfy():
    fake_comfy.install()
    fake_comfy.install_sample(sample_custom=_sample_custom)
    yield
    fake_comfy.uninstall()


def _model():
    return fake_comfy.FakeModelPatcher(torch.nn.Linear(1, 1), model_sampling=fake_comfy.EPS(PARAM.sigmas.float()))


def _latent(n=2, seed=0):
    return MIX.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64).reshape(n, 4, 4, 4)


def test_invert_node_gives_noise_that_euler_regenerates():
    from nimblediff.core import schedules
    from nimblediff.nodes.editing import InvertLatent

    latent = _latent()
    sigmas = schedules.make_sigmas("karras", 50, PARAM).double()
    (noise,) = InvertLatent().invert(_model(), [], [], {"samples": latent}, sigmas, 1.0, 2)
    assert noise["samples"].shape == latent.shape
    regenerated = run(sample_euler, DENOISER, noise["samples"], sigmas, param=PARAM)
    assert latent_psnr(regenerated, latent) > 60


def test_invert_node_refuses_a_model_without_a_sigma_table():
    from nimblediff.nodes.editing import InvertLatent

    model = fake_comfy.FakeModelPatcher(torch.nn.Linear(1, 1), model_sampling=object())
    with pytest.raises(InvalidParameterError, match="VP .* or flow model"):
        InvertLatent().invert(model, [], [], {"samples": _latent()}, torch.tensor([1.0, 0.0]), 1.0, 0)


def _restore(**overrides):
    from nimblediff.nodes.editing import RestoreSampler

    opts = dict(method="blend", operator="mask", cg_steps=5, factor=2, blur_sigma=0.5, eta=0.0, differential=False,
                box_x=0.5, box_y=0.0, box_width=0.5, box_height=1.0)
    opts.update(overrides)
    return RestoreSampler().build(**opts)[0]


@pytest.mark.parametrize("method", ["blend", "dds"])
def test_restore_sampler_keeps_the_unmasked_region(method):
    from nimblediff.core import schedules

    known = _latent(seed=4)
    sigmas = schedules.make_sigmas("karras", 12, PARAM).double()
    guided = fake_comfy.GuidedModel(DENOISER, fake_comfy.EPS(PARAM.sigmas))
    guided.latent_image = known
    x = torch.randn(known.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    out = _restore(method=method).sampler_function(guided, x, sigmas, extra_args={"seed": 0})
    left = (slice(None), slice(None), slice(None), slice(0, 2))           # the box repaints the right half
    if method == "blend":
        assert torch.equal(out[left], known[left])
    else:                                                                 # CG on a mask: replacement of x0
        assert torch.allclose(out[left], known[left], atol=1e-9)
    assert not torch.allclose(out[..., 2:], known[..., 2:])


def test_restore_sampler_mask_input_and_errors():
    from nimblediff.core import schedules

    known = _latent(seed=4)
    sigmas = schedules.make_sigmas("karras", 4, PARAM).double()
    guided = fake_comfy.GuidedModel(DENOISER, fake_comfy.EPS(PARAM.sigmas))
    guided.latent_image = known
    with pytest.raises(InvalidParameterError, match="mask is 24x16 but the latent is 4x4"):
        _restore(mask=torch.ones(1, 16, 24)).sampler_function(guided, known, sigmas, extra_args={})
    with pytest.raises(InvalidParameterError, match="empty"):
        _restore(mask=torch.zeros(1, 32, 32)).sampler_function(guided, known, sigmas, extra_args={})
    with pytest.raises(InvalidParameterError, match="operator 'downsample' needs method 'dds'"):
        _restore(operator="downsample")
    mask = torch.zeros(1, 32, 32)
    mask[:, :16] = 1.0                                                    # top half, at 8x the latent size
    out = _restore(mask=mask).sampler_function(guided, known * 0 + known, sigmas, extra_args={})
    assert torch.equal(out[..., 2:, :], known[..., 2:, :])


def test_filter_prompt_node_keeps_comfy_image_layout():
    from nimblediff.nodes.editing import FilterPrompt

    image = torch.rand(2, 16, 12, 3)                                      # (B, H, W, C)
    (grey,) = FilterPrompt().apply(image, "grey", 0.0)
    assert grey.shape == image.shape
    assert torch.allclose(grey[..., 0], grey[..., 2])
    expected = 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
    assert torch.allclose(grey[..., 1], expected, atol=1e-6)
