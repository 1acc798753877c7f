"""Training-free schedule search: the sigmas of a K-step sampler, fitted to one model on a few calibration noises.

- BOSS (Nguyen et al. 2024, "Bellman Optimal Step-size Straightening of Flow-Matching Models", the training-free
  step-size part): discretise sigma into a fine grid, measure the local error of one sampler jump i -> j against a
  fine reference solve for every pair, and pick the K-jump path of least total error by dynamic programming.
- AutoDiffusion (Li et al. 2023, the time-step half): an evolutionary search (mutation + crossover, seeded) over
  K-step sigma lists with an offline fitness, the distance of the K-step result to the reference solve.

Both return a schedule as data, {"model_type", "sampler", "nfe", "sigmas", "created_by", ...}, which
`save_schedule` / `load_schedule` write and read as JSON; loading for another model type is an error.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from .sampling import SAMPLER_OPTIONS, SAMPLERS, run

METHODS = ("boss", "autodiffusion", "fit")


# --- sigma <-> rho (the VE noise level sigma / alpha, in which grids are log-uniform) -----------------------------

def _rho(param, sigma: float) -> float:
    return sigma if param.kind == "vp" else (math.inf if sigma >= 1 else sigma / (1 - sigma))


def _sigma(param, rho: float) -> float:
    return rho if param.kind == "vp" else rho / (1 + rho)


def _sigma_start(param) -> float:
    return float(param.sigma_max)


def _check_nfe(nfe) -> None:
    if not isinstance(nfe, int) or nfe < 1:
        raise InvalidParameterError(f"nfe={nfe!r}: need an integer >= 1 (the number of sampler steps)")


def _prior(param, shape, batch: int, seed: int) -> torch.Tensor:
    """Calibration noise at the start of the schedule, in k-space (x = sigma_max n for VP, n for flow)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(batch, *shape, generator=g)
    return param.noise_scaling(_sigma_start(param), n, torch.zeros_like(n))


def fine_grid(param, size: int = 120, rho_min: float = 2e-3) -> list[float]:
    """size sigmas from the model's sigma_max down to rho = rho_min, log-uniform in rho, then 0 (size + 1 nodes).
    A flow model's sigma = 1 (rho infinite) is the first node; its log-uniform part starts at rho = 1000."""
    if size < 2:
        raise InvalidParameterError(f"grid_size={size}: need at least 2 grid points")
    start = _sigma_start(param)
    hi = min(_rho(param, start), 1e3)
    k = size - 1 if param.kind == "flow" else size
    logs = [math.log(hi) + (math.log(rho_min) - math.log(hi)) * i / (k - 1) for i in range(k)]
    grid = [_sigma(param, math.exp(u)) for u in logs]
    if param.kind == "flow":
        grid = [start] + grid
    else:
        grid[0] = start
    return grid + [0.0]


def reference_solve(denoiser, param, x, grid, substeps: int = 8, progress=None):
    """A fine ODE solve (DEIS order 3 on the grid refined `substeps` times, log-uniform in rho) from x at grid[0].

    Returns (states, denoised, final): the states and denoised predictions at every grid node but the last (the
    ones the fine solver evaluated at), and the result at sigma 0. Costs (len(grid) - 2) * substeps + 1 calls.
    `progress(done, total)` is called after every step.
    """
    fine = []
    for a, b in zip(grid[:-2], grid[1:-1]):
        ra, rb = _rho(param, a), _rho(param, b)
        if math.isinf(ra):          # flow sigma = 1: split linearly in sigma
            fine += [a + (b - a) * j / substeps for j in range(substeps)]
        else:
            fine += [_sigma(param, ra * (rb / ra) ** (j / substeps)) for j in range(substeps)]
    fine += [grid[-2], 0.0]
    keep = set(range(0, len(fine) - 1, substeps))
    states, preds = [], []

    def record(info):
        if progress is not None:
            progress(info["i"] + 1, len(fine) - 1)
        if info["i"] in keep:
            states.append(info["x"])
            preds.append(info["denoised"])

    final = run(SAMPLERS["deis"], denoiser, x, torch.tensor(fine, dtype=torch.float64), param=param,
                order=3, lower_order_final=False, callback=record)
    return states, preds, final


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the per-sample L2 distance."""
    return float((a - b).flatten(1).norm(dim=1).mean())


def jump(method, denoiser, param, x, sigma_from, sigma_to, denoised, options) -> torch.Tensor:
    """One sampler step sigma_from -> sigma_to from the state x whose prediction `denoised` is already known (so a
    one-evaluation sampler costs no model call; further asks, e.g. a corrector's, call the denoiser)."""
    steps = method(x, torch.tensor([sigma_from, sigma_to], dtype=torch.float64), param=param,
                   noise=lambda s, t: torch.zeros_like(x), **options)
    answer = denoised
    try:
        x_ask, sigma = next(steps)
        while True:
            x_ask, sigma = steps.send(answer)
            answer = denoiser(x_ask, sigma * x_ask.new_ones(len(x_ask)))
    except StopIteration as done:
        return done.value


def bellman_path(cost, k: int) -> list[int]:
    """The path 0 = n_0 < n_1 < ... < n_k = N - 1 minimising sum cost[n_m, n_{m+1}] (cost: (N, N), used above the
    diagonal): V_m(j) = min_i V_{m-1}(i) + cost[i, j], then backtracking."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    n = len(cost)
    if not 1 <= k <= n - 1:
        raise InvalidParameterError(f"a path of {k} jumps needs between 1 and {n - 1} jumps on {n} grid nodes")
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    c = torch.where(upper, cost, torch.full_like(cost, math.inf))
    value = torch.full((n,), math.inf, dtype=torch.float64)
    value[0] = 0.0
    back = []
    for _ in range(k):
        total = value[:, None] + c                 # (from, to)
        value, arg = total.min(0)
        back.append(arg)
    path = [n - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def boss_costs(denoiser, param, *, x, sampler: str = "euler", options=None, grid_size: int = 120,
               substeps: int = 8, propagate: bool = True, reference=None, progress=None):
    """The BOSS cost matrix on a fine grid: cost[i, j] = error of one sampler jump i -> j started from the
    reference state at i (mean L2 over the calibration batch x). Returns (grid, cost).

    propagate=False is the paper's local error |jump - reference state at j|. propagate=True (default) carries
    the jump's result on to sigma 0 with a coarse DEIS-3 solve over the remaining grid and measures it there, so
    an error made at high noise (which the ODE contracts) is not over-counted against the last jumps (a plain sum
    of local errors puts too few steps near the data). All jumps into one node share one batched coarse solve.
    `reference` = (grid, states, denoised, final) reuses a reference solve.
    """
    method, options = SAMPLERS[sampler], {**SAMPLER_OPTIONS[sampler], **(options or {})}
    grid = fine_grid(param, grid_size) if reference is None else reference[0]
    n = len(grid)
    stride = max(1, (n - 1) // 16)
    coarse = {j: _coarse_grid(grid, j, stride) for j in range(1, n - 1)} if propagate else {}
    # batched model calls, cumulative (the reference solve, then each target node's coarse solve of j + 1 batches;
    # a one-evaluation sampler's jumps reuse the reference's predictions): the progress bar's ETA holds from the start
    calls = [(n - 2) * substeps + 1 if reference is None else 0]
    calls += [(j + 1) * (len(coarse[j]) - 1) if j in coarse else 0 for j in range(1, n)]
    work = list(itertools.accumulate(calls))
    if reference is None:
        ref_progress = None if progress is None else (lambda done, total: progress(done, work[-1]))
        states, preds, final = reference_solve(denoiser, param, x, grid, substeps, progress=ref_progress)
    else:
        grid, states, preds, final = reference
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    for j in range(1, n):
        outs = [jump(method, denoiser, param, states[i], grid[i], grid[j], preds[i], options) for i in range(j)]
        if j == n - 1:
            target, outs = final, outs
        elif not propagate:
            target = states[j]
        else:                                                        # one coarse solve for every jump into j
            solved = run(SAMPLERS["deis"], denoiser, torch.cat(outs + [states[j]]), coarse[j], param=param,
                         order=3, lower_order_final=False)
            *outs, target = solved.split(len(states[j]))
        for i, out in enumerate(outs):
            cost[i, j] = _error(out, target)
        if progress is not None:
            progress(work[j], work[-1])
    return grid, cost


def _coarse_grid(grid, j: int, stride: int) -> torch.Tensor:
    """The coarse DEIS grid that carries jumps into node j on to sigma 0: every stride-th node, the last nonzero one."""
    return torch.tensor(grid[j:-1:stride] + [grid[-2], 0.0], dtype=torch.float64).unique_consecutive()


def boss(denoiser, param, nfe: int, *, x, sampler: str = "euler", options=None, costs=None, progress=None,
         **cost_options) -> dict:
    """BOSS step sizes: the cost of every one-step jump on a fine grid (`boss_costs`), then Bellman DP for the
    `nfe`-jump path of least total cost. A multistep sampler is costed by its first step (no history), so the
    path is exact only for one-step methods; `autodiffusion(..., init=[result["sigmas"]])` refines it with the
    real sampler. `costs` = (grid, cost) from `boss_costs` reuses one matrix for several nfe.
    """
    _check_nfe(nfe)
    if costs is None:
        costs = boss_costs(denoiser, param, x=x, sampler=sampler, options=options, progress=progress,
                           **cost_options)
    grid, cost = costs
    path = bellman_path(cost, min(nfe, len(grid) - 1))
    return {"model_type": param.kind, "sampler": sampler, "nfe": nfe, "sigmas": [grid[i] for i in path],
            "created_by": "boss", "cost": float(sum(cost[a, b] for a, b in zip(path, path[1:]))),
            "options": {**SAMPLER_OPTIONS[sampler], **(options or {})}}


def _schedule_error(method, denoiser, param, x, sigmas, target, options) -> float:
    out = run(method, denoiser, x, torch.tensor(sigmas, dtype=torch.float64), param=param,
              noise=lambda s, t: torch.zeros_like(x), **options)
    err = _error(out, target)
    return err if math.isfinite(err) else math.inf


def tournament(scored, rng, size: int = 3):
    """Tournament selection: the genes of the best (lowest error) of `size` random members of a scored population
    [(error, genes), ...]. Shared by the time-step search here and the block search (core/caching/block_search.py)."""
    return min(rng.sample(scored, size), key=lambda t: t[0])[1]


def breed(a, b, rng, scale: float) -> list[float]:
    """Uniform crossover of two real-valued gene lists, then Gaussian mutation of each gene with probability
    max(1 / len, 0.3)."""
    child = [ga if rng.random() < 0.5 else gb for ga, gb in zip(a, b)]
    for i in range(len(child)):
        if rng.random() < max(1.0 / len(child), 0.3):
            child[i] += rng.gauss(0.0, scale)
    return child


def sorted_genes(genes, lo: float, hi: float, gap: float = 1e-3) -> list[float]:
    """log-rho genes as a valid interior sigma list: decreasing, inside [lo, hi - gap], `gap` apart."""
    genes = sorted((min(max(u, lo), hi - gap) for u in genes), reverse=True)
    for i in range(1, len(genes)):
        genes[i] = min(genes[i], genes[i - 1] - gap)
    return genes


def autodiffusion(denoiser, param, nfe: int, *, x, sampler: str = "euler", options=None, population: int = 24,
                  generations: int = 30, seed: int = 0, init=(), rho_range=(2e-3, 1e3), progress=None,
                  reference=None, substeps: int = 8) -> dict:
    """Evolutionary search over the nfe - 1 interior sigmas (genes: log rho, kept sorted), fitness = mean L2 of
    the nfe-step result to the reference solve on the calibration batch x. Seeded; `init` sigma lists (e.g. a
    BOSS result) join the first population beside log-uniform ones. Costs population * generations * nfe calls.
    """
    _check_nfe(nfe)
    method, options = SAMPLERS[sampler], {**SAMPLER_OPTIONS[sampler], **(options or {})}
    rng = random.Random(seed)
    if reference is None:
        target = reference_solve(denoiser, param, x, fine_grid(param), substeps)[2]
    else:
        target = reference[-1]
    start = _sigma_start(param)
    lo, hi = math.log(rho_range[0]), math.log(min(_rho(param, start), rho_range[1]))

    def sigmas_of(genes):
        return [start] + [_sigma(param, math.exp(u)) for u in genes] + [0.0]

    def genes_of(sigmas):
        inner = [_rho(param, float(s)) for s in list(sigmas)[1:-1]]
        return sorted((min(max(math.log(r), lo), hi) for r in inner if 0 < r < math.inf), reverse=True)

    def fix(genes):
        return sorted_genes(genes, lo, hi)

    def fitness(genes):
        return _schedule_error(method, denoiser, param, x, sigmas_of(genes), target, options)

    m = nfe - 1
    pool = [fix(genes_of(s)) for s in init if len(genes_of(s)) == m]
    pool.append(fix([hi + (lo - hi) * (i + 1) / nfe for i in range(m)]))
    while len(pool) < population:
        pool.append(fix([rng.uniform(lo, hi) for _ in range(m)]))
    scored = sorted(((fitness(g), g) for g in pool), key=lambda t: t[0])
    if m == 0:
        generations = 0
    scale = 0.5
    for gen in range(generations):
        children = []
        while len(children) < population - 4:
            a, b = tournament(scored, rng), tournament(scored, rng)
            children.append(fix(breed(a, b, rng, scale)))
        scored = sorted(scored[:4] + [(fitness(c), c) for c in children], key=lambda t: t[0])  # elitism
        scale = max(0.05, scale * 0.9)
        if progress is not None:
            progress(gen + 1, generations)
    err, best = scored[0]
    return {"model_type": param.kind, "sampler": sampler, "nfe": nfe, "sigmas": sigmas_of(best),
            "created_by": "autodiffusion", "error": err, "options": options}


def _cvar(e: torch.Tensor, quantile: float) -> torch.Tensor:
    """The mean of the worst (1 - quantile) fraction of e (at least one sample)."""
    return e.topk(max(1, math.ceil((1 - quantile) * len(e)))).values.mean()


def _tail_objective(e: torch.Tensor, tail: float, quantile: float) -> torch.Tensor:
    """mean(e) + tail * CVaR_quantile(e): the mean per-sample error plus `tail` times the mean of its worst
    (1 - quantile) fraction, so a fit cannot buy a lower mean by sending a few samples far off (a plain mean-L2
    fit did: 16-D VP, NFE 4, median 0.04 but p99 5.07 against UniPC's 4.35)."""
    return e.mean() if tail == 0 else e.mean() + tail * _cvar(e, quantile)


def _dpmpp_2m_coeffs(param, sigmas) -> list[list[float]]:
    """DPM-Solver++(2M) in the fitted form: D^_i = D_i - (D_{i-1} - D_i) / (2 r_i), r_i = h_{i-1} / h_i in
    lambda = -log rho; first order at the first step and at the last one (to sigma 0)."""
    from .sampling.multistep import log_rho

    lam = [-log_rho(param, float(s)) for s in sigmas]
    coeffs = [[]]
    for i in range(1, len(sigmas) - 1):
        h_prev, h = lam[i] - lam[i - 1], lam[i + 1] - lam[i]
        ok = float(sigmas[i + 1]) > 0 and math.isfinite(h) and h > 0 and h_prev > 0
        coeffs.append([-h / (2 * h_prev) if ok else 0.0])
    return coeffs


def _named_starts(param, nfe: int, init) -> list[tuple[str, list, list, float]]:
    """(label, sigmas, coeffs, corrector gain) of named solvers the fitted form expresses: DDIM (all weights
    zero), DPM-Solver++(2M), and DPM-Solver++(2M) with the trapezoidal corrector (gain 1/2, UniC-1's) on the
    logsnr, default, karras and exponential schedules, and DDIM on `init`."""
    from . import schedules

    names = ("logsnr", "trailing" if param.kind == "vp" else "flow", "karras", "exponential")
    out = [] if init is None else [("init", list(init), [[]] * nfe, 0.0)]
    for name in names:
        sig = schedules.make_sigmas(name, nfe, param).double().tolist()
        if len(set(sig)) != len(sig):
            continue
        c2 = _dpmpp_2m_coeffs(param, sig)
        out += [(f"ddim/{name}", sig, [[]] * nfe, 0.0), (f"dpmpp_2m/{name}", sig, c2, 0.0),
                (f"dpmpp_2m+corrector/{name}", sig, c2, 0.5)]
    return out


def fit_solver(denoiser, param, nfe: int, *, x, reference=None, init=None, depth: int = 3, iterations: int = 400,
               lr: float = 0.03, corrector: bool = True, prior_shift: bool = False, progress=None,
               substeps: int = 8, rho_range=(2e-3, 1e3), tail: float = 1.0, tail_quantile: float = 0.9,
               guard_quantile: float = 0.9, guard: str = "best", restarts: int = 3, validation: float = 0.25,
               fit_start: bool = False, time_shift: bool = False, model_fingerprint: str | None = None) -> dict:
    """Fit the `fitted` sampler to a model: its nfe - 1 interior sigmas, the per-step mixing weights of up to
    `depth` past x0 predictions and (corrector=True) one corrector gain per step, by Adam through the model.

    1. Objective (tail-safe): mean per-sample L2 of the nfe-step result to the reference solve plus `tail` x the
       CVaR at `tail_quantile` (the mean of the worst 10 %), so the worst samples are not traded for the mean.
    2. Split the calibration batch x: the last `validation` fraction (with >= 32 noises) only judges iterates.
    3. Start from named solvers the fitted form expresses (DDIM, DPM-Solver++(2M) and 2M with a corrector on the
       logsnr, default, Karras and exponential schedules, and `init`, a sigma list): the `restarts` - 1 best on
       the fit part and the one with the lightest validation tail each get an equal share of the iterations
       (Adam, cosine learning-rate decay), against stalls.
    4. Keep the iterate with the best validation objective whose validation tail (the mean of its errors above
       the `guard_quantile` quantile, CVaR: with 32-128 validation noises a p99 is one sample) does not exceed
       the guard: guard="best" the lightest tail of any named start, "start" the best-ranked start's. That
       start itself qualifies, so the fit never returns a heavier validation tail than it.
    prior_shift=True (VP) fits the solver that starts from x + D(x), against a reference from that start too.
    fit_start=True also fits the first sigma, at or below the start: the noise is then scaled to that sigma, as
    a host does with any schedule (noise x sigmas[0]), which skips the top of the path without a model call, at
    the cost of assuming the data's mean there (diffusers' "leading" spacing does the same with a fixed sigma).
    time_shift=True also fits, per step, the noise level the model is asked at (the sampler's `shifts`).
    The result records what it was fitted on (`fitted_on`: model type, noise schedule, a fingerprint of the
    model, `model_fingerprint` or probed with `fingerprint()`); `warn_if_fitted_elsewhere` compares it where it is used.
    Costs iterations * nfe forward and backward model calls on the fit part.
    """
    _check_nfe(nfe)
    if prior_shift and param.kind != "vp":
        raise InvalidParameterError("prior_shift=True is for VP models; a flow model starts from exact noise")
    if init is not None and len(init) != nfe + 1:
        raise InvalidParameterError(f"init has {len(init) - 1} steps of sigmas; fit_solver(nfe={nfe}) needs {nfe}")
    start = _sigma_start(param)
    if prior_shift:                         # the solve the fitted solver imitates starts from the shifted prior
        with torch.no_grad():
            x_ref = x + denoiser(x, torch.full((len(x),), start, dtype=x.dtype))
        target = reference_solve(denoiser, param, x_ref, fine_grid(param), substeps)[2]
    else:
        target = reference[-1] if reference is not None else reference_solve(
            denoiser, param, x, fine_grid(param), substeps)[2]
    target = target.to(x.dtype)
    n_val = max(8, round(len(x) * validation)) if validation > 0 and len(x) >= 32 else 0
    x_fit, t_fit = (x[:-n_val], target[:-n_val]) if n_val else (x, target)
    x_val, t_val = (x[-n_val:], target[-n_val:]) if n_val else (x, target)
    lo, hi = math.log(rho_range[0]), math.log(min(_rho(param, start), rho_range[1]))

    def log_rho(sigma):
        """log(sigma / alpha) of a sigma tensor (a flow sigma of 1 stays finite)."""
        return sigma.log() if param.kind == "vp" else sigma.clamp(max=1 - 1e-6).logit()

    def sigmas_of(u):
        """u: the interior log-rhos, then (fit_start) the log of the first sigma over the start."""
        first = start * u[-1].clamp(max=0).exp() if fit_start else u.new_tensor(start)
        top = log_rho(first)
        rho = torch.minimum(u[:nfe - 1].clamp(lo, hi), top).sort(descending=True).values.exp()
        inner = rho if param.kind == "vp" else rho / (1 + rho)
        return torch.cat([first.reshape(1), inner, inner.new_zeros(1)])

    def shifts_of(sigmas, raw):
        """The time shifts kept inside the model's range: a VP model is never asked above the start sigma (its
        timestep would clamp) nor below its lowest trained sigma or rho_range's low end; a flow model's formula
        stays below sigma 1."""
        if not len(raw):
            return []
        here = log_rho(sigmas[:-1])
        if param.kind != "vp":
            return list(raw.clamp(lo - here))
        floor = max(lo, math.log(param.sigma_min))
        return list(torch.maximum(torch.minimum(raw, math.log(start) - here), floor - here))

    def errors(x, target, sigmas, coeffs, gains, shifts=()):
        x = x * (sigmas[0] / start) if fit_start else x        # the noise, scaled to the first sigma
        out = run(SAMPLERS["fitted"], denoiser, x, sigmas, param=param, noise=None, seed=0,
                  coeffs=coeffs, gains=list(gains), prior_shift=prior_shift, shifts=shifts_of(sigmas, shifts))
        return (out - target).flatten(1).norm(dim=1)

    def variables(sigmas, named_coeffs, gain=0.0):
        u = torch.tensor([math.log(_rho(param, float(s))) for s in sigmas[1:-1]] + [0.0] * fit_start,
                         dtype=torch.float64)
        u[:nfe - 1] = u[:nfe - 1].clamp(lo, hi)
        coeffs = [torch.zeros(min(i, depth), dtype=torch.float64) for i in range(nfe)]
        for c, named in zip(coeffs, named_coeffs):
            c[:len(named)] = torch.tensor(list(named)[:len(c)], dtype=torch.float64)
        return u.requires_grad_(), [c.requires_grad_() for c in coeffs], \
            torch.full((nfe - 1 if corrector else 0,), gain, dtype=torch.float64, requires_grad=True)

    # 1-3: rank the named starts on the fit part and measure their validation tails
    if guard not in ("best", "start"):
        raise InvalidParameterError(f"guard={guard!r}; valid: 'best', 'start'")
    ranked = []
    with torch.no_grad():
        for label, sig, named, gain in _named_starts(param, nfe, init):
            if gain and not corrector:
                continue
            u, coeffs, gains = variables(sig, named, gain)
            j = float(_tail_objective(errors(x_fit, t_fit, sigmas_of(u), coeffs, gains), tail, tail_quantile))
            t = float(_cvar(errors(x_val, t_val, sigmas_of(u), coeffs, gains), guard_quantile))
            if math.isfinite(j) and math.isfinite(t):
                ranked.append((j, t, label, sig, named, gain))
        if not ranked:
            raise InvalidParameterError("fit_solver: the model gave non-finite results for every named start")
        ranked.sort(key=lambda r: r[0])
    lightest = min(ranked, key=lambda r: r[1])
    limit = lightest[1] if guard == "best" else ranked[0][1]
    if guard == "best":                     # the lightest-tailed start always runs: its tail is the limit
        runs = ranked[:max(0, restarts - 1)]
        runs += [] if lightest in runs else [lightest]
    else:
        runs = ranked[:max(1, restarts)]
    best = (math.inf, None)
    shares = [iterations // len(runs) + (k < iterations % len(runs)) for k in range(len(runs))]
    done = 0
    for (_, _, label, sig, named, gain), share in zip(runs, shares):
        u, coeffs, gains = variables(sig, named, gain)
        shifts = torch.zeros(nfe if time_shift else 0, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([u, gains, shifts, *coeffs[1:]], lr=lr)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(share, 1), eta_min=lr / 10)
        for it in range(share + 1):
            if it % 5 == 0 or it == share:              # 4: judge the iterate on the validation part
                with torch.no_grad():
                    sig_now = sigmas_of(u)
                    e_val = errors(x_val, t_val, sig_now, coeffs, gains, shifts)
                    j = float(_tail_objective(e_val, tail, tail_quantile))
                    tail_val = float(_cvar(e_val, guard_quantile))
                    if math.isfinite(j) and j < best[0] and tail_val <= limit * (1 + 1e-9):
                        best = (j, (sig_now.tolist(), [c.tolist() for c in coeffs], gains.tolist(),
                                    [float(v) for v in shifts_of(sig_now, shifts)], label, float(e_val.mean())))
            if it == share:
                break
            loss = _tail_objective(errors(x_fit, t_fit, sigmas_of(u), coeffs, gains, shifts), tail, tail_quantile)
            if not torch.isfinite(loss):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
            done += 1
            if progress is not None:
                progress(done, iterations)
    if progress is not None and done < iterations:
        progress(iterations, iterations)
    if best[1] is None:
        raise InvalidParameterError("fit_solver: the model gave non-finite results for every candidate solver")
    objective, (sigmas, c, g, sh, label, mean_err) = best
    return {"model_type": param.kind, "sampler": "fitted", "nfe": nfe, "sigmas": sigmas, "created_by": "fit",
            "error": mean_err, "objective": objective, "start": label,
            "options": {"coeffs": c, "gains": g, "prior_shift": prior_shift, **({"shifts": sh} if time_shift else {})},
            "fitted_on": {"model_type": param.kind, "schedule": describe_noise_schedule(param),
                          "model": model_fingerprint or fingerprint(denoiser, param, tuple(x.shape[1:])),
                          "calibration_noises": len(x)}}


# --- what a schedule was fitted on ---------------------------------------------------------------------------------

class FittedElsewhereWarning(UserWarning):
    """A searched or fitted schedule is used on another noise schedule or model than it was fitted on."""


def describe_noise_schedule(param) -> dict:
    """The noise schedule a sampler sees, as comparable data (4 significant digits)."""
    if param.kind == "flow":
        return {"kind": "flow", "shift": float(f"{float(getattr(param, 'shift', 1.0)):.4g}")}
    return {"kind": "vp", "sigma_min": float(f"{param.sigma_min:.4g}"), "sigma_max": float(f"{param.sigma_max:.4g}"),
            "num_train_timesteps": int(param.num_train_timesteps)}


def fingerprint(denoiser, param, shape, seed: int = 0) -> str:
    """A short hash of the model's answers on a fixed probe (2 seeded noises of one sample's `shape` at 3 noise
    levels, rounded to 3 significant digits): the same model gives the same string; another model almost surely
    not. Costs 3 model calls."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    grid = fine_grid(param, 12)
    values = []
    with torch.no_grad():
        for sigma in (grid[2], grid[6], grid[10]):
            xs = param.noise_scaling(sigma, n, torch.zeros_like(n))
            d = denoiser(xs.to(torch.float32), torch.full((2,), sigma, dtype=torch.float32))
            values += [float(f"{v:.3g}") for v in d.double().flatten()[:64].tolist()]
    return "probe:" + hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def warn_if_fitted_elsewhere(schedule: dict, param, model: str | None = None) -> dict:
    """Warn (FittedElsewhereWarning) when a schedule file's `fitted_on` names another noise schedule than
    `param`'s, or another model fingerprint than `model` (when the caller has one); a fitted solver's file that
    does not say what it was fitted on gets a warning too. A fitted solver's weights are tuned to one model and
    noise schedule: on another, its errors can grow far past a named solver's (2-D flow, NFE 4). Returns
    `schedule`, so a loader wraps its load in it."""
    import warnings

    made_on = schedule.get("fitted_on")
    where = schedule.get("created_by", "search")
    if made_on is None:
        if schedule.get("sampler") == "fitted":
            warnings.warn("this fitted-solver schedule does not record what it was fitted on; it is only "
                          "accurate for the model and noise schedule it was fitted to", FittedElsewhereWarning,
                          stacklevel=2)
        return schedule
    here = describe_noise_schedule(param)
    if made_on.get("schedule") not in (None, here):
        warnings.warn(f"this {where} schedule was fitted on the noise schedule {made_on['schedule']} but is used on "
                      f"{here}; its sigmas and weights are tuned to the other one: refit for this model",
                      FittedElsewhereWarning, stacklevel=2)
    elif model is not None and made_on.get("model") not in (None, model):
        warnings.warn(f"this {where} schedule was fitted on model {made_on['model']} but is used on {model}; "
                      "refit for this model", FittedElsewhereWarning, stacklevel=2)
    return schedule


def search_schedule(method: str, denoiser, param, nfe: int, *, x=None, shape=None, batch: int = 32, seed: int = 0,
                    sampler: str = "euler", options=None, progress=None, **kwargs) -> dict:
    """Search a `nfe`-step schedule for `sampler` on `denoiser` (k-diffusion convention model(x, sigma) -> x0).

    method: "boss" or "autodiffusion". Calibration noise: `x` (k-space, at the schedule's first sigma) or a fresh
    seeded batch of `batch` draws of `shape` (one sample's shape, e.g. (4, 64, 64)). `progress(done, total)` is
    called as the search advances. Extra keyword arguments go to `boss` / `autodiffusion`.
    """
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    if sampler not in SAMPLERS:
        raise InvalidParameterError(f"sampler={sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
    _check_nfe(nfe)
    if x is None:
        if shape is None:
            raise InvalidParameterError("pass the calibration noise x or the sample shape=(C, H, W) to draw it")
        x = _prior(param, tuple(shape), batch, seed)
    if method == "fit":                         # the fitted solver is its own sampler
        return fit_solver(denoiser, param, nfe, x=x, progress=progress, **kwargs)
    if method == "autodiffusion":
        kwargs.setdefault("seed", seed)
    search = boss if method == "boss" else autodiffusion
    return search(denoiser, param, nfe, x=x, sampler=sampler, options=options, progress=progress, **kwargs)


# --- JSON ----------------------------------------------------------------------------------------------------------

def save_schedule(path, schedule: dict) -> None:
    """Write a searched schedule as JSON (model_type, sampler, nfe, sigmas, created_by, and any extras)."""
    for key in ("model_type", "sampler", "nfe", "sigmas", "created_by"):
        if key not in schedule:
            raise InvalidParameterError(f"schedule to save lacks {key!r}; it has {sorted(schedule)}")
    data = {**schedule, "sigmas": [float(s) for s in schedule["sigmas"]]}
    Path(path).write_text(json.dumps(data, indent=1))


def load_schedule(path, model_type: str | None = None) -> dict:
    """Read a schedule JSON; with `model_type` ("vp" / "flow", e.g. `param.kind`), refuse one searched for another
    model type. The sigmas are validated (strictly decreasing, finite, >= 0) and returned as a float tensor."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidParameterError(f"cannot read the schedule file {str(path)!r}: {e}") from e
    return check_schedule(data, model_type, source=f"schedule file {str(path)!r}")


def parse_schedule(text: str, model_type: str | None = None) -> dict:
    """A schedule given as JSON text (e.g. embedded in a workflow), checked as `load_schedule` checks a file."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InvalidParameterError(f"the schedule text is not JSON ({e}); paste the contents of a "
                                    "`nimblediff schedule search` file") from e
    return check_schedule(data, model_type, source="schedule text")


def sampler_of(schedule: dict) -> tuple[str, dict]:
    """The sampler a checked schedule was searched or fitted for, and its options (the fitted solver's weights):
    what a node or scheduler needs besides the sigmas."""
    name = schedule.get("sampler", "euler")
    if name not in SAMPLERS:
        raise InvalidParameterError(f"the schedule names sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    options = dict(schedule.get("options") or {})
    unknown = sorted(set(options) - set(SAMPLER_OPTIONS[name]))
    if unknown:
        raise InvalidParameterError(f"the schedule gives {name} the options {unknown}; it takes "
                                    f"{sorted(SAMPLER_OPTIONS[name])}")
    return name, options


def check_schedule(data, model_type: str | None = None, source: str = "schedule") -> dict:
    from .schedules import check_sigmas

    if not isinstance(data, dict):
        raise InvalidParameterError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("model_type", "nfe", "sigmas") if k not in data]
    if missing:
        raise InvalidParameterError(f"{source} lacks {missing}; expected keys model_type, sampler, nfe, sigmas, "
                                    "created_by")
    if model_type is not None and data["model_type"] != model_type:
        raise InvalidParameterError(
            f"{source} was searched for model_type={data['model_type']!r} but the target model is {model_type!r}; "
            "search a schedule for this model (its sigmas mean something else)")
    sigmas = check_sigmas(data["sigmas"])
    if len(sigmas) - 1 != data["nfe"]:
        raise InvalidParameterError(f"{source}: nfe={data['nfe']} but it holds {len(sigmas) - 1} steps of sigmas")
    return {**data, "sigmas": sigmas}


__all__ = ["search_schedule", "boss", "boss_costs", "autodiffusion", "fit_solver", "bellman_path", "fine_grid",
           "reference_solve",
           "jump", "save_schedule", "load_schedule", "parse_schedule", "check_schedule", "sampler_of", "METHODS",
           "fingerprint", "describe_noise_schedule", "warn_if_fitted_elsewhere", "FittedElsewhereWarning"]
