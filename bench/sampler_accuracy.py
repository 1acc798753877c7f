"""Sampler accuracy at small NFE: NimbleDiff samplers + schedules against diffusers' schedulers, same process.

Data: analytic isotropic Gaussian mixtures (nimblediff.core.gmm, K=8; 2-D means on a circle of radius 2, 16-D
N(0, I) means; component std 0.15-0.40, unequal weights), whose E[x0 | x_t] is exact, so every error is the
sampler's. Models: the SD VP schedule (scaled_linear 0.00085..0.012, T=1000, eps prediction) and rectified flow
(velocity). Metrics per NFE: mean L2 to a reference solve of the probability-flow ODE from the same noise (RK4 in
log rho, 1000 steps), and sliced Wasserstein-2 to the data law (exact quantiles of 64 projections; the noise is
quasi-random, so the finite-sample floor is small; it is printed). LCM,
TCD, SCott and PC are stochastic (not ODE solvers): judged on SW2 only. Searched schedules (BOSS, AutoDiffusion)
and fitted solvers (step sizes + mixing weights, `schedule_search.fit_solver`) are fitted on a separate calibration
batch (other seed) and evaluated on the benchmark noise. A fit with the prior shift starts from x + D(x), not from
the reference's start, so it too is judged on SW2 only.

Usage: python bench/sampler_accuracy.py [--quick] [--out results.md]
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from nimblediff.core import schedule_search as search
from nimblediff.core import schedules
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import SAMPLERS, run

NFES = (1, 2, 3, 4, 6, 8, 12, 16)
SEARCHED = ("BOSS", "AutoDiffusion", "fit", "fit + prior shift")   # schedule labels of searched rows
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# --- problem and metrics -------------------------------------------------------------------------------------------

class Problem:
    """One data set + model type: the benchmark noise, its reference ODE solution and the SW2 machinery.

    The initial noise is scrambled-Sobol Gaussian (quasi-random, seeded) and SW2 compares against the exact
    quantiles of the mixture's 1-D projections, so the finite-sample floor of SW2 is small and the metric
    measures the sampler's distribution error (printed floor: SW2 of the reference solution itself, and of an
    i.i.d. exact data sample for comparison). All samplers, ours and diffusers', start from the same noise.
    """

    def __init__(self, dim: int, kind: str, n: int, ref_steps: int):
        self.dim, self.kind = dim, kind
        self.gmm = GaussianMixture.circle() if dim == 2 else GaussianMixture.random(dim=dim)
        self.param = VP() if kind == "vp" else Flow()
        self.denoiser = self.gmm.denoiser(self.param)
        u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=1234).draw(n, dtype=torch.float64)
        self.noise = (2**0.5 * torch.erfinv(2 * u.clamp(1e-9, 1 - 1e-9) - 1)).float()   # N(0, I) latents
        smax = float(self.param.sigma_max)
        # k-space start: VP latents are N(0, I) in the model's input space, x_k = latents * sqrt(1 + sigma^2)
        self.x = self.noise * (1 + smax**2) ** 0.5 if kind == "vp" else self.noise.clone()
        self.ref = self.gmm.ode_solve(self.x.double(), kind, smax, steps=ref_steps).float()
        theta = torch.randn(dim, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.theta = theta / theta.norm(dim=0)
        self.quantiles = self._exact_quantiles(n)
        self.floor = self.sw2(self.ref)
        self.iid_floor = self.sw2(self.gmm.sample(n, torch.Generator().manual_seed(99)))
        cal = torch.randn(128, dim, generator=torch.Generator().manual_seed(4321))
        self.calibration = cal * (1 + smax**2) ** 0.5 if kind == "vp" else cal

    def _exact_quantiles(self, n: int) -> np.ndarray:
        """Quantiles at (i - 1/2) / n of every projection of the mixture (a 1-D mixture), by bisection."""
        m = (self.gmm.means @ self.theta).T[:, None, :]                 # (projections, 1, K)
        s, w = self.gmm.stds, self.gmm.weights
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        lo = torch.full((m.shape[0], n), float(m.min() - 10 * s.max()), dtype=torch.float64)
        hi = torch.full_like(lo, float(m.max() + 10 * s.max()))
        for _ in range(44):                                          # 2^-44 of the bracket
            mid = (lo + hi) / 2
            cdf = (w * 0.5 * (1 + torch.erf((mid[..., None] - m) / (s * 2**0.5)))).sum(-1)
            below = cdf < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return ((lo + hi) / 2).numpy()

    @property
    def name(self) -> str:
        return f"{self.dim}-D {'VP (SD schedule, eps)' if self.kind == 'vp' else 'rectified flow'}"

    def l2(self, out: torch.Tensor) -> float:
        return float((out.float() - self.ref).norm(dim=1).mean())

    def sw2(self, out: torch.Tensor) -> float:
        """Sliced W2 to the data law: root mean over 64 random directions of the 1-D W2^2 between the sorted
        projections and the exact quantiles (numpy's sort is ~4x torch's here)."""
        proj = np.sort((self.theta.T @ out.double().T).numpy(), axis=1)
        return float(((proj - self.quantiles) ** 2).mean() ** 0.5)


def vp_model_eps(problem: Problem, x_in: torch.Tensor, t) -> torch.Tensor:
    """A diffusers UNet stand-in: eps at VP-space input x_in and (possibly fractional) timestep t."""
    sigma = problem.param.t_to_sigma(torch.as_tensor(t, dtype=torch.float64).cpu()).item()
    xk = x_in.double() * (1 + sigma**2) ** 0.5
    d = problem.gmm.posterior_mean(xk, 1.0, sigma)
    return ((xk - d) / sigma).to(x_in.dtype)


def flow_model_v(problem: Problem, x: torch.Tensor, t) -> torch.Tensor:
    """A flow transformer stand-in: velocity eps - x0 at x and timestep t = 1000 sigma."""
    sigma = float(t) / 1000.0
    d = problem.gmm.posterior_mean(x.double(), 1 - sigma, sigma)
    return ((x.double() - d) / sigma).to(x.dtype)


# --- diffusers ----------------------------------------------------------------------------------------------------

def diffusers_entries(kind: str):
    """(label, factory, steps_for_nfe, stochastic, step kwargs) on their defaults, plus trailing spacing where the
    default is not (the spacing the perf anchors use)."""
    import diffusers as d

    heun = lambda n: (n + 1) // 2                                   # noqa: E731 - Heun evaluates 2 steps - 1 times
    one = lambda n: n                                               # noqa: E731
    if kind == "vp":
        return [
            # clip_sample=False as in SD's scheduler config (DDIM's default clips x0 to [-1, 1], a pixel convention)
            ("DDIM (leading)", lambda: d.DDIMScheduler(**SD, clip_sample=False), one, False, {}),
            ("DDIM trailing", lambda: d.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing"), one,
             False, {}),
            ("Euler", lambda: d.EulerDiscreteScheduler(**SD), one, False, {}),
            ("Euler trailing", lambda: d.EulerDiscreteScheduler(**SD, timestep_spacing="trailing"), one, False, {}),
            ("Heun", lambda: d.HeunDiscreteScheduler(**SD), heun, False, {}),
            ("DPM++2M", lambda: d.DPMSolverMultistepScheduler(**SD), one, False, {}),
            ("DPM++2M trailing", lambda: d.DPMSolverMultistepScheduler(**SD, timestep_spacing="trailing"), one,
             False, {}),
            ("DPM++2M Karras", lambda: d.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True), one, False, {}),
            ("UniPC", lambda: d.UniPCMultistepScheduler(**SD), one, False, {}),
            ("UniPC trailing", lambda: d.UniPCMultistepScheduler(**SD, timestep_spacing="trailing"), one, False, {}),
            ("DEIS", lambda: d.DEISMultistepScheduler(**SD), one, False, {}),
            ("DEIS trailing", lambda: d.DEISMultistepScheduler(**SD, timestep_spacing="trailing"), one, False, {}),
            ("LCM", lambda: d.LCMScheduler(**SD), one, True, {}),
            ("TCD (gamma 0.3)", lambda: d.TCDScheduler(**SD), one, True, {"eta": 0.3}),
        ]
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    return [
        ("FlowMatchEuler", lambda: d.FlowMatchEulerDiscreteScheduler(), one, False, {}),
        ("FlowMatchEuler shift 3", lambda: d.FlowMatchEulerDiscreteScheduler(shift=3.0), one, False, {}),
        ("FlowMatchHeun", lambda: d.FlowMatchHeunDiscreteScheduler(), heun, False, {}),
        ("UniPC (flow)", lambda: d.UniPCMultistepScheduler(**flow), one, False, {}),
        ("DPM++2M (flow)", lambda: d.DPMSolverMultistepScheduler(**flow), one, False, {}),
    ]


def run_diffusers(problem: Problem, factory, steps: int, kwargs, seed: int = 0):
    sched = factory()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = problem.noise * float(getattr(sched, "init_noise_sigma", 1.0))
    scale = getattr(sched, "scale_model_input", lambda x, t: x)       # flow-match schedulers have none
    for t in sched.timesteps:
        model = vp_model_eps if problem.kind == "vp" else flow_model_v
        out = model(problem, scale(x, t), t)
        extra = {"generator": g} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(out, t, x, **kwargs, **extra).prev_sample
    return x, len(sched.timesteps)


# --- NimbleDiff ---------------------------------------------------------------------------------------------------

def ours_entries(kind: str):
    """(label, sampler, options, schedule, evaluations per step or None, stochastic)."""
    base = "trailing" if kind == "vp" else "flow"
    rows = [
        ("euler", "euler", {}, base, False),
        ("dpmpp_2m", "dpmpp_2m", {}, base, False),
        ("dpmpp_2m", "dpmpp_2m", {}, "karras", False),
        ("dpmpp_2m", "dpmpp_2m", {}, "logsnr", False),
        ("dpmpp_2m HB beta=0.8", "dpmpp_2m", {"beta": 0.8}, "logsnr", False),
        ("dpmpp_2m_unic", "dpmpp_2m_unic", {}, base, False),
        ("dpmpp_2m_unic", "dpmpp_2m_unic", {}, "logsnr", False),
        ("deis order 3", "deis", {"order": 3}, "logsnr", False),
        ("plms (iPNDM, order 4)", "plms", {}, base, False),
        ("plms (iPNDM, order 4)", "plms", {}, "logsnr", False),
        ("plms HB beta=0.8", "plms", {"beta": 0.8}, "logsnr", False),
        ("ghvb (order 4, beta 0.8)", "ghvb", {}, "logsnr", False),
        ("scott eta=1 (ancestral)", "scott", {}, "logsnr", True),
        ("scott eta=1, 1 substep", "scott", {"substeps": 1}, "logsnr", True),
        ("pc snr=0.16", "pc", {}, "logsnr", True),
        ("lcm", "lcm", {}, "lcm" if kind == "vp" else "flow", True),
        ("tcd gamma=0.3", "tcd", {}, "lcm" if kind == "vp" else "flow", True),
    ]
    if kind == "flow":
        rows.insert(1, ("euler (= FlowMatchEuler)", "euler", {}, "flowmatch", False))
    return rows


def evaluations(sampler: str, options: dict, steps: int) -> int:
    if sampler == "pc":
        return steps + options.get("corrector_steps", 1) * (steps - 1)
    if sampler == "scott":
        return steps * (1 + options.get("substeps", 0))
    return steps


def steps_for(sampler: str, options: dict, nfe: int) -> int:
    """The most steps whose evaluation count fits in nfe."""
    best = 0
    for steps in range(1, nfe + 1):
        if evaluations(sampler, options, steps) <= nfe:
            best = steps
    return best


def run_ours(problem: Problem, sampler: str, options: dict, sigmas) -> torch.Tensor:
    return run(SAMPLERS[sampler], problem.denoiser, problem.x, torch.as_tensor(sigmas).float(),
               param=problem.param, seed=0, **options)


# --- searched schedules -------------------------------------------------------------------------------------------

def searched_schedules(problem: Problem, quick: bool, log):
    """{(label, sampler): {nfe: sigmas}} for BOSS and AutoDiffusion on the calibration batch."""
    den, param, cal = problem.denoiser, problem.param, problem.calibration
    grid = search.fine_grid(param, 60 if quick else 100)
    t0 = time.perf_counter()
    states, preds, final = search.reference_solve(den, param, cal, grid, substeps=8)
    ref = (grid, states, preds, final)
    out = {}
    costs = {}
    for sampler in ("euler", "plms"):
        costs[sampler] = search.boss_costs(den, param, x=cal, sampler=sampler, reference=ref)
        out[("BOSS", sampler)] = {n: search.boss(den, param, n, x=cal, sampler=sampler,
                                                 costs=costs[sampler])["sigmas"] for n in NFES}
    pop, gens = (12, 10) if quick else (16, 20)
    for sampler in ("euler", "plms", "dpmpp_2m_unic"):
        found = {1: [float(param.sigma_max), 0.0]}
        for n in (2, 3, 4, 6, 8):                       # the few-step range; BOSS rows cover 12 and 16
            init = [out[("BOSS", "plms" if sampler != "euler" else "euler")][n],
                    schedules.make_sigmas("logsnr", n, param).tolist(),
                    schedules.make_sigmas("trailing" if problem.kind == "vp" else "flow", n, param).tolist()]
            found[n] = search.autodiffusion(den, param, n, x=cal, sampler=sampler, reference=ref, init=init,
                                            population=pop, generations=gens, seed=0)["sigmas"]
        out[("AutoDiffusion", sampler)] = found
    # Fitted solver: step sizes + mixing weights + corrector gains (values are whole schedule dicts with options)
    for shift in ((False, True) if problem.kind == "vp" else (False,)):
        out[("fit + prior shift" if shift else "fit", "fitted")] = {
            n: search.fit_solver(den, param, n, x=cal, reference=ref, prior_shift=shift,
                                 iterations=150 if quick else 400) for n in (2, 3, 4, 6, 8)}
    log(f"  schedule search ({problem.name}): {time.perf_counter() - t0:.0f} s")
    return out


def as_schedule(found) -> tuple:
    """(sigmas, sampler options) of a searched entry: a bare sigma list (BOSS, AutoDiffusion) or a fit's dict."""
    return (found["sigmas"], found["options"]) if isinstance(found, dict) else (found, {})


# --- tables -------------------------------------------------------------------------------------------------------

def fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def table(title: str, rows, metric: str) -> str:
    head = f"| {title} | " + " | ".join(f"NFE {n}" for n in NFES) + " |"
    sep = "|---|" + "---:|" * len(NFES)
    lines = [head, sep]
    for label, res in rows:
        cells = []
        for n in NFES:
            r = res.get(n)
            if r is None or r.get(metric) is None:
                cells.append("–")
            else:
                cell = fmt(r[metric])
                if r["nfe"] != n:
                    cell += f" ({r['nfe']})"
                cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_problem(problem: Problem, quick: bool, log):
    results_ours, results_theirs = [], []
    # NimbleDiff rows on named schedules
    for label, sampler, options, sched, stochastic in ours_entries(problem.kind):
        res = {}
        for n in NFES:
            steps = steps_for(sampler, options, n)
            if steps == 0:
                continue
            out = run_ours(problem, sampler, options, schedules.make_sigmas(sched, steps, problem.param))
            res[n] = {"l2": None if stochastic else problem.l2(out), "sw2": problem.sw2(out),
                      "nfe": evaluations(sampler, options, steps)}
        results_ours.append((f"{label} / {sched}", res, sampler, options, sched))
    # NimbleDiff rows on searched schedules
    found = searched_schedules(problem, quick, log)
    for (method, sampler), by_nfe in found.items():
        res = {}
        for n, found_n in by_nfe.items():
            sig, opts = as_schedule(found_n)
            out = run_ours(problem, sampler, opts, sig)
            # a prior-shifted solve starts elsewhere than the reference: judged on SW2 only, like LCM / TCD
            l2 = None if opts.get("prior_shift") else problem.l2(out)
            res[n] = {"l2": l2, "sw2": problem.sw2(out), "nfe": n}
        results_ours.append((f"{sampler} / {method}", res, sampler, {}, method))
    # diffusers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, factory, steps_of, stochastic, kwargs in diffusers_entries(problem.kind):
            res = {}
            for n in NFES:
                steps = steps_of(n)
                if steps < 1:
                    continue
                try:
                    out, used = run_diffusers(problem, factory, steps, kwargs)
                except Exception as e:                      # a scheduler that cannot do this step count
                    log(f"  diffusers {label} at {steps} steps failed: {type(e).__name__}: {e}")
                    continue
                res[n] = {"l2": None if stochastic else problem.l2(out), "sw2": problem.sw2(out), "nfe": used}
            results_theirs.append((label, res))
    return results_ours, results_theirs, found


def best_of(rows, metric: str, n: int, exclude=()):
    cands = [(r[n][metric], label) for label, r, *_ in rows
             if n in r and r[n].get(metric) is not None and label not in exclude and r[n]["nfe"] <= n
             and math.isfinite(r[n][metric])]
    return min(cands) if cands else (None, None)


def summary(problem: Problem, ours, theirs) -> str:
    lines = [f"| {problem.name} | metric | best NimbleDiff | best diffusers | ratio | goal <= 0.7 |",
             "|---|---|---|---|---:|:---:|"]
    fixed = [row for row in ours if row[4] not in SEARCHED]
    for n in (4, 8):
        for metric in ("l2", "sw2"):
            for scope, rows in (("any schedule", ours), ("named schedules only", fixed)):
                bo, lo = best_of(rows, metric, n)
                bt, lt = best_of(theirs, metric, n)
                ratio = bo / bt
                lines.append(f"| NFE {n} ({scope}) | {metric.upper()} | {bo:.3f} {lo} | {bt:.3f} {lt} | "
                             f"{ratio:.2f} | {'yes' if ratio <= 0.7 else 'NO'} |")
    return "\n".join(lines)


def search_summary(problem: Problem, ours) -> str:
    """Searched schedule vs the sampler's default schedule (trailing for VP, flow for rectified flow)."""
    base = "trailing" if problem.kind == "vp" else "flow"
    default = {row[2]: row[1] for row in ours if row[4] == base and not row[3]}
    logsnr = {row[2]: row[1] for row in ours if row[4] == "logsnr" and not row[3]}
    lines = [f"| {problem.name}: L2 | " + " | ".join(f"NFE {n}" for n in (2, 3, 4, 6)) + " |",
             "|---|" + "---:|" * 4]
    for label, res, sampler, options, method in ours:
        if method not in ("BOSS", "AutoDiffusion"):
            continue
        ref = default.get(sampler) or logsnr.get(sampler)
        ref_name = base if sampler in default else "logsnr"
        cells = []
        for n in (2, 3, 4, 6):
            a, b = res[n]["l2"], ref[n]["l2"]
            cells.append(f"{a:.3f} vs {b:.3f} {'better' if a < b else 'WORSE'}")
        lines.append(f"| {label} vs {sampler} / {ref_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- overhead -----------------------------------------------------------------------------------------------------

def overhead(repeats: int, steps: int = 8):
    """Scheduler-only µs per step on a 1x4x64x64 latent with a fixed random model output. Each NimbleScheduler
    sampler is timed interleaved with its diffusers counterpart (ours, theirs, ours, ...), medians reported, so
    machine drift hits both alike."""
    import diffusers as d
    from diffusers.utils import logging as dlogging

    from nimblediff.pipelines import NimbleScheduler

    dlogging.set_verbosity_error()          # Euler warns when step() runs without scale_model_input
    torch.manual_seed(0)
    latent = torch.randn(1, 4, 64, 64)
    out = torch.randn(1, 4, 64, 64) * 0.5

    def once(factory, kw):
        sched = factory()
        sched.set_timesteps(steps)
        extra = dict(kw)
        if "generator" in inspect.signature(sched.step).parameters:
            extra["generator"] = torch.Generator().manual_seed(0)
        x = latent.clone()
        t0 = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(out, t, x, **extra).prev_sample
        return (time.perf_counter() - t0) / len(sched.timesteps) * 1e6

    theirs = {
        "DDIM": (lambda: d.DDIMScheduler(**SD, clip_sample=False), {}),
        "Euler": (lambda: d.EulerDiscreteScheduler(**SD), {}),
        "DPM++2M": (lambda: d.DPMSolverMultistepScheduler(**SD), {}),
        "UniPC": (lambda: d.UniPCMultistepScheduler(**SD), {}),
        "DEIS": (lambda: d.DEISMultistepScheduler(**SD), {}),
        "PNDM (PLMS)": (lambda: d.PNDMScheduler(**SD, skip_prk_steps=True), {}),
        "LCM": (lambda: d.LCMScheduler(**SD), {}),
        "TCD": (lambda: d.TCDScheduler(**SD), {"eta": 0.3}),
        "FlowMatchEuler": (lambda: d.FlowMatchEulerDiscreteScheduler(), {}),
    }
    pairs = [("euler (flow)", "euler", "flow", "FlowMatchEuler"), ("euler (VP)", "euler", "vp", "Euler"),
             ("dpmpp_2m", "dpmpp_2m", "vp", "DPM++2M"), ("dpmpp_2m_unic", "dpmpp_2m_unic", "vp", "UniPC"),
             ("deis", "deis", "vp", "DEIS"), ("plms", "plms", "vp", "PNDM (PLMS)"),
             ("ghvb", "ghvb", "vp", "PNDM (PLMS)"), ("lcm", "lcm", "vp", "LCM"), ("tcd", "tcd", "vp", "TCD"),
             ("scott", "scott", "vp", "LCM"), ("pc", "pc", "vp", "DDIM"), ("fkc (anneal)", "fkc", "vp", "DDIM")]
    lines = ["| NimbleScheduler sampler | µs/step | diffusers counterpart | µs/step | ratio |",
             "|---|---:|---|---:|---:|"]
    for label, name, kind, peer in pairs:
        schedule = "lcm" if name in ("lcm", "tcd") else ("flow" if kind == "flow" else "trailing")
        mine = (lambda: NimbleScheduler(sampler=name, schedule=schedule, model_type=kind,
                                        prediction_type="epsilon" if kind == "vp" else "flow"), {})
        a, b = [], []
        for _ in range(repeats):
            a.append(once(*mine))
            b.append(once(*theirs[peer]))
        ours_us, theirs_us = statistics.median(a), statistics.median(b)
        lines.append(f"| {label} | {ours_us:.0f} | {peer} | {theirs_us:.0f} | {ours_us / theirs_us:.2f} |")
    lines += ["", "pc and fkc have no step()-style diffusers counterpart (ScoreSdeVeScheduler splits step_pred / "
              "step_correct); DDIM is the reference there."]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 samples, 200-step reference, small searches")
    parser.add_argument("--out", type=Path, help="also write the Markdown tables to this file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, ref_steps, repeats = (1024, 200, 3) if args.quick else (8192, 1000, 5)
    t_start = time.perf_counter()
    report = [f"# Sampler accuracy on analytic Gaussian mixtures ({n} samples, seeds fixed)", ""]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    summaries, search_tables = [], []
    for dim in (2, 16):
        for kind in ("vp", "flow"):
            t0 = time.perf_counter()
            problem = Problem(dim, kind, n, ref_steps)
            ours, theirs, found = evaluate_problem(problem, args.quick, log)
            log(f"{problem.name}: {time.perf_counter() - t0:.0f} s")
            report += [f"## {problem.name}", "",
                       f"SW2 floor: {problem.floor:.4f} for the reference ODE solution of the benchmark noise, "
                       f"{problem.iid_floor:.4f} for an i.i.d. exact data sample of the same size. "
                       "A number in parentheses is the NFE actually used (Heun, PC, SCott substeps).", "",
                       table("L2 to the reference ODE solve", [(lbl, r) for lbl, r, *_ in ours + theirs], "l2"),
                       "", table("SW2 to the data", [(lbl, r) for lbl, r, *_ in ours + theirs], "sw2"), ""]
            report += ["Searched schedules (sigmas):", ""]
            for (method, sampler), by_nfe in found.items():
                for nfe in (2, 4, 8):
                    report.append(f"- {method} / {sampler} / NFE {nfe}: "
                                  + ", ".join(f"{s:.3g}" for s in as_schedule(by_nfe[nfe])[0]))
            report.append("")
            summaries.append(summary(problem, ours, theirs))
            search_tables.append(search_summary(problem, ours))
    report += ["## Goal: best NimbleDiff vs best diffusers (all entries above, default and trailing spacing)", ""]
    for s in summaries:
        report += [s, ""]
    report += ["## Goal: searched schedules vs the sampler's default schedule", ""]
    for s in search_tables:
        report += [s, ""]
    report += ["## Scheduler-only overhead (1x4x64x64 latent, median of runs)", "", overhead(repeats), ""]
    report.append(f"Total time: {time.perf_counter() - t_start:.0f} s on {args.threads} thread(s).")
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
