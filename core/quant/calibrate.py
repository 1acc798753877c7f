"""Q-Diffusion calibration, AdaRound rounding, and HAWQ-V2 mixed precision. Pure torch; the model is any module.

Q-Diffusion (Li et al. 2023) §4: calibrate on the diffusion model's own sampling trajectory, sampling inputs
uniformly over all timesteps (activation statistics drift with t), and split the quantizer of a UNet skip
concatenation. Here: ``collect`` runs the caller's sampler (``run()``, e.g. a few prompts through the float model)
with hooks that keep a few random input rows of every layer from every denoiser call (and X^T X over all rows);
``calibrate_layer`` then tries, and keeps only where they lower the output error on held-out rows: a per-row
clipping ratio (||(W - Q(W)) X^T||^2 is separable over rows), GPTQ error feedback (Frantar et al. 2023) on the
round-to-nearest grid and, for group-wise schemes, on a grid whose group ranges minimise the error weighted by the
inputs' energy diag(X^T X) (llama.cpp's importance matrix), and AdaRound (Nagel et al. 2020; the layer-wise case
of BRECQ's block reconstruction) for a bounded number of steps. ``calibrate_model`` swaps all layers at once. On NimbleDiff-Tiny the clipping alone made
the end-to-end error worse than round-to-nearest (its bias adds up over layers); GPTQ is what lowers it.

HAWQ-V2 (Dong et al. 2020): layer sensitivity Omega = Tr(H)/n * ||Q(W) - W||^2 with Tr(H) by Hutchinson's
estimator E[v^T H v] (Rademacher v) on the caller's denoising loss; ``allocate`` picks per-layer schemes under a
bits budget, greedily by d(Omega)/d(bits) or exactly by dynamic programming (the integer program of
layer-wise mixed precision, discretised bits).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError
from .act import ActQuant
from .modules import eligible_layers, replace, resolve_scheme, wrap
from .packing import grouped
from .tensor import QuantizedWeight

__all__ = ["Activations", "collect", "calibrate_layer", "calibrate_model", "output_error", "hutchinson_traces",
           "sensitivities", "allocate", "CLIP_GRID"]

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


# ---- 1. activations along the trajectory ------------------------------------------------------------------------

@dataclass
class Activations:
    """Per layer: sampled input rows (N, K) (im2col rows for a conv) and the per-channel |x| max of every call."""

    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    amax: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    timesteps: list = field(default_factory=list)  # one entry per denoiser call
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x^T x over ALL rows (GPTQ's H / 2)
    count: dict[str, int] = field(default_factory=dict)

    def matrix(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name], 0)

    def channel_amax(self, name: str) -> torch.Tensor:
        return torch.stack(self.amax[name], 0).amax(0)


def _rows_of(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, torch.nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, K, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _default_timestep(args, kwargs):
    t = kwargs.get("timestep", kwargs.get("sigma", args[1] if len(args) > 1 else None))
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t


def collect(model: torch.nn.Module, run: Callable[[], object], layers: Mapping[str, torch.nn.Module], *,
            rows_per_call: int = 32, seed: int = 0, timestep_of=_default_timestep,
            gram_max: int = 0) -> Activations:
    """Run ``run()`` (which must call ``model`` once per denoising step) and sample each layer's input rows.

    Every call contributes ``rows_per_call`` rows per layer, so all timesteps of the trajectory weigh the same.
    Layers with at most ``gram_max`` input features also accumulate X^T X over all their rows (for GPTQ)."""
    acts = Activations({n: [] for n in layers}, {n: [] for n in layers})
    gen = torch.Generator().manual_seed(seed)

    def on_model(_m, args, kwargs):
        acts.timesteps.append(timestep_of(args, kwargs))

    def on_layer(name):
        def hook(layer, args):
            x = args[0].detach()
            cdim = 1 if isinstance(layer, torch.nn.Conv2d) else -1
            acts.amax[name].append(x.abs().float().movedim(cdim, 0).reshape(x.shape[cdim], -1).amax(1).cpu())
            r = _rows_of(layer, x)
            if r.shape[1] <= gram_max:
                rf = r.float()
                acts.gram[name] = acts.gram.get(name, 0) + (rf.T @ rf).cpu()
                acts.count[name] = acts.count.get(name, 0) + r.shape[0]
            idx = torch.randperm(r.shape[0], generator=gen)[:rows_per_call].to(r.device)
            acts.rows[name].append(r[idx].float().cpu())
        return hook

    handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
    try:
        handles += [m.register_forward_pre_hook(on_layer(n)) for n, m in layers.items()]
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not acts.timesteps:
        raise InvalidParameterError("calibration: the sampler callback never called the model (no prompts or zero "
                                    "steps?); pass a run() that samples at least one prompt")
    missing = [n for n, r in acts.rows.items() if not r]
    if missing:
        raise InvalidParameterError(f"calibration: layers {missing[:5]} were never called during sampling")
    return acts


# ---- 2. per-layer calibration -----------------------------------------------------------------------------------

def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per output row, ||(w - wq) x^T||^2 for rows x (N, K); w, wq (out, ...)."""
    d = (w.reshape(w.shape[0], -1) - wq.reshape(w.shape[0], -1)).float()
    return (d @ x.T).pow(2).sum(1)


def _scheme_fn(scheme):
    fn = resolve_scheme(scheme)
    target = getattr(fn, "func", fn)
    try:
        takes_clip = "clip" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_clip = False
    return fn, takes_clip


def calibrate_layer(w: torch.Tensor, scheme, x: torch.Tensor, *, clip_grid=CLIP_GRID, adaround_iters: int = 0,
                    gram: torch.Tensor | None = None, seed: int = 0) -> tuple[QuantizedWeight, dict]:
    """Quantize float ``w`` (out, ...) minimising the output error on input rows ``x`` (N, K).

    Every 5th row is held out: a refinement is kept only if it also lowers the held-out error (with a few hundred
    rows and K in the thousands, AdaRound can fit the calibration rows and lose elsewhere). Returns the weight and
    {"rtn", "calibrated"}: relative held-out output errors of round-to-nearest and of the result."""
    fn, takes_clip = _scheme_fn(scheme)
    w = w.detach().float()
    x = x.float()
    held = torch.zeros(x.shape[0], dtype=torch.bool)
    held[::5] = x.shape[0] >= 10
    fit, val = x[~held], (x[held] if held.any() else x)
    ref = (w.reshape(w.shape[0], -1) @ val.T).pow(2).sum().clamp_min(1e-30)
    rtn = fn(w)
    best, err = rtn, output_error(w, rtn.dequantize(), val)
    rtn_err = err.sum()

    def consider(cand):
        nonlocal best, err
        e = output_error(w, cand.dequantize(), val)
        if e.sum() < err.sum():
            best, err = cand, e

    if takes_clip and len(clip_grid) > 1:
        # 1. per-row clip search (rows quantize independently, so the per-row argmin is exact)
        errs = torch.stack([output_error(w, fn(w, clip=c).dequantize(), fit) for c in clip_grid])  # (C, out)
        consider(fn(w, clip=torch.tensor(clip_grid)[errs.argmin(0)]))
    if gram is not None and hasattr(rtn, "affine_grid"):
        # 2. GPTQ error feedback on the round-to-nearest grid, with H from every input row of the trajectory
        consider(gptq(w, rtn, gram))
        if takes_clip and getattr(rtn, "group", None):
            # 2b. each group's range chosen by its importance-weighted error sum_k H_kk (w_k - q_k)^2 (the diagonal
            # of H = X^T X: llama.cpp's importance matrix for K-quants), then GPTQ on that grid. A plain weight-error
            # range search hurt on NimbleDiff-Tiny (schemes.py); weighting by the inputs' energy is what makes the
            # grid fit the output error GPTQ then minimises.
            grid = fn(w, clip=_group_clip(w, fn, torch.diag(gram.float()), rtn.group, clip_grid))
            consider(grid)
            consider(gptq(w, grid, gram))
    if adaround_iters > 0 and hasattr(best, "affine_grid"):
        # 3. learned rounding on the chosen grid
        consider(adaround(w, best, fit, iters=adaround_iters, seed=seed))
    return best, {"rtn": math.sqrt(rtn_err / ref), "calibrated": math.sqrt(err.sum() / ref)}


def _group_clip(w: torch.Tensor, fn, importance: torch.Tensor, group: int, clip_grid) -> torch.Tensor:
    """(out, G) clip ratios from clip_grid, per group the one minimising sum_k importance_k (w_k - q_k)^2."""
    W = w.reshape(w.shape[0], -1)
    h = grouped(importance[None].expand_as(W), group)[0]  # (out, G, group)
    errs = torch.stack([(grouped(W - fn(w, clip=c).dequantize().reshape(W.shape), group)[0].pow(2) * h).sum(-1)
                        for c in clip_grid])  # (C, out, G)
    return torch.tensor(clip_grid, dtype=torch.float32)[errs.argmin(0)]


def gptq(w: torch.Tensor, qw, gram: torch.Tensor, *, block: int = 128, damp: float = 0.01):
    """GPTQ (Frantar et al. 2023, Alg. 1) on qw's fixed grid ("static groups"), columns in descending H_ii order.

    Each column is rounded, and its error (w - q) / [H^-1]_ii is spread over the not-yet-quantized columns through
    the Cholesky factor of H^-1 (H = X^T X over the calibration rows), which minimises ||(W - Q) X^T||^2 far
    better than rounding each weight alone."""
    s, m, qmin, qmax = qw.affine_grid()
    W = w.detach().float().reshape(w.shape[0], -1).clone()  # (out, K)
    s, m = s.expand_as(W).contiguous(), m.expand_as(W).contiguous()
    H = gram.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True)  # "act order": most active inputs first
    W, s, m, H = W[:, perm], s[:, perm], m[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    K = W.shape[1]
    Qc = torch.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w_col, d = W1[:, i], U1[i, i]
            c = torch.clamp(torch.round((w_col - m[:, i1 + i]) / s[:, i1 + i]), qmin, qmax)
            Qc[:, i1 + i] = c
            err = (w_col - (c * s[:, i1 + i] + m[:, i1 + i])) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = torch.empty_like(Qc)
    codes[:, perm] = Qc
    return qw.with_codes(codes)


def adaround(w: torch.Tensor, qw, x: torch.Tensor, *, iters: int = 200, lr: float = 5e-2, lam: float = 0.01,
             seed: int = 0):
    """AdaRound (Nagel et al. 2020, eq. 21-24): learn up/down rounding per weight on qw's fixed grid.

    W_soft = (clamp(floor(W') + h(V), qmin, qmax)) s + m with the rectified sigmoid h; the loss is the output
    reconstruction error (normalised by its round-to-nearest value) plus lam * sum(1 - |2h - 1|^beta), beta
    annealed 20 -> 2 after a 20% warm-up. ``iters`` bounds the work."""
    zeta, gamma = 1.1, -0.1
    s, m, qmin, qmax = qw.affine_grid()
    W = w.reshape(w.shape[0], -1)
    s, m = s.expand_as(W), m.expand_as(W)
    t = (W - m) / s
    base = torch.floor(t)
    rest = (t - base).clamp(0.01, 0.99)
    V = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
    x = x.float()
    norm = output_error(W, qw.dequantize().reshape(W.shape), x).sum().clamp_min(1e-30)
    opt = torch.optim.Adam([V], lr=lr)
    torch.manual_seed(seed)
    warm = int(0.2 * iters)
    for i in range(iters):
        h = (torch.sigmoid(V) * (zeta - gamma) + gamma).clamp(0, 1)
        wsoft = torch.clamp(base + h, qmin, qmax) * s + m
        rec = ((W - wsoft) @ x.T).pow(2).sum() / norm
        if i < warm:
            loss = rec
        else:
            beta = 20 + (2 - 20) * (i - warm) / max(iters - warm, 1)
            loss = rec + lam * (1 - (2 * h - 1).abs().pow(beta)).sum() / W.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = (torch.sigmoid(V) * (zeta - gamma) + gamma).clamp(0, 1)
        q = torch.clamp(base + (h >= 0.5).float(), qmin, qmax)
    return qw.with_codes(q)


def calibrate_model(model: torch.nn.Module, scheme, run: Callable[[], object], *,
                    per_layer: Mapping[str, object] | None = None, include=None, exclude=None, min_numel: int = 0,
                    rows_per_call: int = 32, clip_grid=CLIP_GRID, adaround_iters: int = 0, gptq_max: int = 4096,
                    w8a8: bool = False,
                    skip_splits: Mapping[str, int] | None = None, seed: int = 0,
                    progress: Callable[[int, int, str], None] | None = None) -> dict[str, dict]:
    """Calibrate and quantize every eligible layer of ``model`` in place; return {name: errors and scheme}.

    ``run()`` samples a few prompts with the float model (it calls ``model`` per step). Layers with at most
    ``gptq_max`` input features (K x K statistics) also try GPTQ rounding. ``per_layer`` overrides the
    scheme per layer (None keeps a layer float). ``w8a8`` adds static int8 activation quantizers to int8 layers,
    with the skip-concatenation layers in ``skip_splits`` {name: channel where the skip half starts} split in two.
    Nothing is swapped until every layer is done."""
    per_layer = dict(per_layer or {})
    layers = {n: m for n, m in eligible_layers(model, include, exclude, min_numel).items()
              if per_layer.get(n, scheme) is not None}
    acts = collect(model, run, layers, rows_per_call=rows_per_call, seed=seed, gram_max=gptq_max)
    new, report = {}, {}
    for i, (name, layer) in enumerate(layers.items()):
        sch = per_layer.get(name, scheme)
        x = acts.matrix(name)
        qw, info = calibrate_layer(layer.weight.detach(), sch, x, clip_grid=clip_grid, gram=acts.gram.get(name),
                                   adaround_iters=adaround_iters, seed=seed)
        q = wrap(layer, qw.to(layer.weight.device))
        if w8a8 and getattr(qw, "kind", "") == "int8":
            q.act_quant = _static_act(layer, acts.channel_amax(name), (skip_splits or {}).get(name))
        new[name] = q
        report[name] = {"scheme": sch if isinstance(sch, str) else getattr(sch, "__name__", "custom"),
                        "bits_per_weight": qw.bits_per_weight, **info}
        if progress is not None:
            progress(i + 1, len(layers), name)
    replace(model, new)
    report["_timesteps"] = list(acts.timesteps)
    return report


def _static_act(layer, amax: torch.Tensor, split: int | None) -> ActQuant:
    """One scale per segment from the trajectory's channel maxima (Q-Diffusion's split shortcut quantizer)."""
    edges = (0, split, amax.numel()) if split else (0, amax.numel())
    scale = torch.stack([amax[a:b].max() for a, b in zip(edges[:-1], edges[1:])]) / 127
    return ActQuant(scale.clamp_min(1e-8), (split,) if split else (),
                    channel_dim=1 if isinstance(layer, torch.nn.Conv2d) else -1)


# ---- 3. HAWQ-V2 mixed precision ----------------------------------------------------------------------------------

def hutchinson_traces(loss_fn: Callable[[], torch.Tensor], params: Mapping[str, torch.Tensor], *, probes: int = 8,
                      seed: int = 0) -> dict[str, float]:
    """Tr(d^2 loss / dW^2) per parameter tensor by Hutchinson: mean over Rademacher v of v^T (H v).

    ``loss_fn()`` is the denoising loss averaged over timesteps (the caller builds it); one graph serves all
    probes (Hessian-vector products by double backprop)."""
    if probes < 1:
        raise InvalidParameterError(f"probes must be >= 1, got {probes}")
    names, ps = list(params), list(params.values())
    with torch.enable_grad():
        flags = [p.requires_grad for p in ps]
        for p in ps:
            p.requires_grad_(True)
        try:
            loss = loss_fn()
            grads = torch.autograd.grad(loss, ps, create_graph=True)
            gen = torch.Generator().manual_seed(seed)
            tr = torch.zeros(len(ps), dtype=torch.float64)
            for _ in range(probes):
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in ps]
                hv = torch.autograd.grad(grads, ps, vs, retain_graph=True)
                tr += torch.stack([(h * v).sum().double() for h, v in zip(hv, vs)])
        finally:
            for p, f in zip(ps, flags):
                p.requires_grad_(f)
    return {n: float(t / probes) for n, t in zip(names, tr)}


def sensitivities(layers: Mapping[str, torch.nn.Module], traces: Mapping[str, float],
                  schemes) -> dict[str, list[tuple[object, float, float]]]:
    """{layer: [(scheme, stored bits, Omega)]} with Omega = Tr(H)/n ||Q(W) - W||^2 (HAWQ-V2 eq. 3).

    A scheme None means keep the layer in fp16 (16 bits per weight, Omega 0)."""
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        opts = []
        for s in schemes:
            if s is None:
                opts.append((None, 16.0 * w.numel(), 0.0))
                continue
            qw = resolve_scheme(s)(w)
            omega = max(traces[name], 0.0) / w.numel() * float((qw.dequantize() - w).pow(2).sum())
            opts.append((s, 8.0 * qw.nbytes, omega))
        out[name] = sorted(opts, key=lambda o: o[1])
    return out


def allocate(options: Mapping[str, list[tuple[object, float, float]]], budget_bits: float, *,
             method: str = "greedy", resolution: int = 4000) -> dict[str, object]:
    """Per-layer scheme minimising sum Omega with total stored bits <= budget_bits.

    greedy: start from the smallest option of every layer and repeatedly take the upgrade with the largest
    Omega decrease per extra bit that still fits. ip: exact dynamic program over the extra bits above the
    smallest allocation, discretised (rounded up) into ``resolution`` units (a multiple-choice knapsack, the integer program of mixed-precision allocation)."""
    low = sum(o[0][1] for o in options.values())
    if low > budget_bits:
        raise InvalidParameterError(f"bit budget {budget_bits:.0f} bits is below the smallest allocation "
                                    f"({low:.0f} bits); raise the budget or add a smaller scheme")
    if method == "greedy":
        pick = {n: 0 for n in options}
        used = low
        while True:
            best = None
            for n, opts in options.items():
                cur = opts[pick[n]]
                for j in range(pick[n] + 1, len(opts)):
                    db, dom = opts[j][1] - cur[1], cur[2] - opts[j][2]
                    if dom > 0 and used + db <= budget_bits:
                        ratio = dom / max(db, 1e-9)
                        if best is None or ratio > best[0]:
                            best = (ratio, n, j, db)
            if best is None:
                break
            _, n, j, db = best
            pick[n], used = j, used + db
        return {n: options[n][j][0] for n, j in pick.items()}
    if method != "ip":
        raise InvalidParameterError(f"allocate method must be 'greedy' or 'ip', got {method!r}")
    # costs are the extra bits over each layer's smallest option, rounded up (never over the true budget)
    if budget_bits - low <= 0:
        return {n: o[0][0] for n, o in options.items()}
    unit = (budget_bits - low) / resolution
    inf = float("inf")
    dp = [0.0] + [inf] * resolution  # dp[b] = min Omega using exactly <= b units so far
    choice = []
    for n, opts in options.items():
        costs = [math.ceil((o[1] - opts[0][1]) / unit - 1e-9) for o in opts]
        new, arg = [inf] * (resolution + 1), [-1] * (resolution + 1)
        for b in range(resolution + 1):
            if dp[b] == inf:
                continue
            for j, (c, o) in enumerate(zip(costs, opts)):
                nb = b + c
                if nb <= resolution and dp[b] + o[2] < new[nb]:
                    new[nb], arg[nb] = dp[b] + o[2], j * (resolution + 1) + b
        dp = new
        choice.append((n, arg))
    b = min(range(resolution + 1), key=lambda i: dp[i])
    pick = {}
    for n, arg in reversed(choice):
        j, b = divmod(arg[b], resolution + 1)
        pick[n] = options[n][j][0]
    return pick
