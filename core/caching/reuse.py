"""Feature inheritance (A-SDM, Hou et al. 2024, tuning-free part): on an off-step, a module returns the output it
produced at the last full step instead of computing. The module paths set the granularity -- a block
("up_blocks.1"), a layer ("up_blocks.1.attentions.0") or a unit ("...transformer_blocks.0.attn1") -- and DeepCache
is the path set `layouts.deepcache_paths` (reuse everything under a shallow branch)."""

from __future__ import annotations

from .patch import ModelPatch, resolve
from .schedule import CacheSchedule
from .state import StepClock


class BlockReuse:
    """cache(forward, t, *args, stream=..., **kwargs) runs one model call at timestep t with reuse on off-steps.

    `stream` separates calls that must not share features within a step (ComfyUI's cond and uncond batches); the
    input's shape is part of the key, so a different batch never receives another batch's features."""

    def __init__(self, model, paths, schedule, clock: StepClock | None = None):
        paths = list(paths)
        if not paths:
            from ...errors import InvalidParameterError

            raise InvalidParameterError("paths=[]: name at least one module to reuse")
        resolve(model, paths)                       # raises before anything is patched
        self.model, self.paths = model, paths
        self.schedule = CacheSchedule.parse(schedule)
        self.clock = clock or StepClock()
        self.store: dict = {}
        self._run = None
        self.full_calls = self.reused_calls = 0     # model calls, for "share of calls skipped"

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:             # a new run: features of the last image are stale
            self.store.clear()
            self._run = self.clock.run
        x = args[0] if args else next(iter(kwargs.values()))
        key = (stream, tuple(getattr(x, "shape", ())))
        full = self.schedule(step) or any((key, p) not in self.store for p in self.paths)
        if full:
            self.full_calls += 1
            wrappers = {p: self._recorder(key, p) for p in self.paths}
        else:
            self.reused_calls += 1
            wrappers = {p: self._replayer(key, p) for p in self.paths}
        with ModelPatch(self.model, wrappers):
            return forward(*args, **kwargs)

    def _recorder(self, key, path):
        def run(original, *args, **kwargs):
            out = original(*args, **kwargs)
            self.store[key, path] = out
            return out
        return run

    def _replayer(self, key, path):
        return lambda original, *args, **kwargs: self.store[key, path]

    def reset(self) -> None:
        self.clock.reset()
        self.store.clear()
