"""Which sampler steps compute the cached modules fully: a per-step list of flags, stored as JSON beside the
AutoDiffusion / BOSS schedules (same {"model_type", ...} header, core/schedule_search.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidParameterError, WeightsFormatError


@dataclass(frozen=True)
class CacheSchedule:
    """compute[i] is True when step i runs the reused modules in full (and refreshes their cache). Steps past the
    end of the list compute in full: a schedule made for 25 steps never reuses stale features at step 30."""

    compute: tuple[bool, ...] = ()
    interval: int | None = None   # instead of a list: compute every interval-th step, for any number of steps

    def __post_init__(self):
        if self.interval is not None:
            _check_int("interval", self.interval, 1)
            return
        if not self.compute or not all(isinstance(c, bool) for c in self.compute):
            raise InvalidParameterError(f"schedule={list(self.compute)!r}: need a non-empty list of true/false "
                                        "flags, one per sampler step (true = compute in full)")
        if not self.compute[0]:
            raise InvalidParameterError("schedule[0] is false: the first step has nothing to reuse; it must compute")

    def __call__(self, step: int) -> bool:
        if self.interval is not None:
            return step % self.interval == 0
        return step >= len(self.compute) or self.compute[step]

    def full_steps(self, steps: int) -> int:
        return sum(self(i) for i in range(steps))

    @classmethod
    def uniform(cls, steps: int, interval: int) -> "CacheSchedule":
        """Compute every `interval`-th step (DeepCache's uniform mode); interval 1 = no reuse."""
        _check_int("steps", steps, 1)
        _check_int("interval", interval, 1, f"(and <= steps={steps})", high=steps)
        return cls(tuple(i % interval == 0 for i in range(steps)))

    @classmethod
    def edges(cls, steps: int, interval: int, first: int = 1, last: int = 0) -> "CacheSchedule":
        """A-SDM's non-uniform mode: compute the first `first` and the last `last` steps in full (where features
        change fastest: layout early, detail late), reuse with `interval` in between."""
        _check_int("steps", steps, 1)
        _check_int("interval", interval, 1, high=steps)
        _check_int("first", first, 1, high=steps)
        _check_int("last", last, 0, high=steps)
        # the last warm-up step counts as the first full one of the periodic part
        return cls(tuple(i < first or i >= steps - last or (i - first + 1) % interval == 0 for i in range(steps)))

    @classmethod
    def parse(cls, value, steps: int | None = None) -> "CacheSchedule":
        """An interval (int), a list of flags, or a CacheSchedule."""
        if isinstance(value, CacheSchedule):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            raise InvalidParameterError(f"schedule={value!r}: give an interval (int >= 1) or a list of true/false "
                                        "flags, one per step")
        if isinstance(value, int):
            return cls(interval=value) if steps is None else cls.uniform(steps, value)
        return cls(tuple(value))

    def to_json(self, path, model_type: str, **extra) -> None:
        if self.interval is not None:
            raise InvalidParameterError("an interval schedule has no step list to save; use CacheSchedule.uniform")
        data = {"model_type": model_type, "kind": "cache", "compute": list(self.compute), **extra}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path, model_type: str | None = None) -> tuple["CacheSchedule", dict]:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise WeightsFormatError(f"{path}: cannot read a cache schedule ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("compute"), list):
            raise WeightsFormatError(f"{path}: no 'compute' list of per-step flags")
        if model_type is not None and data.get("model_type") != model_type:
            raise WeightsFormatError(f"{path}: schedule made for model_type={data.get('model_type')!r}, not "
                                     f"{model_type!r}")
        return cls(tuple(data["compute"])), data


def _check_int(name, value, low, hint="", high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise InvalidParameterError(f"{name}={value!r}: need an integer {bound} {hint}".rstrip())


BLOCK_PLAN = "block-plan"


@dataclass(frozen=True)
class BlockPlan:
    """blocks[i][j] is True when transformer block j computes at sampler step i; a skipped block adds the residual
    (output minus input) it produced at the last step where it computed (core/caching/block_search.py). Step 0
    computes every block (nothing to reuse yet); steps past the end compute every block, as CacheSchedule's do.

    sigmas: optional K + 1 noise levels (the model's own, ending at 0) searched jointly with the blocks
    (AutoDiffusion's time-step half); a sampler that follows the plan should step through them."""

    blocks: tuple[tuple[bool, ...], ...]
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self):
        rows = self.blocks
        if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, (list, tuple)) for r in rows):
            raise InvalidParameterError(f"blocks={str(rows)[:80]}: need a non-empty list of steps, each a list of "
                                        "true/false flags, one per transformer block (true = computes)")
        rows = tuple(tuple(r) for r in rows)
        n = len(rows[0])
        if n < 1 or any(len(r) != n for r in rows) or not all(isinstance(c, bool) for r in rows for c in r):
            raise InvalidParameterError(f"blocks: every step needs the same number (>= 1) of true/false flags; got "
                                        f"lengths {sorted({len(r) for r in rows})}")
        if not all(rows[0]):
            raise InvalidParameterError("blocks[0] skips a block: the first step has no residual to reuse; every "
                                        "block must compute at step 0")
        object.__setattr__(self, "blocks", rows)
        if self.sigmas is not None:
            from ..schedules import check_sigmas

            sig = check_sigmas(list(self.sigmas))
            if len(sig) != len(rows) + 1 or float(sig[-1]) != 0:
                raise InvalidParameterError(f"sigmas: a plan of {len(rows)} steps needs {len(rows) + 1} decreasing "
                                            f"noise levels ending at 0; got {len(sig)} ending at {float(sig[-1]):g}")
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))

    @property
    def steps(self) -> int:
        return len(self.blocks)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks[0])

    def computes(self, step: int) -> tuple[bool, ...]:
        return self.blocks[step] if 0 <= step < len(self.blocks) else (True,) * self.n_blocks

    def evaluations(self) -> int:
        """Block evaluations per image (per stream), out of steps x n_blocks."""
        return sum(map(sum, self.blocks))

    def share(self) -> float:
        return self.evaluations() / (self.steps * self.n_blocks)

    @classmethod
    def full(cls, steps: int, n_blocks: int, sigmas=None) -> "BlockPlan":
        _check_int("steps", steps, 1)
        _check_int("n_blocks", n_blocks, 1)
        return cls(tuple((True,) * n_blocks for _ in range(steps)), sigmas)

    @classmethod
    def from_schedule(cls, schedule, n_blocks: int) -> "BlockPlan":
        """A per-step schedule (CacheSchedule or flags) as a plan: a full step computes every block, another none."""
        compute = CacheSchedule.parse(schedule).compute
        return cls(tuple((bool(c),) * n_blocks for c in compute))

    def to_json(self, path, model_type: str, **extra) -> None:
        """{"model_type", "kind": "block-plan", "n_blocks", "steps", "blocks", "sigmas" (when searched), ...extra}."""
        data = {"model_type": model_type, "kind": BLOCK_PLAN, "n_blocks": self.n_blocks, "steps": self.steps,
                "blocks": [list(r) for r in self.blocks], **extra}
        if self.sigmas is not None:
            data["sigmas"] = list(self.sigmas)
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path, model_type: str | None = None, n_blocks: int | None = None) -> tuple["BlockPlan", dict]:
        """Read a plan; with model_type / n_blocks, refuse one made for another model or block count."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise WeightsFormatError(f"{path}: cannot read a block plan ({e})") from e
        if not isinstance(data, dict) or data.get("kind") != BLOCK_PLAN or not isinstance(data.get("blocks"), list):
            kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise WeightsFormatError(f"{path}: not a block plan (kind {kind!r}; need kind {BLOCK_PLAN!r} with a "
                                     "'blocks' list of per-step, per-block flags, e.g. from `nimblediff cache "
                                     "plan-search`)")
        if model_type is not None and data.get("model_type") != model_type:
            raise WeightsFormatError(f"{path}: block plan made for model_type={data.get('model_type')!r}, not "
                                     f"{model_type!r}; search a plan for this model")
        try:
            plan = cls(data["blocks"], data.get("sigmas"))
        except InvalidParameterError as e:
            raise WeightsFormatError(f"{path}: {e}") from e
        if data.get("n_blocks", plan.n_blocks) != plan.n_blocks:
            raise WeightsFormatError(f"{path}: says n_blocks={data.get('n_blocks')} but its steps have "
                                     f"{plan.n_blocks} flags")
        if n_blocks is not None and plan.n_blocks != n_blocks:
            raise WeightsFormatError(f"{path}: block plan made for {plan.n_blocks} transformer blocks; this model has "
                                     f"{n_blocks} (valid: a plan searched for this model, n_blocks={n_blocks})")
        return plan, data
