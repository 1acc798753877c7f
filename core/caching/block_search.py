"""AutoDiffusion's architecture half for DiTs: which transformer blocks compute at each of K sampler steps.

AutoDiffusion (Li et al. 2023) searches one space of time steps and architectures (which blocks run) with an
evolutionary algorithm under a compute budget. Here a skipped block does not vanish: it adds the residual (output
minus input) it produced at the last step where it computed, A-SDM's feature inheritance (Hou et al. 2024) at block
granularity, as FORA / first-block caching reuse residuals. Step 0 computes every block.

1. `BlockPlanCache` applies a plan (schedule.BlockPlan) in both surfaces: one call per model evaluation, each block
   patched for that call only (patch.ModelPatch), the step from state.StepClock or the surface.
2. `search_plan`: evolutionary search (seeded; tournament selection, crossover, mutation and elitism as
   core/schedule_search.autodiffusion does for time steps, sharing its helpers) over the plan and, with
   search_sigmas, the K - 1 interior noise levels too, under a budget = share of the K x n_blocks block evaluations.
   The fitness is injected: `evaluate(plan) -> error`. AutoDiffusion's fitness is the FID of a few generated samples
   to real ones; we use the mean squared error of the final latents to the uncached reference latents of a few
   calibration prompts with fixed noise (`latent_mse`; pipelines/caching.search_block_plan builds it), which needs no
   data set and measures what a cache should keep: the uncached image.
3. Plans are saved as JSON beside the other schedules (schedule.BlockPlan.to_json; `save_plan` / `load_plan` add the
   model family and refuse a plan made for another family or block count).
"""

from __future__ import annotations

import math
import random
from typing import Callable

from ...errors import InvalidParameterError
from .first_block import _add, _io, _split, _sub
from .layouts import block_io, dit_block_paths
from .patch import ModelPatch, resolve
from .schedule import BlockPlan
from .state import StepClock

# the model family a plan is made for: the same blocks under both surfaces' class names (matched through bases)
FAMILIES = {"SD3Transformer2DModel": "sd3-mmdit", "MMDiT": "sd3-mmdit", "OpenAISignatureMMDITWrapper": "sd3-mmdit",
            "FluxTransformer2DModel": "flux"}


def model_family(model) -> str:
    family = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
    if family is None:
        raise InvalidParameterError(f"model type {type(model).__name__} has no block plans; supported: "
                                    f"{', '.join(FAMILIES)}")
    return family


class BlockPlanCache:
    """cache(forward, t, *args, stream=..., step=..., **kwargs): one model call following the plan.

    Per block and stream (cond / uncond calls, keyed with the input's shape as BlockReuse does) the residual of the
    last computing step is kept; a block the plan skips returns its input plus that residual (hidden and, for joint
    blocks, context). A block with no residual yet computes whatever the plan says."""

    def __init__(self, model, plan: BlockPlan, clock: StepClock | None = None, blocks=None):
        if not isinstance(plan, BlockPlan):
            raise InvalidParameterError(f"plan={type(plan).__name__}: need a BlockPlan (or load one with load_plan)")
        paths = list(blocks) if blocks is not None else dit_block_paths(model)
        if len(paths) != plan.n_blocks:
            raise InvalidParameterError(f"the plan is for {plan.n_blocks} transformer blocks; "
                                        f"{type(model).__name__} has {len(paths)}")
        resolve(model, paths)                                 # raises before anything is patched
        self.model, self.paths, self.plan, self.io = model, paths, plan, block_io(model)
        self.clock = clock or StepClock()
        self.store: dict = {}
        self._run = None
        self.evaluated = self.reused = 0                     # block calls computed / reused
        self.decisions: list[tuple[int, tuple[bool, ...]]] = []   # (step, blocks that computed) per call, this run

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:                       # a new image: the residuals are stale
            self.store.clear()
            self.decisions = []
            self._run = self.clock.run
        x = args[0] if args else next(iter(kwargs.values()))
        key = (stream, tuple(getattr(x, "shape", ())))
        row, ran = self.plan.computes(step), [False] * len(self.paths)
        wrappers = {p: self._block(key, j, row[j], ran) for j, p in enumerate(self.paths)}
        with ModelPatch(self.model, wrappers):
            out = forward(*args, **kwargs)
        self.decisions.append((step, tuple(ran)))
        return out

    def _block(self, key, j, compute, ran):
        def run(original, *args, **kwargs):
            hid, enc = _io(self.io, args, kwargs)
            saved = self.store.get((key, j))
            if compute or saved is None:
                out = original(*args, **kwargs)
                enc_out, hid_out = _split(out)
                # (B, N, D) residuals; a context-pre-only last block returns no context (None)
                self.store[key, j] = (_sub(enc_out, enc), hid_out - hid, isinstance(out, tuple), enc_out is None)
                ran[j] = True
                self.evaluated += 1
                return out
            r_enc, r_hid, is_tuple, no_context = saved
            self.reused += 1
            if not is_tuple:
                return hid + r_hid
            return (None if no_context else _add(enc, r_enc)), hid + r_hid
        return run

    def reset(self) -> None:
        self.clock.reset()
        self.store.clear()


# --------------------------------------------------------------------------------------------------- search

class BlockProfile:
    """Stands in for a cache in either surface (same call): every block computes, and per step the mean absolute
    change of each block's hidden residual since the previous step of the same stream is recorded -- the per-block
    counterpart of search.ResidualProfile, for `allocate_plan`."""

    def __init__(self, model, blocks=None, clock: StepClock | None = None):
        self.paths = list(blocks) if blocks is not None else dit_block_paths(model)
        resolve(model, self.paths)
        self.model, self.io, self.clock = model, block_io(model), clock or StepClock()
        self.last: dict = {}
        self.changes: dict[int, list[list[float]]] = {}      # step -> one [per block] list per call
        self._run = None

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:
            self.last.clear()
            self._run = self.clock.run
        rs = [None] * len(self.paths)

        def block(j):
            def run(original, *a, **k):
                hid = _io(self.io, a, k)[0]
                out = original(*a, **k)
                rs[j] = (_split(out)[1] - hid).detach().float()     # (B, N, D) block j's residual
                return out
            return run

        with ModelPatch(self.model, {p: block(j) for j, p in enumerate(self.paths)}):
            out = forward(*args, **kwargs)
        key = (stream, tuple(rs[0].shape))
        prev = self.last.get(key)
        if prev is not None and step > 0:
            self.changes.setdefault(step, []).append([float((r - q).abs().mean()) for r, q in zip(rs, prev)])
        self.last[key] = rs
        return out

    def profile(self) -> list[list[float]]:
        """c[i][j]: mean change of block j's residual into step i over the recorded runs (c[0] = zeros)."""
        steps = max(self.changes, default=0) + 1
        missing = [i for i in range(1, steps) if i not in self.changes]
        if steps < 2 or missing:
            raise InvalidParameterError(f"no complete profile: steps without a measurement {missing or 'all'}; run "
                                        "the uncached model through this profile for every step first")
        n = len(self.paths)
        return [[0.0] * n] + [[sum(c[j] for c in self.changes[i]) / len(self.changes[i]) for j in range(n)]
                              for i in range(1, steps)]

    def reset(self) -> None:
        self.clock.reset()
        self.last.clear()


def allocate_plan(changes, total: int, warmup: int = 1) -> BlockPlan:
    """The plan of least summed staleness (search.staleness per block, on absolute residual changes c[i][j]) with
    `total` block evaluations: for each block j and count k, the dynamic programme of search.search_schedule gives
    its best steps and cost f_j(k); a second dynamic programme over the blocks splits the total,
    g_j(t) = min_k g_{j-1}(t - k) + f_j(k). A per-step schedule is the case where every block gets the same steps;
    this lets blocks whose residual changes slowly compute less often. Used to seed the evolutionary search."""
    from .search import search_schedule, staleness

    steps, n = len(changes), len(changes[0])
    if not n * warmup <= total <= steps * n:
        raise InvalidParameterError(f"total={total}: need between {n * warmup} (warm-up steps of every block) and "
                                    f"{steps * n} block evaluations")
    best = []                                      # best[j][k] = (cost, flags) with k computing steps
    for j in range(n):
        col = [float(changes[i][j]) for i in range(steps)]
        best.append({k: (staleness(col, sch.compute), sch.compute)
                     for k in range(warmup, steps + 1) for sch in [search_schedule(col, k, warmup)]})
    g = {0: (0.0, [])}                             # evaluations so far -> (cost, counts per block)
    for j in range(n):
        nxt = {}
        for t, (cost, counts) in g.items():
            for k, (f, _) in best[j].items():
                if t + k <= total and (t + k not in nxt or cost + f < nxt[t + k][0]):
                    nxt[t + k] = (cost + f, counts + [k])
        g = nxt
    counts = g[total][1]
    cols = [best[j][k][1] for j, k in enumerate(counts)]
    return BlockPlan(tuple(tuple(cols[j][i] for j in range(n)) for i in range(steps)))


def latent_mse(latents, reference) -> float:
    """The search's fitness: mean squared error of final latents to the uncached reference (same prompts, noise)."""
    err = float(((latents.float() - reference.float()) ** 2).mean())
    return err if math.isfinite(err) else math.inf


def budget_cells(steps: int, n_blocks: int, budget: float) -> int:
    """Block evaluations a plan may use: round(budget * steps * n_blocks), at least step 0's n_blocks."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise InvalidParameterError(f"budget={budget!r}: need a share in (0, 1] of the steps x blocks evaluations")
    total = round(budget * steps * n_blocks)
    if total < n_blocks:
        raise InvalidParameterError(f"budget={budget:g} allows {total} of {steps} x {n_blocks} block evaluations; "
                                    f"step 0 alone computes all {n_blocks} (need budget >= {1 / steps:.3f})")
    return total


def _plan(cells, steps, n_blocks, sigmas=None) -> BlockPlan:
    """A plan from the set of computing (step, block) cells after step 0."""
    return BlockPlan(((True,) * n_blocks,) + tuple(tuple((i, j) in cells for j in range(n_blocks))
                                                   for i in range(1, steps)), sigmas)


def _cells(plan: BlockPlan) -> frozenset:
    return frozenset((i, j) for i in range(1, plan.steps) for j in range(plan.n_blocks) if plan.blocks[i][j])


def _repair(cells, m, free, rng) -> frozenset:
    """Exactly m computing cells: drop random ones or add random free ones (the budget is always spent in full)."""
    cells = sorted(cells)
    rng.shuffle(cells)
    cells = set(cells[:m])
    rest = sorted(free - cells)
    rng.shuffle(rest)
    cells.update(rest[:m - len(cells)])
    return frozenset(cells)


def _uniform_cells(steps, n_blocks, m) -> frozenset:
    """The per-step schedule at this budget: m // n_blocks evenly spaced full steps after step 0, and the
    remainder's blocks computed at the next step in line."""
    full, extra = divmod(m, n_blocks)
    picks = [1 + round(k * (steps - 1) / (full + 1)) for k in range(1, full + 2)]
    cells = {(i, j) for i in sorted(set(picks[:full])) for j in range(n_blocks)}
    nxt = next((i for i in range(1, steps) if (i, 0) not in cells), None)
    if extra and nxt is not None:
        cells |= {(nxt, j) for j in range(extra)}
    return frozenset(cells)


def _mutate(cells, free, steps, rng) -> frozenset:
    """1-3 moves, each keeping the budget: half the time a computing cell moves to a nearby step of the same block
    (a local refinement of when that block refreshes), else it swaps with a random skipped cell."""
    cells = set(cells)
    for _ in range(1 + min(2, int(rng.expovariate(1.0)))):
        i, j = rng.choice(sorted(cells))
        near = [(i + d, j) for d in (-2, -1, 1, 2) if (i + d, j) in free and (i + d, j) not in cells]
        target = rng.choice(near) if near and rng.random() < 0.5 else rng.choice(sorted(free - cells))
        cells.discard((i, j))
        cells.add(target)
    return frozenset(cells)


def search_plan(evaluate: Callable[[BlockPlan], float], steps: int, n_blocks: int, budget: float, *,
                population: int = 12, generations: int = 8, seed: int = 0, init=(), sigmas=None,
                search_sigmas: bool = False, elite: int = 2, rho_range=(2e-3, 1e3), progress=None) -> dict:
    """Evolutionary search for the plan of least `evaluate(plan)` using budget_cells(steps, n_blocks, budget) block
    evaluations (exactly: more never costs less).

    Genes: the set of (step, block) cells that compute after step 0 and, with search_sigmas, the K - 1 interior
    noise levels as log rho (rho = sigma / (1 - sigma), flow models), first and last (0) fixed from `sigmas`.
    The first population holds the `init` plans (e.g. a per-step schedule via BlockPlan.from_schedule; repaired to
    the budget), the evenly spaced per-step plan, and seeded random plans. Each generation: tournament selection,
    crossover (cells both parents compute, then cells from either until the budget is spent), mutation (move a
    computing cell to a nearby step of its block, or swap it with a random skipped one; Gaussian steps on the sigma
    genes), `elite` best kept. Evaluations of a plan seen before are not repeated.
    Returns {"plan", "error", "evaluations", "history" (best error per generation), "init_errors" (of `init`)}.
    """
    from ..schedule_search import breed, sorted_genes, tournament

    for name, v, low in (("steps", steps, 1), ("n_blocks", n_blocks, 1), ("population", population, 2),
                         ("generations", generations, 0), ("elite", elite, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InvalidParameterError(f"{name}={v!r}: need an integer >= {low}")
    m = budget_cells(steps, n_blocks, budget) - n_blocks
    if sigmas is not None:
        sigmas = BlockPlan.full(steps, n_blocks, sigmas).sigmas       # validated: K + 1 levels ending at 0
    if search_sigmas:
        if sigmas is None:
            raise InvalidParameterError("search_sigmas=True needs the starting sigmas (K + 1 noise levels)")
        if not 0 < sigmas[0] <= 1:
            raise InvalidParameterError(f"search_sigmas: sigmas[0]={sigmas[0]:g}; the sigma search is for flow "
                                        "models (noise levels in (0, 1])")
    rng = random.Random(seed)
    free = frozenset((i, j) for i in range(1, steps) for j in range(n_blocks))
    lo = math.log(rho_range[0])
    hi = math.log(min(sigmas[0] / (1 - sigmas[0]), rho_range[1])) if search_sigmas and sigmas[0] < 1 \
        else math.log(rho_range[1])

    def genes_of(sig):
        return sorted_genes([math.log(s / (1 - s)) for s in sig[1:-1]], lo, hi) if search_sigmas else ()

    def sigmas_of(genes):
        if not search_sigmas:
            return sigmas
        return (sigmas[0],) + tuple(math.exp(u) / (1 + math.exp(u)) for u in genes) + (0.0,)

    seen: dict = {}

    def score(cells, genes):
        key = (cells, tuple(genes))
        if key not in seen:
            seen[key] = evaluate(_plan(cells, steps, n_blocks, sigmas_of(genes)))
        return seen[key], (cells, tuple(genes))

    # 1. first population: given plans, the per-step plan at this budget, random plans
    start = genes_of(sigmas) if search_sigmas else ()
    pool = []
    for p in init:
        if p.steps != steps or p.n_blocks != n_blocks:
            raise InvalidParameterError(f"init plan of {p.steps} steps x {p.n_blocks} blocks; the search is for "
                                        f"{steps} x {n_blocks}")
        pool.append((_repair(_cells(p), m, free, rng), genes_of(p.sigmas) if search_sigmas and p.sigmas else start))
    pool.append((_uniform_cells(steps, n_blocks, m), start))
    while len(pool) < population:
        pool.append((_repair((), m, free, rng), start))
    scored = sorted((score(c, g) for c, g in pool), key=lambda t: t[0])
    history = [scored[0][0]]
    scale, size = 0.3, min(3, len(scored))
    cells_space = m > 0 and m < len(free)
    # 2. generations
    for gen in range(generations):
        children = []
        while len(children) < population - elite:
            (ca, ga), (cb, gb) = tournament(scored, rng, size), tournament(scored, rng, size)
            cells = _repair(ca & cb, m, ca | cb, rng)        # |ca| = |cb| = m: the union always suffices
            if cells_space:
                cells = _mutate(cells, free, steps, rng)
            genes = sorted_genes(breed(list(ga), list(gb), rng, scale), lo, hi) if search_sigmas and ga else ga
            children.append((cells, genes))
        scored = sorted(scored[:elite] + [score(c, g) for c, g in children], key=lambda t: t[0])
        scale = max(0.05, scale * 0.9)
        history.append(scored[0][0])
        if progress is not None:
            progress(gen + 1, generations)
    err, (cells, genes) = scored[0]
    return {"plan": _plan(cells, steps, n_blocks, sigmas_of(genes) if search_sigmas else sigmas), "error": err,
            "evaluations": len(seen), "history": history,
            "init_errors": [seen[c, tuple(g)] for c, g in pool[:len(init)]]}


# ------------------------------------------------------------------------------------------------------ JSON

def save_plan(path, plan: BlockPlan, model, **extra) -> None:
    """JSON {"model_type": the model family, "kind": "block-plan", "n_blocks", "steps", "blocks", "sigmas"?, ...}."""
    n = len(dit_block_paths(model))
    if plan.n_blocks != n:
        raise InvalidParameterError(f"the plan has {plan.n_blocks} blocks per step; {type(model).__name__} has {n}")
    plan.to_json(path, model_family(model), created_by="autodiffusion-blocks", **extra)


def load_plan(path, model) -> BlockPlan:
    """A saved plan, after checking it was made for this model family and block count."""
    family = model_family(model)
    return BlockPlan.from_json(path, family, len(dit_block_paths(model)))[0]


__all__ = ["BlockPlanCache", "BlockProfile", "FAMILIES", "allocate_plan", "budget_cells", "latent_mse", "load_plan",
           "model_family", "save_plan", "search_plan"]
