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


def reference_solve(denoiser, param, x, grid, substeps: int = 8):
    """A fine ODE solve (DEIS order 3 on the grid refined `substeps` times, log-uniform in rho) from x at grid[0].

    Returns (states, denoised, final): the states and denoised predictions at every grid node but the last (the
    ones the fine solver evaluated at), and the result at sigma 0. Costs (len(grid) - 2) * substeps + 1 calls.
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
    if reference is None:
        grid = fine_grid(param, grid_size)
        states, preds, final = reference_solve(denoiser, param, x, grid, substeps)
    else:
        grid, states, preds, final = reference
    n = len(grid)
    stride = max(1, (n - 1) // 16)
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    for j in range(1, n):
        outs = [jump(method, denoiser, param, states[i], grid[i], grid[j], preds[i], options) for i in range(j)]
        if j == n - 1:
            target, outs = final, outs
        elif not propagate:
            target = states[j]
        else:                                                        # one coarse solve for every jump into j
            coarse = torch.tensor(grid[j:-1:stride] + [grid[-2], 0.0], dtype=torch.float64).unique_consecutive()
            solved = run(SAMPLERS["deis"], denoiser, torch.cat(outs + [states[j]]), coarse, param=param,
                         order=3, lower_order_final=False)
            *outs, target = solved.split(len(states[j]))
        for i, out in enumerate(outs):
            cost[i, j] = _error(out, target)
        if progress is not None:
            progress(j, n - 1)
    return grid, cost


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

    def fix(genes):                               # sorted, strictly inside (lo, hi), distinct
        genes = sorted((min(max(u, lo), hi - 1e-3) for u in genes), reverse=True)
        for i in range(1, len(genes)):
            genes[i] = min(genes[i], genes[i - 1] - 1e-3)
        return genes

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
            a = min(rng.sample(scored, 3), key=lambda t: t[0])[1]          # tournament selection
            b = min(rng.sample(scored, 3), key=lambda t: t[0])[1]
            child = [ga if rng.random() < 0.5 else gb for ga, gb in zip(a, b)]          # uniform crossover
            for i in range(m):                                                           # mutation
                if rng.random() < max(1.0 / m, 0.3):
                    child[i] += rng.gauss(0.0, scale)
            children.append(fix(child))
        scored = sorted(scored[:4] + [(fitness(c), c) for c in children], key=lambda t: t[0])  # elitism
        scale = max(0.05, scale * 0.9)
        if progress is not None:
            progress(gen + 1, generations)
    err, best = scored[0]
    return {"model_type": param.kind, "sampler": sampler, "nfe": nfe, "sigmas": sigmas_of(best),
            "created_by": "autodiffusion", "error": err, "options": options}


def fit_solver(denoiser, param, nfe: int, *, x, reference=None, init=None, depth: int = 3, iterations: int = 400,
               lr: float = 0.03, corrector: bool = True, prior_shift: bool = False, progress=None,
               substeps: int = 8, rho_range=(2e-3, 1e3)) -> dict:
    """Fit the `fitted` sampler to a model: its nfe - 1 interior sigmas, the per-step mixing weights of up to
    `depth` past x0 predictions and (corrector=True) one corrector gain per step, by Adam on the mean L2 of the
    nfe-step result to the reference solve over the calibration batch x (gradients flow through the model).

    Starts from `init` (a sigma list; default the logsnr schedule) with every weight zero, i.e. DDIM.
    prior_shift=True (VP) fits the solver that starts from x + D(x), against a reference from that start too.
    Costs iterations * nfe forward and backward model calls on x.
    """
    from . import schedules

    _check_nfe(nfe)
    if prior_shift and param.kind != "vp":
        raise InvalidParameterError("prior_shift=True is for VP models; a flow model starts from exact noise")
    start = _sigma_start(param)
    if prior_shift:                         # the solve the fitted solver imitates starts from the shifted prior
        with torch.no_grad():
            x_ref = x + denoiser(x, torch.full((len(x),), start, dtype=x.dtype))
        target = reference_solve(denoiser, param, x_ref, fine_grid(param), substeps)[2]
    else:
        target = reference[-1] if reference is not None else reference_solve(
            denoiser, param, x, fine_grid(param), substeps)[2]
    target = target.to(x.dtype)
    init = list(init) if init is not None else schedules.make_sigmas("logsnr", nfe, param).tolist()
    if len(init) != nfe + 1:
        raise InvalidParameterError(f"init has {len(init) - 1} steps of sigmas; fit_solver(nfe={nfe}) needs {nfe}")
    lo, hi = math.log(rho_range[0]), math.log(min(_rho(param, start), rho_range[1]))
    u = torch.tensor([math.log(_rho(param, float(s))) for s in init[1:-1]], dtype=torch.float64,
                     requires_grad=True)
    coeffs = [torch.zeros(min(i, depth), dtype=torch.float64, requires_grad=True) for i in range(nfe)]
    gains = torch.zeros(nfe - 1 if corrector else 0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([u, gains, *coeffs[1:]], lr=lr)

    def sigmas_of(u):
        rho = u.clamp(lo, hi).sort(descending=True).values.exp()
        inner = rho if param.kind == "vp" else rho / (1 + rho)
        return torch.cat([inner.new_tensor([start]), inner, inner.new_zeros(1)])

    def solve(x, sigmas):
        return run(SAMPLERS["fitted"], denoiser, x, sigmas, param=param, noise=None, seed=0,
                   coeffs=coeffs, gains=list(gains), prior_shift=prior_shift)

    best = (math.inf, None)
    for it in range(iterations + 1):
        sig = sigmas_of(u)
        loss = (solve(x, sig) - target).flatten(1).norm(dim=1).mean()      # _error, kept differentiable
        err = float(loss.detach())
        if math.isfinite(err) and err < best[0]:
            best = (err, (sig.detach().tolist(), [c.detach().tolist() for c in coeffs], gains.detach().tolist()))
        if it == iterations:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(it + 1, iterations)
    if best[1] is None:
        raise InvalidParameterError("fit_solver: the model gave non-finite results for every candidate solver")
    err, (sigmas, c, g) = best
    return {"model_type": param.kind, "sampler": "fitted", "nfe": nfe, "sigmas": sigmas, "created_by": "fit",
            "error": err, "options": {"coeffs": c, "gains": g, "prior_shift": prior_shift}}


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
           "jump", "save_schedule", "load_schedule", "parse_schedule", "check_schedule", "sampler_of", "METHODS"]
