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
