"""Per-step state the sampler loop can reset: which step the model is at, and which run (generation) it is in."""

from __future__ import annotations


def as_float(t) -> float:
    """A timestep (python number, 0-d or batched tensor) as a float; a batch shares one timestep in samplers."""
    if hasattr(t, "reshape"):
        return float(t.reshape(-1)[0])
    return float(t)


class StepClock:
    """The step index from the timesteps the model is called with. Samplers walk timesteps downward, so a timestep
    above the last one starts a new run (caches clear), an equal one is the same step (cond and uncond called
    separately, as ComfyUI may), a lower one is the next step. Surfaces that know the index (ComfyUI's
    sample_sigmas) call `set` instead; a pipeline calls `reset` before it samples."""

    def __init__(self):
        self.run = 0
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.t = None
        self.run += 1

    def observe(self, t) -> int:
        t = as_float(t)
        if self.t is None or t > self.t:
            if self.t is not None:
                self.reset()
            self.step = 0
        elif t < self.t:
            self.step += 1
        self.t = t
        return self.step

    def set(self, step: int) -> int:
        """Explicit index; step 0 after any later step starts a new run."""
        if step == 0 and self.step > 0:
            self.reset()
        self.step = step
        return step
