"""Samplers: one method, three drivers; parity with diffusers; convergence on analytic data; bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from analytic import GaussianData  # noqa: E402

from nimblediff.core import schedules  # noqa: E402
from nimblediff.core.parameterization import VP, Flow  # noqa: E402
from nimblediff.core.sampling import SAMPLERS, k_diffusion_sampler, noise_from_seed, run  # noqa: E402
from nimblediff.errors import InvalidParameterError, SamplingError  # noqa: E402

CASES = [("lcm", {}), ("tcd", {"gamma": 0.0}), ("tcd", {"gamma": 0.3}), ("tcd", {"gamma": 1.0}), ("euler", {})]


def _seeded_noise(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g)


@pytest.mark.parametrize("name,options", CASES)
def test_three_drivers_identical(name, options):
    """Core loop, ComfyUI's k-diffusion signature and the diffusers scheduler give bit-identical samples."""
    from nimblediff.pipelines import NimbleScheduler

    param = Flow(prediction="sample")          # c_in = 1 and x0 output: no sample-space conversion to round
    data = GaussianData()
    model = data.denoiser(param)
    sigmas = schedules.flow_sigmas(4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    a = run(SAMPLERS[name], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 1), **options)
    ksampler = k_diffusion_sampler(SAMPLERS[name], lambda _model: param, **options)
    b = ksampler(model, x, sigmas, extra_args={}, noise_sampler=_seeded_noise(x.shape, 1))

    sched = NimbleScheduler(model_type="flow", prediction_type="sample", sampler=name, schedule="lcm",
                            gamma=options.get("gamma", 0.3))
    sched.set_timesteps(sigmas=sigmas)
    g = torch.Generator().manual_seed(1)
    c = x
    for t in sched.timesteps:
        sigma = param.t_to_sigma(t).float()
        out = model(c, sigma.expand(len(c)))
        c = sched.step(out, t, c, generator=g).prev_sample
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_comfy_seed_noise_matches_default_noise_sampler():
    """ComfyUI's default_noise_sampler: a torch.Generator seeded once, one randn per call (hand-written twin)."""
    x = torch.zeros(1, 4, 8, 8)
    noise = noise_from_seed(x, seed=123)
    g = torch.Generator().manual_seed(123)
    assert torch.equal(noise(1.0, 0.5), torch.randn(x.size(), generator=g))
    assert torch.equal(noise(0.5, 0.1), torch.randn(x.size(), generator=g))


def test_timesteps_match_diffusers():
    from diffusers import DDIMScheduler, LCMScheduler

    for steps in (1, 2, 4, 8):
        lcm = LCMScheduler()
        lcm.set_timesteps(steps)
        assert schedules.lcm_timesteps(steps) == lcm.timesteps.tolist()
        ddim = DDIMScheduler(timestep_spacing="trailing")
        ddim.set_timesteps(steps)
        assert schedules.trailing_timesteps(steps) == ddim.timesteps.tolist()


def test_vp_sigmas_match_diffusers_table():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="trailing")
    euler.set_timesteps(4)
    ours = schedules.sigmas_from_timesteps(VP(), euler.timesteps.tolist())
    torch.testing.assert_close(ours.float(), euler.sigmas.float(), rtol=1e-6, atol=1e-6)


def test_euler_converges_at_first_order():
    """Error against the exact ODE solution halves when NFE doubles (Euler is first order)."""
    param, data = VP(), GaussianData()
    x0 = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 14.6
    errors = []
    for n in (8, 16, 32, 64):
        sigmas = schedules.karras_sigmas(n, 0.03, 14.6)
        sigmas[-1] = 0.03                              # stop at sigma_min: the exact solution is finite there
        out = run(SAMPLERS["euler"], data.denoiser(param), x0, sigmas, param=param)
        exact = data.vp_ode_solution(x0, 14.6, 0.03)
        errors.append((out - exact).abs().mean().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.6 < r < 2.4 for r in ratios), (errors, ratios)


def test_tcd_gamma_zero_is_ddim_and_gamma_one_is_lcm():
    """Hand-worked limits of the TCD rule: gamma 1 re-noises fully (LCM), gamma 0 is deterministic."""
    param, data = VP(), GaussianData()
    model = data.denoiser(param)
    sigmas = schedules.make_sigmas("lcm", 4, param)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    lcm = run(SAMPLERS["lcm"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 3))
    tcd1 = run(SAMPLERS["tcd"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 3), gamma=1.0)
    # gamma 1: s = 0 every step, so TCD jumps to sigma(t=0) and re-noises: LCM up to the sigma_min residue
    assert (lcm - tcd1).abs().max() < 0.1
    d1 = run(SAMPLERS["tcd"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 4), gamma=0.0)
    d2 = run(SAMPLERS["tcd"], model, x, sigmas, param=param, noise=_seeded_noise(x.shape, 5), gamma=0.0)
    assert torch.equal(d1, d2)


def test_nan_from_model_names_the_step():
    param = VP()
    sigmas = schedules.make_sigmas("lcm", 4, param)
    calls = []

    def model(x, sigma):
        calls.append(1)
        return x * float("nan") if len(calls) == 3 else x * 0

    with pytest.raises(SamplingError, match="step 2"):
        run(SAMPLERS["lcm"], model, torch.zeros(1, 4), sigmas, param=param, seed=0)


@pytest.mark.parametrize("bad", [[1.0, 2.0, 0.0], [1.0], [3.0, float("nan"), 0.0], [2.0, -1.0]])
def test_bad_sigmas(bad):
    with pytest.raises(InvalidParameterError, match="sigmas"):
        schedules.check_sigmas(bad)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_steps(steps):
    with pytest.raises(InvalidParameterError, match="steps"):
        schedules.make_sigmas("lcm", steps, VP())


def test_callback_each_step_and_interrupt():
    param = VP()
    sigmas = schedules.make_sigmas("trailing", 4, param)
    seen = []
    run(SAMPLERS["euler"], lambda x, s: x * 0, torch.zeros(1, 2), sigmas, param=param, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]

    class Stop(Exception):
        pass

    def interrupt(d):
        if d["i"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run(SAMPLERS["euler"], lambda x, s: x * 0, torch.zeros(1, 2), sigmas, param=param, callback=interrupt)


def test_core_imports_without_frameworks():
    """nimblediff.core and nimblediff never import comfy or diffusers (checked in a fresh interpreter)."""
    code = ("import sys, nimblediff, nimblediff.core.sampling, nimblediff.core.schedules, nimblediff.core.adapters; "
            "import nimblediff.core.recipes, nimblediff.core.parameterization; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'diffusers', 'transformers', 'peft')]; "
            "assert not bad, bad; print(len(nimblediff.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3
