"""The sampler family (multistep, stochastic, SMC): parity with diffusers where the methods coincide; convergence
order on an analytic Gaussian; determinism; SMC on an analytic Gaussian product; bad input. (The three-driver
identity of every sampler is tested in test_sampling.py.)"""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from analytic import GaussianData  # noqa: E402

from nimblediff.core import schedules  # noqa: E402
from nimblediff.core.gmm import GaussianMixture  # noqa: E402
from nimblediff.core.parameterization import VP, Flow  # noqa: E402
from nimblediff.core.sampling import SAMPLER_OPTIONS, SAMPLERS, run  # noqa: E402
from nimblediff.errors import InvalidParameterError, SamplingError  # noqa: E402

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")



def _seeded_noise(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g)


def test_registry_is_complete():
    assert set(SAMPLERS) == set(SAMPLER_OPTIONS)
    for name, options in SAMPLER_OPTIONS.items():         # every default is accepted by its sampler
        x = torch.zeros(2, 3)
        run(SAMPLERS[name], lambda x, s: x * 0, x, schedules.flow_sigmas(3), param=Flow(), seed=0, **options)


def test_scheduler_publishes_every_evaluation():
    """Multi-evaluation samplers ask at the sigmas they announce (pc: predictor at sigma_i, corrector at
    sigma_{i+1}; scott with substeps: the interval's interior points)."""
    from nimblediff.pipelines import NimbleScheduler

    param = Flow()
    sigmas = schedules.flow_sigmas(4)                    # 1, .75, .5, .25, 0
    sched = NimbleScheduler(model_type="flow", sampler="pc", schedule="flow")
    sched.set_timesteps(4)
    assert [round(float(t)) for t in sched.timesteps] == [1000, 750, 750, 500, 500, 250, 250]
    sched = NimbleScheduler(model_type="flow", sampler="scott", schedule="flow", sampler_options={"substeps": 1})
    sched.set_timesteps(sigmas=sigmas)
    asked = []
    run(SAMPLERS["scott"], lambda x, s: (asked.append(float(s[0])), x * 0)[1], torch.zeros(1, 2), sigmas,
        param=param, seed=0, substeps=1)
    assert len(asked) == 8
    torch.testing.assert_close(sched.timesteps.double(), torch.tensor(asked, dtype=torch.float64) * 1000,
                               rtol=1e-5, atol=1e-3)


# --- parity with diffusers --------------------------------------------------------------------------------------

def _drive_vp(sched, steps, model, noise):
    """diffusers scheduler on an exact eps model; float64 sigma table so its coefficients are not rounded."""
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sig = sched.sigmas
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        xk = x * (1 + sig[i] ** 2) ** 0.5
        eps = (xk - model(xk, sig[i])) / sig[i]
        x = sched.step(eps, t, x).prev_sample
    return x * (1 + sig[-1] ** 2) ** 0.5, sig


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(order):
    """DEISMultistepScheduler (VP, eps, trailing, its lower-order final steps) vs ours on the same sigmas."""
    from diffusers import DEISMultistepScheduler

    param = VP()
    model = GaussianMixture.random(dim=16).denoiser(param)
    noise = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3, 4, 8, 16):
        sched = DEISMultistepScheduler(**SD, timestep_spacing="trailing", solver_order=order)
        theirs, sig = _drive_vp(sched, steps, model, noise)
        ours = run(SAMPLERS["deis"], model, noise * (1 + sig[0] ** 2) ** 0.5, sig, param=param, order=order)
        assert (ours - theirs).abs().max() < 1e-5, (steps, (ours - theirs).abs().max())


def test_dpmpp_2m_matches_diffusers():
    from diffusers import DPMSolverMultistepScheduler

    param = VP()
    model = GaussianMixture.random(dim=16).denoiser(param)
    noise = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3, 4, 8, 20):
        sched = DPMSolverMultistepScheduler(**SD, timestep_spacing="trailing", solver_order=2)
        theirs, sig = _drive_vp(sched, steps, model, noise)
        assert float(sig[-1]) == 0
        ours = run(SAMPLERS["dpmpp_2m"], model, noise * (1 + sig[0] ** 2) ** 0.5, sig, param=param)
        assert (ours - theirs).abs().max() < 1e-5, (steps, (ours - theirs).abs().max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_flowmatch_euler(shift):
    """Rectified-flow Euler on the "flowmatch" schedule is FlowMatchEulerDiscreteScheduler step for step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    param = Flow(shift=shift)
    model = GaussianMixture.random(dim=16).denoiser(param)
    noise = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 4, 8):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
        sigmas = schedules.make_sigmas("flowmatch", steps, param)
        assert torch.equal(sigmas, sched.sigmas)
        x = noise.clone()
        for i, t in enumerate(sched.timesteps):
            v = (x - model(x, sched.sigmas[i])) / sched.sigmas[i]
            x = sched.step(v, t, x).prev_sample
        ours = run(SAMPLERS["euler"], model, noise, sigmas, param=param)
        assert (ours - x).abs().max() <= 1e-5


def test_flow_schedule_has_no_wasted_step():
    """FlowMatchEuler's grid ends at 1/1000, so at 2 steps the 2nd evaluation does nothing; flow_sigmas does."""
    param = Flow()
    g = GaussianMixture.random(dim=16)
    noise = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    ref = g.ode_solve(noise.double(), "flow", 1.0, steps=40).float()
    err = {name: [(run(SAMPLERS["euler"], g.denoiser(param), noise, schedules.make_sigmas(name, n, param),
                       param=param) - ref).norm(dim=1).mean() for n in (1, 2)] for name in ("flowmatch", "flow")}
    assert abs(float(err["flowmatch"][1] - err["flowmatch"][0])) < 0.01
    assert float(err["flow"][1]) < 0.7 * float(err["flow"][0])


# --- convergence on an analytic Gaussian ------------------------------------------------------------------------

M, S2 = 0.5, 0.16


def _gauss_model(param):
    def model(x, sigma, **_):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        a = 1 - sigma if param.kind == "flow" else 1.0
        return M + a * S2 / (a * a * S2 + sigma**2) * (x - a * M)
    return model


def _log_grid(param, n, rho_max=14.6, rho_min=0.05):
    rho = torch.logspace(math.log10(rho_max), math.log10(rho_min), n + 1, dtype=torch.float64)
    return rho if param.kind == "vp" else rho / (1 + rho)


def _errors(param, name, options, ns=(16, 32, 64)):
    """Mean error against the exact ODE transport (x - a m scales by the ratio of std devs) per step count."""
    sig = _log_grid(param, 1)
    sf, st = float(sig[0]), float(sig[-1])
    af, at = (1 - sf, 1 - st) if param.kind == "flow" else (1.0, 1.0)
    z = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = af * M + (af**2 * S2 + sf**2) ** 0.5 * z
    exact = at * M + (at**2 * S2 + st**2) ** 0.5 * z
    return [float((run(SAMPLERS[name], _gauss_model(param), x, _log_grid(param, n), param=param, seed=0,
                       **options) - exact).abs().mean()) for n in ns]


ORDERS = [  # (sampler, options, lowest accepted order, highest)
    ("euler", {}, 0.9, 1.2), ("dpmpp_2m", {}, 1.8, 2.3), ("dpmpp_2m", {"beta": 0.5}, 0.85, 1.2),
    ("deis", {"order": 1}, 0.9, 1.2), ("deis", {"order": 2, "lower_order_final": False}, 1.8, 2.3),
    ("deis", {"order": 3, "lower_order_final": False}, 3.0, 4.2), ("plms", {"order": 2}, 1.8, 2.3),
    ("plms", {"order": 2, "beta": 0.5}, 0.8, 1.2), ("ghvb", {"order": 2, "beta": 0.5}, 1.8, 2.3),
    ("scott", {"eta": 0.0}, 0.9, 1.2),
]


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("name,options,lo,hi", ORDERS)
def test_convergence_order(kind, name, options, lo, hi):
    """The error falls at the method's order as NFE doubles (HB momentum: first order, as the paper proves;
    GHVB keeps its order; SCott at eta 0 is DDIM)."""
    errors = _errors(VP() if kind == "vp" else Flow(), name, options)
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(lo < p < hi for p in orders), (errors, orders)


def test_unic_corrector_beats_its_predictor():
    for param in (VP(), Flow()):
        plain = _errors(param, "dpmpp_2m", {})
        corrected = _errors(param, "dpmpp_2m_unic", {})
        assert all(c < 0.5 * p for c, p in zip(corrected, plain)), (plain, corrected)


# --- stochastic samplers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", [("scott", {}), ("scott", {"substeps": 2}), ("pc", {}),
                                          ("fkc", {"mode": "anneal", "beta": 1.5})])
def test_seeded_determinism(name, options):
    param, model = VP(), GaussianData().denoiser(VP())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = schedules.make_sigmas("logsnr", 6, param)
    a = run(SAMPLERS[name], model, x, sigmas, param=param, seed=3, **options)
    b = run(SAMPLERS[name], model, x, sigmas, param=param, seed=3, **options)
    c = run(SAMPLERS[name], model, x, sigmas, param=param, seed=4, **options)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scott_limits():
    """eta 0 is deterministic DDIM (DEIS order 1); a large eta is LCM's full re-noise (same noise stream);
    pc without corrector steps is scott at eta 1 (the ancestral predictor)."""
    param, model = VP(), GaussianData().denoiser(VP())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = schedules.make_sigmas("trailing", 4, param)
    ddim = run(SAMPLERS["deis"], model, x, sigmas, param=param, order=1)
    torch.testing.assert_close(run(SAMPLERS["scott"], model, x, sigmas, param=param, seed=1, eta=0.0), ddim)
    lcm = run(SAMPLERS["lcm"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 2))
    big = run(SAMPLERS["scott"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 2), eta=1e6)
    torch.testing.assert_close(big, lcm)
    pc0 = run(SAMPLERS["pc"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 5), corrector_steps=0)
    anc = run(SAMPLERS["scott"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 5), eta=1.0)
    torch.testing.assert_close(pc0, anc)


def test_scott_improves_with_steps():
    """Ancestral re-noising (eta 1) converges to the data law as steps are added (at first order: the std of
    N(.5, .4^2) comes out 0.29 / 0.33 / 0.36 / 0.38 at 8 / 16 / 32 / 64 steps)."""
    param, data = VP(), GaussianData(mean=0.5, std=0.4)
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)) * 14.6

    def std_error(eta, n):
        out = run(SAMPLERS["scott"], data.denoiser(param), x, schedules.make_sigmas("logsnr", n, param),
                  param=param, seed=1, eta=eta)
        return abs(float(out.std()) - 0.4)

    errors = [std_error(1.0, n) for n in (8, 16, 32, 64)]
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.03


def test_pc_corrector_moves_towards_the_marginal():
    """A Langevin corrector at fixed sigma pulls a too-narrow cloud towards the marginal's variance (64-D, where
    the per-sample norms of the step-size rule concentrate)."""
    param, data = VP(), GaussianData(mean=0.0, std=0.4)
    sigma = 0.5
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)) * 0.3      # true std: sqrt(.16 + .25)
    target = (0.16 + (sigma * 0.999) ** 2) ** 0.5
    out = run(SAMPLERS["pc"], data.denoiser(param), x, torch.tensor([sigma, sigma * 0.999]), param=param,
              seed=0, snr=0.16, corrector_steps=30)
    assert abs(float(out.std()) - target) < 0.3 * abs(float(x.std()) - target)


# --- SMC / Feynman-Kac correctors -------------------------------------------------------------------------------

def _two_gaussians(param):
    """Experts N(1, .36) and N(-.5, .64) in 1-D; the model takes the stacked batch [experts 1; experts 2]."""
    d1 = GaussianMixture([[1.0]], [0.6], [1.0]).denoiser(param)
    d2 = GaussianMixture([[-0.5]], [0.8], [1.0]).denoiser(param)

    def model(x, sigma):
        p = x.shape[0] // 2
        return torch.cat([d1(x[:p], sigma), d2(x[p:], sigma)])

    return model, d1


@pytest.mark.parametrize("mode,option,precision_weights", [("product", {}, (1.0, 1.0)),
                                                           ("cfg", {"guidance": 2.0}, (2.0, -1.0))])
def test_fkc_gaussian_product(mode, option, precision_weights):
    """prod_i N(m_i, v_i)^g_i is N(sum g_i m_i / v_i / P, 1 / P) with P = sum g_i / v_i. Without the FK weights
    (plain summed scores) the variance is off by 37 %; the tolerance here is 12 %."""
    param = VP()
    model, _ = _two_gaussians(param)
    (g1, g2), (m1, v1), (m2, v2) = precision_weights, (1.0, 0.36), (-0.5, 0.64)
    precision = g1 / v1 + g2 / v2
    mean, var = (g1 * m1 / v1 + g2 * m2 / v2) / precision, 1 / precision
    sigmas = schedules.exponential_sigmas(200, 0.005, 14.6).double()
    x = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 14.6
    out = run(SAMPLERS["fkc"], model, x, sigmas, param=param, seed=0, mode=mode, **option)
    assert out.shape == x.shape
    assert abs(float(out.mean()) - mean) < 0.05
    assert abs(float(out.var()) / var - 1) < 0.12, (float(out.var()), var)


def test_fkc_annealing_flow():
    """p^beta of N(1, .36) is N(1, .36 / beta), on a rectified-flow model starting at sigma = 1. The ancestral
    dynamics under both runs is first order (the beta = 1 run's variance is 2 % low at 400 steps), so the test
    compares the variance ratio beta 2 / beta 1 with 1/2; without weights it would be far off."""
    param = Flow()
    _, d1 = _two_gaussians(param)
    rho = torch.logspace(math.log10(300), math.log10(0.005), 400, dtype=torch.float64)
    sigmas = torch.cat([torch.ones(1, dtype=torch.float64), rho / (1 + rho), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(10000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sharp = run(SAMPLERS["fkc"], d1, x, sigmas, param=param, seed=0, mode="anneal", beta=2.0)
    plain = run(SAMPLERS["fkc"], d1, x, sigmas, param=param, seed=0, mode="anneal", beta=1.0)
    assert abs(float(sharp.mean()) - 1.0) < 0.05
    assert abs(float(sharp.var()) / float(plain.var()) / 0.5 - 1) < 0.1


def test_fkc_batch_convention_error():
    with pytest.raises(SamplingError, match="stacks the experts"):
        run(SAMPLERS["fkc"], lambda x, s: x[:3] * 0, torch.zeros(4, 2), schedules.flow_sigmas(3), param=Flow(),
            seed=0, mode="product")


# --- schedules and bad input ------------------------------------------------------------------------------------

def test_new_schedules():
    vp, flow = VP(), Flow()
    t = torch.linspace(999, 0, 5)[:-1]                  # ComfyUI sgm_uniform: linspace(t_max, t_min, n + 1)[:-1]
    torch.testing.assert_close(schedules.make_sigmas("sgm_uniform", 4, vp)[:-1], vp.t_to_sigma(t).float())
    for param in (vp, flow):
        for n in (1, 2, 4, 8, 16):
            sig = schedules.make_sigmas("logsnr", n, param)
            schedules.check_sigmas(sig)
            assert len(sig) == n + 1 and float(sig[-1]) == 0
            assert float(sig[0]) == pytest.approx(float(param.sigma_max))
    with pytest.raises(InvalidParameterError, match="flow models only"):
        schedules.make_sigmas("flowmatch", 4, vp)
    with pytest.raises(InvalidParameterError, match="rho_min"):
        schedules.logsnr_sigmas(4, vp, rho_min=20.0)


@pytest.mark.parametrize("steps", [0, -2])
def test_bad_steps_new_schedules(steps):
    for name in ("logsnr", "sgm_uniform", "flowmatch"):
        with pytest.raises(InvalidParameterError, match="steps"):
            schedules.make_sigmas(name, steps, Flow())


@pytest.mark.parametrize("name,options,word", [
    ("dpmpp_2m", {"beta": 0.0}, "beta"), ("deis", {"order": 4}, "order"), ("plms", {"order": 5}, "order"),
    ("plms", {"momentum": "nesterov"}, "momentum"), ("ghvb", {"beta": 1.5}, "beta"), ("scott", {"eta": -1}, "eta"),
    ("scott", {"substeps": 1.5}, "substeps"), ("pc", {"snr": -0.1}, "snr"), ("pc", {"corrector_steps": -1},
                                                                               "corrector_steps"),
    ("fkc", {"mode": "tempered"}, "mode"), ("fkc", {"ess_threshold": 2.0}, "ess_threshold"),
    ("fkc", {"mode": "cfg", "guidance": 0.5, "beta": 1.0}, None),
])
def test_bad_options(name, options, word):
    x = torch.zeros(2, 2)
    if word is None:                                    # a valid combination: must run
        run(SAMPLERS[name], lambda x, s: x * 0, x, schedules.flow_sigmas(2), param=Flow(), seed=0, **options)
        return
    with pytest.raises(InvalidParameterError, match=word):
        run(SAMPLERS[name], lambda x, s: x * 0, x, schedules.flow_sigmas(2), param=Flow(), seed=0, **options)


def test_nan_from_model_stops_new_samplers():
    for name in ("dpmpp_2m", "deis", "plms", "scott", "fkc"):
        with pytest.raises(SamplingError, match="step 1"):
            run(SAMPLERS[name], lambda x, s: x * float("nan") if float(s[0]) < 1 else x * 0, torch.zeros(2, 2),
                schedules.flow_sigmas(3), param=Flow(), seed=0)
