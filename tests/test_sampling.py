"""Samplers: one method, three drivers; parity with diffusers; convergence on analytic data; bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from analytic import GaussianData  # noqa: E402

from nimblediff.core import schedules  # noqa: E402
from nimblediff.core.parameterization import VP  # noqa: E402
from nimblediff.core.sampling import (  # noqa: E402
    SAMPLER_OPTIONS, SAMPLERS, k_diffusion_sampler, noise_from_seed, run)
from nimblediff.errors import InvalidParameterError, SamplingError  # noqa: E402


def _seeded_noise(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, dtype=dtype)


# --- one method, three drivers ------------------------------------------------------------------------------------

# Every registered sampler with its defaults, plus the corners of its options. The step counts include TCD on a flow
# model at gamma 0.3 and 5 steps, which once differed in the last bit between the scheduler (python-float sigmas)
# and run() (tensor sigmas).
DRIVER_CASES = [(name, {}) for name in SAMPLERS] + [
    ("tcd", {"gamma": 0.0}), ("tcd", {"gamma": 0.5}), ("tcd", {"gamma": 1.0}),
    ("dpmpp_2m", {"beta": 0.8}), ("deis", {"order": 1}), ("deis", {"order": 3, "lower_order_final": False}),
    ("plms", {"order": 2, "beta": 0.7}), ("plms", {"momentum": "ghvb", "beta": 0.5}),
    ("scott", {"eta": 0.0}), ("scott", {"eta": 50.0}), ("scott", {"substeps": 2}),
    ("pc", {"corrector_steps": 2}), ("fkc", {"mode": "anneal", "beta": 2.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [1, 4, 5])
@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("name,options", DRIVER_CASES)
def test_three_drivers_identical(name, options, kind, steps, dtype):
    """Core loop, ComfyUI's k-diffusion signature and the diffusers scheduler give bit-identical samples.

    The network works in the pipeline's sample space (x_t = c_in(sigma) x) and predicts x0 ("sample"), so the
    scheduler adds no rounding of its own. The k-space model that run() drives shows the network what the pipeline
    would: its own latent first (the k-space start x was derived from it), then x converted the way the scheduler
    converts it, with the timesteps the scheduler published.
    """
    from nimblediff.pipelines import NimbleScheduler

    if kind == "vp" and options.get("substeps") and dtype == torch.float32:
        pytest.skip("run() hands the model sigma in x's dtype: substep sigmas are exact only in float64")
    sched = NimbleScheduler(model_type=kind, prediction_type="sample", sampler=name, sampler_options=options,
                            timestep_scaling=0)          # no LCM boundary condition: the network's x0 is final
    param = sched.param
    # float32 sigmas (set_timesteps casts), so that the sigma run() hands the model in x's dtype is exact
    sched.set_timesteps(sigmas=schedules.make_sigmas("flow" if kind == "flow" else "trailing", steps, param))
    k_denoiser = GaussianData().denoiser(param)

    def network(x_t, t):
        sigma = param.t_to_sigma(t).to(x_t.dtype).reshape(1)
        return k_denoiser(x_t / param.c_in(sigma), sigma.expand(len(x_t)))

    x_t = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    c0 = param.c_in(float(sched.sigmas[0]))
    x = x_t if c0 == 1.0 else x_t / c0                  # as NimbleScheduler converts (no kernel when c_in = 1)

    def k_model():
        calls = enumerate(sched.timesteps)

        def model(x, sigma):
            i, t = next(calls)
            if i == 0:
                return network(x_t, t)                  # the pipeline's own latent
            c = param.c_in(float(sigma[0]))
            return network(x if c == 1.0 else x * c, t)  # NimbleScheduler's prev_sample
        return model

    options = {**SAMPLER_OPTIONS[name], **options}

    a = run(SAMPLERS[name], k_model(), x, sched.sigmas, param=param, noise=_seeded_noise(x.shape, 1, dtype),
            **options)
    ksampler = k_diffusion_sampler(SAMPLERS[name], lambda _model: param, **options)
    b = ksampler(k_model(), x, sched.sigmas, extra_args={}, noise_sampler=_seeded_noise(x.shape, 1, dtype))

    g = torch.Generator().manual_seed(1)
    c = x_t
    for t in sched.timesteps:
        c = sched.step(network(c, t), t, c, generator=g).prev_sample
    final = getattr(SAMPLERS[name], "final_sigma", None)     # TCD ends at sigma(t=0), in sample space there
    c_final = param.c_in(final(sched.sigmas, param)) if final is not None else 1.0
    assert torch.equal(a, b)
    assert torch.equal(a if c_final == 1.0 else a * c_final, c)


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
