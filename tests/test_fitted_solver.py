"""The fitted multistep solver: hand-worked special cases (DDIM, DPM-Solver++(2M)), the fit against the exact ODE
of an analytic mixture, the prior shift against the closed-form Gaussian ODE, bad options and the schedule file."""

import math

import pytest
import torch

from nimblediff.core import schedule_search as search
from nimblediff.core import schedules
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import SAMPLERS, run
from nimblediff.errors import InvalidParameterError



def _noise(param, n, dim=2, seed=0):
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z * float(param.sigma_max) if param.kind == "vp" else z


@pytest.mark.parametrize("param", [VP(), Flow()], ids=["vp", "flow"])
def test_zero_weights_are_euler(param):
    """All weights zero: x' = x + (sigma' - sigma)(x - D)/sigma at every step (Euler = DDIM in k-space)."""
    den = GaussianMixture.circle().denoiser(param)
    x = _noise(param, 16)
    sigmas = schedules.make_sigmas("logsnr", 5, param).double()
    ref = x.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = den(ref, s.expand(len(ref)))
        ref = ref + (s_next - s) * (ref - d) / s
    out = run(SAMPLERS["fitted"], den, x, sigmas, param=param)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_weights_reproduce_dpmpp_2m():
    """DPM-Solver++(2M) is D^ = D_i - (D_{i-1} - D_i) / (2 r_i), r_i = h_{i-1} / h_i in lambda = -log sigma, with
    first-order first and last (to sigma 0) steps: those weights give the dpmpp_2m sampler's result."""
    param = VP()
    den = GaussianMixture.circle().denoiser(param)
    x = _noise(param, 16)
    sigmas = schedules.make_sigmas("karras", 6, param).double()
    lam = [-math.log(float(s)) for s in sigmas[:-1]]
    coeffs = [[]] + [[-1 / (2 * (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i]))] for i in range(1, 5)] + [[0.0]]
    out = run(SAMPLERS["fitted"], den, x, sigmas, param=param, coeffs=coeffs)
    ref = run(SAMPLERS["dpmpp_2m"], den, x, sigmas, param=param)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_fit_beats_unipc_type_solver_on_held_out_noise():
    """2-D flow, NFE 4: fitted on 128 calibration noises, the solver is closer to the exact ODE solution on other
    noise than DPM-Solver++(2M) with the UniC corrector on the flow schedule (diffusers' UniPC twin)."""
    param, gmm = Flow(), GaussianMixture.circle()
    den = gmm.denoiser(param)
    cal, x = _noise(param, 128, seed=1), _noise(param, 512, seed=2)
    seen = []
    fit = search.search_schedule("fit", den, param, 4, x=cal, iterations=120,
                                 progress=lambda done, total: seen.append(done))
    assert fit["sampler"] == "fitted" and fit["created_by"] == "fit" and len(fit["sigmas"]) == 5
    assert seen[-1] == 120
    exact = gmm.ode_solve(x, "flow", 1.0, steps=400)
    out = run(SAMPLERS["fitted"], den, x, torch.tensor(fit["sigmas"], dtype=torch.float64), param=param,
              **fit["options"])
    base = run(SAMPLERS["dpmpp_2m_unic"], den, x, schedules.make_sigmas("flow", 4, param).double(), param=param)
    err, err_base = ((o - exact).norm(dim=1).mean().item() for o in (out, base))
    assert err < 0.7 * err_base, (err, err_base)


def test_prior_shift_matches_the_gaussian_ode():
    """1-D data N(mu, s^2): the VP ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant, and D(x) = mu + s^2 (x - mu)
    / (s^2 + sigma^2). From x_T = 0: plain, x0 = mu - mu s / sqrt(s^2 + S^2); shifted (start at D(0)), x0 = mu -
    mu s^3 / (s^2 + S^2)^1.5 with S = sigma_max: the shift removes the prior's mean error up to s^2 / S^2."""
    mu, s = 3.0, 0.5
    param = VP()
    big = float(param.sigma_max)
    den = GaussianMixture([[mu]], [s], [1.0]).denoiser(param)
    sigmas = schedules.make_sigmas("logsnr", 3000, param).double()   # first order: error ~ 1/steps
    x = torch.zeros(1, 1, dtype=torch.float64)
    plain = run(SAMPLERS["fitted"], den, x, sigmas, param=param)
    shifted = run(SAMPLERS["fitted"], den, x, sigmas, param=param, prior_shift=True)
    v = s**2 + big**2
    assert float(plain) == pytest.approx(mu - mu * s / v**0.5, abs=2e-4)
    assert float(shifted) == pytest.approx(mu - mu * s**3 / v**1.5, abs=2e-4)


def test_bad_options():
    param = VP()
    den = GaussianMixture.circle().denoiser(param)
    x = _noise(param, 2)
    sigmas = schedules.make_sigmas("logsnr", 3, param).double()
    with pytest.raises(InvalidParameterError, match="fitted for 4 steps"):
        run(SAMPLERS["fitted"], den, x, sigmas, param=param, coeffs=[[], [0.1], [0.1, 0.2], [0.0]])
    with pytest.raises(InvalidParameterError, match="only 1 past"):
        run(SAMPLERS["fitted"], den, x, sigmas, param=param, coeffs=[[], [0.1, 0.2], []])
    with pytest.raises(InvalidParameterError, match="flow"):
        run(SAMPLERS["fitted"], den, x.clamp(-1, 1), schedules.make_sigmas("flow", 3, Flow()), param=Flow(),
            prior_shift=True)
    with pytest.raises(InvalidParameterError, match="init has 2 steps"):
        search.fit_solver(den, param, 3, x=x, init=[14.6, 1.0, 0.0], iterations=1)


def test_fitted_schedule_file_round_trip(tmp_path):
    param = VP()
    den = GaussianMixture.circle().denoiser(param)
    fit = search.fit_solver(den, param, 3, x=_noise(param, 32), iterations=5, prior_shift=True)
    search.save_schedule(tmp_path / "fit.json", fit)
    back = search.load_schedule(tmp_path / "fit.json", model_type="vp")
    assert back["options"] == fit["options"] and back["sampler"] == "fitted"
    x = _noise(param, 4, seed=9)
    a = run(SAMPLERS["fitted"], den, x, torch.tensor(fit["sigmas"], dtype=torch.float64), param=param,
            **fit["options"])
    b = run(SAMPLERS["fitted"], den, x, back["sigmas"].double(), param=param, **back["options"])
    torch.testing.assert_close(a, b)


def test_tail_objective_hand_worked():
    """Errors 1..10: the mean is 5.5; the worst 10 % is the single 10; the worst 20 % is (9 + 10) / 2."""
    e = torch.arange(1.0, 11.0)
    assert float(search._tail_objective(e, 1.0, 0.9)) == pytest.approx(5.5 + 10.0)
    assert float(search._tail_objective(e, 2.0, 0.8)) == pytest.approx(5.5 + 2 * 9.5)
    assert float(search._tail_objective(e, 0.0, 0.9)) == pytest.approx(5.5)


@pytest.mark.parametrize("param", [VP(), Flow()], ids=["vp", "flow"])
def test_named_start_is_dpmpp_2m(param):
    """The DPM-Solver++(2M) start of the fit, in the fitted form, is the dpmpp_2m sampler (an independent
    implementation) on the same sigmas."""
    den = GaussianMixture.circle().denoiser(param)
    x = _noise(param, 16)
    sig = schedules.make_sigmas("karras" if param.kind == "vp" else "flow", 5, param).double()
    coeffs = search._dpmpp_2m_coeffs(param, sig.tolist())
    out = run(SAMPLERS["fitted"], den, x, sig, param=param, coeffs=coeffs)
    torch.testing.assert_close(out, run(SAMPLERS["dpmpp_2m"], den, x, sig, param=param), rtol=1e-9, atol=1e-9)


def test_zero_iterations_return_the_best_named_start():
    """With no iterations the fit returns a named start (here without corrector: DDIM or DPM-Solver++(2M)): the same
    sigmas and the same samples as that solver."""
    param = VP()
    den = GaussianMixture.random(dim=16).denoiser(param)
    cal = _noise(param, 64, dim=16, seed=3)
    fit = search.fit_solver(den, param, 4, x=cal, iterations=0, corrector=False)
    rule, name = fit["start"].split("/")
    sig = schedules.make_sigmas(name, 4, param).double()
    torch.testing.assert_close(torch.tensor(fit["sigmas"], dtype=torch.float64), sig, rtol=1e-6, atol=1e-9)
    x = _noise(param, 32, dim=16, seed=4)
    out = run(SAMPLERS["fitted"], den, x, sig, param=param, **fit["options"])
    ref = run(SAMPLERS["dpmpp_2m" if rule == "dpmpp_2m" else "euler"], den, x, sig, param=param)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_fit_is_tail_safe_on_held_out_noise():
    """16-D VP, NFE 4, where a mean-only fit had a median of 0.04 but a p99 above UniPC's: fitted on 128 noises, on
    1000 others the solver is better than DPM-Solver++(2M) + UniC (diffusers' UniPC twin) on the logsnr and the
    trailing schedule both in mean L2 and at the 99th percentile, against the exact RK4 ODE solution."""
    param, gmm = VP(), GaussianMixture.random(dim=16)
    den = gmm.denoiser(param)
    cal, x = _noise(param, 128, dim=16, seed=11), _noise(param, 1000, dim=16, seed=12)
    fit = search.fit_solver(den, param, 4, x=cal, iterations=240)
    exact = gmm.ode_solve(x, "vp", float(param.sigma_max), steps=400)
    out = run(SAMPLERS["fitted"], den, x, torch.tensor(fit["sigmas"], dtype=torch.float64), param=param,
              **fit["options"])
    e = (out - exact).norm(dim=1)
    for name in ("logsnr", "trailing"):
        base = run(SAMPLERS["dpmpp_2m_unic"], den, x, schedules.make_sigmas(name, 4, param).double(), param=param)
        e_base = (base - exact).norm(dim=1)
        assert e.mean() < e_base.mean(), (name, e.mean(), e_base.mean())
        assert torch.quantile(e, 0.99) < torch.quantile(e_base, 0.99), (name, torch.quantile(e, 0.99),
                                                                        torch.quantile(e_base, 0.99))


@pytest.mark.parametrize("param", [VP(), Flow()], ids=["vp", "flow"])
def test_shifts_ask_the_model_at_the_shifted_noise_level(param):
    """shifts[i] scales rho = sigma / alpha of step i's model call by exp(shifts[i]) and nothing else: a DDIM step
    worked by hand with D at the shifted level gives the same result, and zero shifts change no bit."""
    den = GaussianMixture.circle().denoiser(param)
    x = _noise(param, 8)
    sigmas = schedules.make_sigmas("logsnr", 3, param).double()
    shifts = [0.0, -0.3, 0.2]
    asked = []

    def recording(x, s):
        asked.append(float(s[0]))
        return den(x, s)

    out = run(SAMPLERS["fitted"], recording, x, sigmas, param=param, shifts=shifts)
    ref = x.clone()
    for i, (s, s_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        rho = s / (1 - s) if param.kind == "flow" and s < 1 else s
        rho_eval = rho * math.exp(shifts[i])
        s_eval = s if param.kind == "flow" and s >= 1 else (rho_eval if param.kind == "vp" else rho_eval / (1 + rho_eval))
        assert asked[i] == pytest.approx(s_eval, rel=1e-12)
        d = den(ref, torch.full((len(ref),), s_eval, dtype=torch.float64))
        alpha = (lambda v: 1 - v) if param.kind == "flow" else (lambda v: 1.0)
        ref = (s_next / s) * ref + (alpha(s_next) - alpha(s) * s_next / s) * d
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    plain = run(SAMPLERS["fitted"], den, x, sigmas, param=param)
    assert torch.equal(run(SAMPLERS["fitted"], den, x, sigmas, param=param, shifts=[0.0, 0.0, 0.0]), plain)
    with pytest.raises(InvalidParameterError, match="shifts has 4 entries"):
        run(SAMPLERS["fitted"], den, x, sigmas, param=param, shifts=[0.0] * 4)


def test_time_shift_and_fitted_start_beat_the_plain_fit_on_held_out_noise():
    """16-D VP clusters at NFE 4, where the plain fit's typical sample was no closer to the exact ODE than diffusers'
    DEIS on 'leading' spacing: fitting the model's noise level per step (and the first sigma, the noise scaled to
    it as a host does), with the tail weighted 3x (time shifts alone can trade the tail for the mean), lowers the
    mean error against the exact RK4 solution on other noise by a fifth or more,
    without a heavier tail (the mean of the worst 5 %, steadier than a p99 of 1000 draws, within 10 %), and the
    first sigma stays at or below the start."""
    param, gmm = VP(), GaussianMixture.family("clusters", 16, 1)
    den = gmm.denoiser(param)
    cal, x = _noise(param, 512, dim=16, seed=21), _noise(param, 1000, dim=16, seed=22)
    exact = gmm.ode_solve(x, "vp", float(param.sigma_max), steps=400)

    def held_out(fit):
        x0 = x * (fit["sigmas"][0] / float(param.sigma_max))
        out = run(SAMPLERS["fitted"], den, x0, torch.tensor(fit["sigmas"], dtype=torch.float64), param=param,
                  **fit["options"])
        e = (out - exact).norm(dim=1)
        return float(e.mean()), float(e.topk(50).values.mean())

    plain = held_out(search.fit_solver(den, param, 4, x=cal, iterations=240))
    fit = search.fit_solver(den, param, 4, x=cal, iterations=240, time_shift=True, fit_start=True, tail=3)
    assert len(fit["options"]["shifts"]) == 4 and fit["sigmas"][0] <= float(param.sigma_max)
    shifted = held_out(fit)
    assert shifted[0] < 0.8 * plain[0] and shifted[1] < 1.1 * plain[1], (shifted, plain)
