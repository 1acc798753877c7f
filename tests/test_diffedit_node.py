"""The DiffEdit node through the stub ComfyUI surface (tests/fake_comfy.py), with per-cell Gaussian denoisers whose
source and target disagree on a known box: the mask it returns is the box, the box follows the target's own
Euler sampling from the inverted noise, and the rest is the input latent to the bit."""

import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core import schedules
from nimblediff.core.editing import invert
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP
from nimblediff.core.sampling import run
from nimblediff.core.sampling.ode import sample_euler
from nimblediff.errors import InvalidParameterError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402

PARAM = VP()
BOX = (slice(0, 3), slice(1, 5))


def _priors():
    mu = torch.randn(1, 72, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = mu.clone().reshape(1, 2, 6, 6)
    moved[:, :, BOX[0], BOX[1]] += 2.0
    return GaussianMixture(mu, [0.6], [1.0]), GaussianMixture(moved.reshape(1, 72), [0.6], [1.0])


SOURCE, TARGET = _priors()
DENOISERS = {"source": SOURCE.denoiser(PARAM), "target": TARGET.denoiser(PARAM)}
CALLS = []


def _sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, **_):
    """sample_custom for a KSAMPLER; the stub's 'conditioning' names the prompt's exact denoiser."""
    CALLS.append((positive, cfg))
    guided = fake_comfy.GuidedModel(DENOISERS[positive], model.model_sampling)
    guided.latent_image = latent_image
    return sampler.sampler_function(guided, latent_image + noise * float(sigmas[0]), sigmas, extra_args={})


@pytest.fixture(autouse=True)
def comfy():
    fake_comfy.install()
    fake_comfy.install_sample(sample_custom=_sample_custom)
    CALLS.clear()
    yield
    fake_comfy.uninstall()


def _run(mask=None, **overrides):
    from nimblediff.nodes.diffedit import DiffEdit

    model = fake_comfy.FakeModelPatcher(torch.nn.Linear(1, 1), model_sampling=fake_comfy.EPS(PARAM.sigmas.float()))
    latent = SOURCE.sample(1, torch.Generator().manual_seed(4), dtype=torch.float64).reshape(1, 2, 6, 6)
    sigmas = schedules.make_sigmas("trailing", 12, PARAM).double()
    options = dict(cfg=3.0, mask_strength=0.5, mask_noises=3, mask_ratio=3.0, mask_threshold=0.5, mask_blur=0.0,
                   seed=0, **overrides)
    out, used = DiffEdit().edit(model, "source", "target", [], {"samples": latent}, sigmas, mask=mask, **options)
    return latent, sigmas, out["samples"], used


def test_node_masks_the_box_keeps_the_rest_and_samples_the_target_inside():
    latent, sigmas, edited, used = _run()
    expected = torch.zeros(1, 6, 6)
    expected[:, BOX[0], BOX[1]] = 1.0
    assert torch.equal(used, expected.float())
    outside = expected[:, None].expand_as(latent) == 0
    assert torch.equal(edited[outside], latent[outside])
    noise = run(invert, DENOISERS["source"], latent, sigmas, param=PARAM)[-1]
    reference = run(sample_euler, DENOISERS["target"], noise, sigmas, param=PARAM)
    torch.testing.assert_close(edited[~outside], reference[~outside], rtol=1e-9, atol=1e-9)
    # inversion unguided, the prompts compared at the edit's guidance, the edit guided
    assert CALLS == [("source", 1.0), ("source", 3.0), ("target", 3.0)]


def test_node_takes_a_mask_instead_and_refuses_a_wrong_size():
    mask = torch.zeros(1, 12, 12)
    mask[:, 6:, :] = 1.0                       # image-sized (twice the latent): the bottom half
    latent, _, edited, used = _run(mask=mask)
    assert torch.equal(edited[..., :3, :], latent[..., :3, :]) and not torch.equal(edited, latent)
    assert float(used[:, 3:].min()) == 1.0 and float(used[:, :3].max()) == 0.0
    assert [c[0] for c in CALLS] == ["source", "target"]                  # no comparison pass
    with pytest.raises(InvalidParameterError, match="mask is 5x5 but the latent is 6x6"):
        _run(mask=torch.ones(1, 5, 5))
    with pytest.raises(InvalidParameterError, match="mask is empty"):
        _run(mask=torch.zeros(1, 12, 12))
