"""core/editing against analytic references: closed-form Gaussian ODE flows, exact mixture denoisers,
torch.linalg.solve, adjoint identities and hand-worked masks."""

import math

import pytest
import torch

from nimblediff.core import schedules
from nimblediff.core.editing import (OPERATORS, Blur, Downsample, Mask, apply_filter, check_mask,
                                     conjugate_gradient, data_consistency, differential_masks, interpolate, invert,
                                     latent_psnr, reconstruct, run_per_step, sample_dds, sample_inpaint,
                                     sample_replace, truncate, tune_prompt)
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import run
from nimblediff.core.sampling.ode import sample_euler
from nimblediff.errors import InvalidParameterError

torch.set_num_threads(1)
PARAMS = {"vp": VP(), "flow": Flow()}


def _schedule(param, steps):
    name = "karras" if param.kind == "vp" else "trailing"
    return schedules.make_sigmas(name, steps, param).double()


def _x0(mix, n=6, seed=0):
    return mix.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64).reshape(n, 1, 4, 4)


# --- inversion ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PARAMS)
def test_inversion_follows_the_closed_form_ode_of_a_gaussian(kind):
    """x0 ~ N(mu, s^2 I): the probability-flow ODE is linear, x(sigma) = a mu + sqrt(a^2 s^2 + sigma^2) / s
    (x0 - mu) with a = 1 (VP k-space) or 1 - sigma (flow). Fixed-point inversion on 400 steps lands on it."""
    param = PARAMS[kind]
    mu, s = torch.randn(1, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 0.7
    mix = GaussianMixture(mu, [s], [1.0])
    x0 = _x0(mix)
    sigmas = _schedule(param, 400)
    noise = run(invert, mix.denoiser(param), x0, sigmas, param=param, fixed_point=4)[-1]
    top = float(sigmas[0])
    a = 1.0 if kind == "vp" else 1 - top
    exact = a * mu.reshape(1, 1, 4, 4) + math.sqrt(a**2 * s**2 + top**2) / s * (x0 - mu.reshape(1, 1, 4, 4))
    rel = float((noise - exact).norm() / exact.norm())
    assert rel < 1e-2, rel


@pytest.mark.parametrize("kind", PARAMS)
def test_inversion_of_a_mixture_matches_the_reference_ode_solution(kind):
    """Start from noise, solve the exact ODE to data with GaussianMixture.ode_solve (RK4 in log rho), invert the
    result: the noise comes back (the ODE is a bijection)."""
    param = PARAMS[kind]
    mix = GaussianMixture.random(k=4, dim=16, seed=1)
    sigmas = _schedule(param, 200)
    top = float(sigmas[0])
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_top = z * top if kind == "vp" else z
    x0 = mix.ode_solve(x_top, kind, top, steps=400).reshape(6, 1, 4, 4)
    noise = run(invert, mix.denoiser(param), x0, sigmas, param=param, fixed_point=3)[-1]
    rel = float((noise.reshape(6, 16) - x_top).norm() / x_top.norm())
    assert rel < 3e-2, rel


@pytest.mark.parametrize("kind", PARAMS)
def test_fixed_point_inversion_is_the_exact_inverse_of_euler_sampling(kind):
    param = PARAMS[kind]
    mix = GaussianMixture.random(k=4, dim=16, seed=2)
    x0 = _x0(mix)
    _, _, plain = reconstruct(mix.denoiser(param), x0, _schedule(param, 50), param=param)
    trajectory, regenerated, exact = reconstruct(mix.denoiser(param), x0, _schedule(param, 50), param=param,
                                                 fixed_point=8)
    assert len(trajectory) == 51 and torch.equal(trajectory[0], x0)
    assert plain > 30 and exact > 120, (plain, exact)
    assert torch.allclose(regenerated, x0, atol=1e-6)


def test_latent_psnr_and_truncate_by_hand():
    ref = torch.tensor([0.0, 2.0])
    assert latent_psnr(ref + torch.tensor([0.2, 0.2]), ref) == pytest.approx(10 * math.log10(4 / 0.04))
    assert truncate([3.0, 2.0, 1.0, 0.0], 1.0) == [3.0, 2.0, 1.0, 0.0]
    assert truncate([3.0, 2.0, 1.0, 0.0], 2 / 3) == [2.0, 1.0, 0.0]
    assert truncate([3.0, 2.0, 1.0, 0.0], 0.0) == [0.0]
    with pytest.raises(InvalidParameterError, match="strength=1.5"):
        truncate([1.0, 0.0], 1.5)


def test_strength_zero_runs_no_step_and_returns_the_input():
    param = VP()
    mix = GaussianMixture.random(k=4, dim=16, seed=2)
    x0 = _x0(mix)
    sigmas = truncate(_schedule(param, 20), 0.0)
    trajectory = run(invert, mix.denoiser(param), x0, sigmas, param=param)
    assert torch.equal(run(sample_euler, mix.denoiser(param), trajectory[-1], sigmas, param=param), x0)


def test_operators_refuse_an_unsupported_model_type():
    class EDM:
        kind = "edm"
    x = torch.zeros(1, 1, 4, 4)
    for method, opts in ((invert, {}), (sample_dds, {"y": x, "operator": Mask(x)}),
                         (sample_inpaint, {"known": x, "mask": torch.ones(4, 4).tril()})):
        with pytest.raises(InvalidParameterError, match="got a model of kind 'edm'"):
            next(method(x, [1.0, 0.0], param=EDM(), noise=lambda a, b: x, **opts))


# --- inpainting blend -----------------------------------------------------------------------------------------

def _inpaint_case(seed=0):
    mix = GaussianMixture.random(k=4, dim=16, seed=seed)
    known = _x0(mix, 4, seed)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[:, 2:] = 1.0
    return mix, known, mask


@pytest.mark.parametrize("kind", PARAMS)
@pytest.mark.parametrize("mode", ["binary", "soft", "differential"])
def test_inpaint_keeps_the_known_region_exactly(kind, mode):
    param = PARAMS[kind]
    mix, known, mask = _inpaint_case()
    if mode != "binary":
        mask[:, 2] = 0.5                            # a soft edge / half-strength column
    sigmas = _schedule(param, 12)
    x = param.noise_scaling(float(sigmas[0]), torch.randn_like(known), torch.zeros_like(known))
    out = run(sample_inpaint, mix.denoiser(param), x, sigmas, param=param, seed=1, known=known, mask=mask,
              differential=mode == "differential")
    keep = (mask == 0).expand_as(known)
    assert torch.equal(out[keep], known[keep])
    changed = (mask == 1).expand_as(known)
    assert (out[changed] - known[changed]).abs().max() > 1e-3          # the masked region was generated
    if mode == "soft":                                                 # soft: the final blend is per pixel
        half = (mask == 0.5).expand_as(known)
        assert not torch.equal(out[half], known[half])


def test_differential_masks_release_pixels_by_strength():
    m = torch.tensor([[0.0, 0.2, 0.5, 1.0]])
    steps = differential_masks(m, 5)       # thresholds 0.8, 0.6, 0.4, 0.2, 0.0
    assert [s.tolist()[0] for s in steps] == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]


def test_mask_errors_name_both_sizes_and_refuse_empty_or_full():
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(InvalidParameterError, match="mask is 32x24 .* latent is 16x16"):
        check_mask(torch.ones(24, 32), x)
    with pytest.raises(InvalidParameterError, match="empty"):
        check_mask(torch.zeros(16, 16), x)
    with pytest.raises(InvalidParameterError, match="full"):
        check_mask(torch.ones(16, 16), x)
    with pytest.raises(InvalidParameterError, match=r"\[0, 1\]"):
        check_mask(torch.full((16, 16), 2.0).tril(), x)
    assert check_mask(torch.ones(16, 16).tril(), x).shape == (1, 1, 16, 16)


# --- operators and CG ------------------------------------------------------------------------------------------

def test_conjugate_gradient_solves_like_linalg_solve():
    g = torch.Generator().manual_seed(0)
    b_mat = torch.randn(6, 6, generator=g, dtype=torch.float64)
    m = b_mat @ b_mat.T + 0.5 * torch.eye(6, dtype=torch.float64)     # symmetric positive definite
    rhs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    solved = conjugate_gradient(lambda v: v @ m, rhs, torch.zeros_like(rhs), steps=6)
    assert torch.allclose(solved, torch.linalg.solve(m, rhs.T).T, atol=1e-8)
    # started elsewhere, it still converges in n steps (exact arithmetic: the Krylov space is full)
    start = torch.randn(3, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(conjugate_gradient(lambda v: v @ m, rhs, start, steps=6),
                          torch.linalg.solve(m, rhs.T).T, atol=1e-7)


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_adjoint_identity(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    op = {"mask": lambda: Mask((torch.rand(1, 1, 8, 8, generator=g) > 0.5).double()),
          "downsample": lambda: Downsample(2), "blur": lambda: Blur(1.2)}[name]()
    y = torch.randn(op.forward(x).shape, generator=g, dtype=torch.float64)
    assert float((op.forward(x) * y).sum()) == pytest.approx(float((x * op.adjoint(y)).sum()), rel=1e-10)
    if hasattr(op, "pinv"):                                          # A A^+ y = y on the range of A
        assert torch.allclose(op.forward(op.pinv(op.forward(x))), op.forward(x), atol=1e-12)


def test_data_consistency_on_a_mask_is_replacement_of_the_observed_entries():
    x0 = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    truth = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    m = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    m[..., :2] = 1
    op = Mask(m)
    out = data_consistency(x0, op.forward(truth), op, steps=1)
    assert torch.allclose(out, m * truth + (1 - m) * x0, atol=1e-12)


@pytest.mark.parametrize("kind", PARAMS)
def test_dds_result_is_consistent_with_the_measurement(kind):
    param = PARAMS[kind]
    mix = GaussianMixture.random(k=4, dim=16, seed=4)
    truth = _x0(mix, 4, 9)
    op = Downsample(2)
    y = op.forward(truth)
    sigmas = _schedule(param, 20)
    x = param.noise_scaling(float(sigmas[0]), torch.randn_like(truth), torch.zeros_like(truth))
    out = run(sample_dds, mix.denoiser(param), x, sigmas, param=param, seed=0, y=y, operator=op, cg_steps=8)
    assert float((op.forward(out) - y).abs().max()) < 1e-6
    repl = run(sample_replace, mix.denoiser(param), x, sigmas, param=param, seed=0, y=y, operator=op)
    assert float((op.forward(repl) - y).abs().max()) < 1e-9


def test_dds_refuses_bad_options():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(InvalidParameterError, match="cg_steps"):
        next(sample_dds(x, [1.0, 0.0], param=VP(), noise=None, y=x, operator=Mask(x), cg_steps=-1))
    with pytest.raises(InvalidParameterError, match="forward"):
        next(sample_dds(x, [1.0, 0.0], param=VP(), noise=None, y=x, operator="mask"))


# --- prompt tuning inversion ----------------------------------------------------------------------------------

def _conditional_mixture():
    """A guided toy denoiser: the mixture's x0 pulled towards an embedding c by a guidance weight w; inversion
    under w = 1 and sampling under w = 4 disagree, as CFG and DDIM inversion do."""
    param = VP()
    mix = GaussianMixture.random(k=4, dim=16, seed=6)
    base = mix.denoiser(param)

    def model(x, sigma, c, w=1.0):
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return base(x, sigma) + w * 0.3 * s / (1 + s) * c
    return param, mix, model


def test_prompt_tuning_inversion_reconstructs_under_guidance_and_alpha_interpolates():
    param, mix, model = _conditional_mixture()
    x0 = _x0(mix, 2, 3)
    source = 0.2 * torch.ones_like(x0)
    target = -0.5 * torch.ones_like(x0)
    sigmas = _schedule(param, 10)
    trajectory = run(invert, lambda x, s: model(x, s, source), x0, sigmas, param=param, fixed_point=4)
    guided = lambda x, s, c: model(x, s, c, w=4.0)              # noqa: E731
    plain = run_per_step(guided, trajectory[-1], sigmas, [source] * 10, param=param)
    tuned = tune_prompt(guided, trajectory, sigmas, source, iters=60, lr=0.05)
    fitted = run_per_step(guided, trajectory[-1], sigmas, tuned, param=param)
    assert latent_psnr(fitted, x0) > latent_psnr(plain, x0) + 15, (latent_psnr(fitted, x0), latent_psnr(plain, x0))
    # alpha = 1 is the tuned reconstruction, alpha = 0 the target prompt alone
    assert torch.equal(run_per_step(guided, trajectory[-1], sigmas, interpolate(tuned, target, 1.0), param=param),
                       fitted)
    assert torch.equal(run_per_step(guided, trajectory[-1], sigmas, interpolate(tuned, target, 0.0), param=param),
                       run_per_step(guided, trajectory[-1], sigmas, [target] * 10, param=param))
    with pytest.raises(InvalidParameterError, match="alpha"):
        interpolate(tuned, target, 1.5)


# --- FilterPrompt filters ---------------------------------------------------------------------------------------

def test_filters_by_hand():
    img = torch.zeros(1, 3, 16, 16)
    img[:, 0, :, 8:] = 1.0                                 # red right half
    assert torch.allclose(apply_filter(img, "grey"), torch.full_like(img, 0.299) * (img[:, :1] > 0))
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(apply_filter(flat, "low_pass"), flat, atol=1e-6)
    assert torch.allclose(apply_filter(flat, "high_pass"), torch.full_like(flat, 0.5), atol=1e-6)
    e = apply_filter(img, "edges")
    assert float(e[0, 0, 8, 7:9].min()) > 0.5 and float(e[0, 0, 8, 2]) == 0.0   # the edge, not the flat part
    c = apply_filter(img, "colour")
    assert float(c[0, 0, 8, 15]) > float(c[0, 1, 8, 15])                # red survives as chroma
    with pytest.raises(InvalidParameterError, match="valid: low_pass"):
        apply_filter(img, "sepia")
    with pytest.raises(InvalidParameterError, match=r"\(B, 3, H, W\)"):
        apply_filter(img[:, :1], "grey")
