"""Offline per-step cache schedules for DiTs: which steps recompute the transformer blocks.

1. Profile (`ResidualProfile`): run the model uncached on calibration prompts; at each step record the relative L1
   change of the whole block stack's residual (last block's hidden output minus first block's hidden input) since
   the previous step -- the quantity first-block caching estimates online from the first block alone (TeaCache's
   accumulated change, Liu et al. 2024; MagCache's calibrated per-step ratios, Ma et al. 2025).
2. Search (`search_schedule`): choose which `full_steps` of the steps compute, minimising the total staleness of the
   reused residual, sum over skipped steps i of sum_{k = last full step + 1 .. i} c_k, by dynamic programming over
   the position of the full steps (as BOSS searches step positions, core/schedule_search.py).
3. Save (`save_schedule` / `load_schedule`): a CacheSchedule JSON with the block count it was made for, which
   `FirstBlockCache(schedule=...)` follows in both surfaces (pipelines/caching.py, nodes/caching.py).
"""

from __future__ import annotations

import math
from typing import Sequence

from ...errors import InvalidParameterError, WeightsFormatError
from .first_block import _io, _split
from .layouts import block_io, dit_block_paths
from .patch import ModelPatch, resolve
from .schedule import CacheSchedule
from .state import StepClock

KIND = "dit-cache"


class ResidualProfile:
    """Stands in for a cache in either surface (same call): computes every step in full and records per step the
    relative change of the block stack's residual since the previous step of the same stream."""

    def __init__(self, model, blocks=None, clock: StepClock | None = None):
        self.paths = list(blocks) if blocks is not None else dit_block_paths(model)
        resolve(model, self.paths)
        self.model, self.io, self.clock = model, block_io(model), clock or StepClock()
        self.last: dict = {}
        self.changes: dict[int, list[float]] = {}
        self._run = None

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:
            self.last.clear()
            self._run = self.clock.run
        rec = {}

        def head(original, *a, **k):
            rec["in"] = _io(self.io, a, k)[0]
            return original(*a, **k)

        def tail(original, *a, **k):
            out = original(*a, **k)
            rec["out"] = _split(out)[1]
            return out

        with ModelPatch(self.model, {self.paths[0]: head, self.paths[-1]: tail}):
            out = forward(*args, **kwargs)
        r = (rec["out"] - rec["in"]).detach().float()             # (B, N, D) the whole stack's residual
        key = (stream, tuple(r.shape))
        prev = self.last.get(key)
        if prev is not None and step > 0:
            change = float((r - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            self.changes.setdefault(step, []).append(change)
        self.last[key] = r
        return out

    def profile(self) -> list[float]:
        """c_i, the mean change into step i over the recorded runs (c_0 = 0)."""
        steps = max(self.changes, default=0) + 1
        missing = [i for i in range(1, steps) if i not in self.changes]
        if steps < 2 or missing:
            raise InvalidParameterError(f"no complete profile: steps without a measurement {missing or 'all'}; run "
                                        "the uncached model through this profile for every step first")
        return [0.0] + [sum(self.changes[i]) / len(self.changes[i]) for i in range(1, steps)]

    def reset(self) -> None:
        self.clock.reset()
        self.last.clear()


def staleness(changes: Sequence[float], compute: Sequence[bool]) -> float:
    """The search's cost of a schedule: sum over skipped steps of the change accumulated since the last full step."""
    cost, acc = 0.0, 0.0
    for c, full in zip(changes, compute):
        acc = 0.0 if full else acc + c
        cost += acc
    return cost


def search_schedule(changes: Sequence[float], full_steps: int, warmup: int = 1) -> CacheSchedule:
    """The schedule with exactly `full_steps` computed steps (the first `warmup` among them) of least staleness.

    f[k][i]: least cost of steps 0..i when step i is the k-th full step; skipping j+1..i-1 after full step j costs
    seg(j, i) = sum_{m=j+1}^{i-1} (C[m] - C[j]) with C the prefix sums of the changes."""
    c = [float(v) for v in changes]
    S = len(c)
    if S < 1 or not all(math.isfinite(v) and v >= 0 for v in c):
        raise InvalidParameterError(f"changes={c!r}: need a non-empty list of finite, non-negative per-step changes")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 1 <= warmup <= S:
        raise InvalidParameterError(f"warmup={warmup!r}: need an integer in 1..{S} (the number of steps)")
    if isinstance(full_steps, bool) or not isinstance(full_steps, int) or not warmup <= full_steps <= S:
        raise InvalidParameterError(f"full_steps={full_steps!r}: need an integer in {warmup}..{S} (at least the "
                                    f"warm-up steps, at most all {S} steps)")
    C = [0.0]
    for v in c[1:]:
        C.append(C[-1] + v)

    def seg(j, i):                                             # steps j+1..i-1 skipped after full step j
        if i > j + 1 and j + 1 < warmup:
            return math.inf                                    # a warm-up step may not be skipped
        return sum(C[m] - C[j] for m in range(j + 1, i))

    inf = math.inf
    f = [[inf] * S for _ in range(full_steps + 1)]
    back = [[-1] * S for _ in range(full_steps + 1)]
    f[1][0] = 0.0
    for k in range(2, full_steps + 1):
        for i in range(k - 1, S):
            for j in range(k - 2, i):
                v = f[k - 1][j] + seg(j, i)
                if v < f[k][i]:
                    f[k][i], back[k][i] = v, j
    best, last = min((f[full_steps][j] + seg(j, S), j) for j in range(S))
    if best == inf:
        raise InvalidParameterError(f"no schedule with {full_steps} full steps and warmup={warmup} in {S} steps")
    full, k, j = {last}, full_steps, last
    while k > 1:
        j = back[k][j]
        full.add(j)
        k -= 1
    return CacheSchedule(tuple(i in full for i in range(S)))


def save_schedule(path, schedule: CacheSchedule, blocks: int, **extra) -> None:
    """JSON {"model_type": "dit", "kind": "dit-cache", "blocks", "steps", "compute", ...extra}."""
    schedule.to_json(path, "dit", kind=KIND, blocks=blocks, steps=len(schedule.compute), **extra)


def load_schedule(path, model) -> CacheSchedule:
    """A saved DiT cache schedule, after checking it was made for a stack of this many blocks."""
    schedule, data = CacheSchedule.from_json(path, "dit")
    n = len(dit_block_paths(model))
    if data.get("kind") != KIND or data.get("blocks") != n:
        raise WeightsFormatError(f"{path}: a {data.get('kind')!r} schedule for {data.get('blocks')} blocks; "
                                 f"{type(model).__name__} has {n} (need kind {KIND!r}, made for this model)")
    return schedule

