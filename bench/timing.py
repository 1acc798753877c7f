"""The one timing protocol for every benchmark that reports a time ratio, and the one way to write a result file.

Protocol (why: on a shared machine, load changes by 2x within a minute, so two medians taken minutes apart compare
the machine, not the code):
1. Warm every arm up first (lazy imports, first-touch allocations, kernel selection).
2. Run the arms in rounds: every round runs each arm once, back to back, and the order rotates from round to round
   (A B, B A, A B, ... for two arms), so each arm goes first equally often and drift hits all arms alike.
3. A ratio is the median of per-round ratios (arm / baseline in the same round), with a distribution-free 95%
   interval for that median from order statistics (the binomial(n, 1/2) argument; no resampling, no normality).
   With fewer than 6 rounds no 95% interval exists; the full range is given with its actual coverage.
4. The conditions (torch threads, load average before and after, CPU count and affinity) are printed beside the
   numbers and written into the result file.

    from timing import Conditions, interleave, ratio
    cond = Conditions()
    runs = interleave({"ours": f, "theirs": g}, repeats=9)
    print(ratio(runs, "ours", "theirs"), cond.finish())
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

RESULTS = Path(__file__).resolve().parent / "results"

Samples = dict[str, list[dict[str, float]]]   # arm -> one {phase: seconds} per round ("total" always present)


# ----------------------------------------------------------------------------------------------------- conditions
class Conditions:
    """What the machine looked like while a benchmark ran. Create at the start, call finish() at the end."""

    def __init__(self):
        import torch

        self.threads = torch.get_num_threads()
        self.interop = torch.get_num_interop_threads()
        self.load_start = os.getloadavg()
        self.cpus = os.cpu_count()
        self.affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else self.cpus
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.torch = torch.__version__
        self.load_end: tuple[float, float, float] | None = None

    def finish(self) -> "Conditions":
        self.load_end = os.getloadavg()
        return self

    def __str__(self) -> str:
        la = lambda t: "/".join(f"{v:.2f}" for v in t)  # noqa: E731
        end = f", at end {la(self.load_end)}" if self.load_end else ""
        return (f"Conditions: {self.started}, torch {self.torch}, {self.threads} intra-op / {self.interop} inter-op "
                f"thread(s), {self.cpus} CPUs ({self.affinity} usable), load average (1/5/15 min) at start "
                f"{la(self.load_start)}{end}.")


# ---------------------------------------------------------------------------------------------------- measurement
def _timed(fn: Callable[[], Mapping[str, float] | None]) -> dict[str, float]:
    """One call. A function may return its own phase times (seconds); then "total" is their sum, so set-up it does
    outside its phases is not counted. Otherwise "total" is the wall time of the call."""
    t0 = time.perf_counter()
    phases = fn()
    wall = time.perf_counter() - t0
    if phases:
        out = dict(phases)
        out["total"] = sum(phases.values())
        return out
    return {"total": wall}


def interleave(arms: Mapping[str, Callable[[], Mapping[str, float] | None]], repeats: int, *, warmup: int = 1,
               between: Callable[[], None] | None = None) -> Samples:
    """Run every arm once per round for `repeats` rounds, rotating the order each round (step 2 of the protocol).
    `between` runs before each call, outside the timing (e.g. gc.collect)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    out: Samples = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if between is not None:
                between()
            out[name].append(_timed(arms[name]))
    return out


# ------------------------------------------------------------------------------------------------------ statistics
def _binom_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage). [x_(k), x_(n+1-k)] (1-based order statistics) covers the population median
    with probability 1 - 2 P(Bin(n, 1/2) <= k-1); take the largest k whose coverage is still >= `level`. Below
    n = 6 no k reaches 95%: then (min, max) with its own, smaller, coverage."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    med = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    best = None
    for k in range(1, n // 2 + 1):
        cov = 1 - 2 * _binom_cdf(k - 1, n)
        if cov >= level:
            best = (k, cov)
    k, cov = best if best else (1, 1 - 2 * _binom_cdf(0, n))
    return med, xs[k - 1], xs[n - k], cov


@dataclass
class Ratio:
    median: float
    low: float
    high: float
    coverage: float
    n: int

    def __str__(self) -> str:
        return f"{self.median:.3f}x" + self.interval()

    def interval(self) -> str:
        """' [lo, hi]' with the coverage named when it falls short of 95%."""
        note = "" if self.coverage >= 0.95 else f" ({self.coverage:.0%} only, n={self.n})"
        return f" [{self.low:.3f}, {self.high:.3f}]{note}"


def ratio(samples: Samples, arm: str, baseline: str, phase: str = "total") -> Ratio:
    """Median of per-round ratios arm / baseline, with its 95% interval (step 3 of the protocol)."""
    rs = [a[phase] / max(b[phase], 1e-12) for a, b in zip(samples[arm], samples[baseline])]
    med, lo, hi, cov = median_interval(rs)
    return Ratio(med, lo, hi, cov, len(rs))


def median(samples: Samples, arm: str, phase: str = "total") -> float:
    """Median seconds of one arm (absolute times are loose on a shared machine; the ratios are the result)."""
    return median_interval([r[phase] for r in samples[arm]])[0]


# ---------------------------------------------------------------------------------------------------- result files
def command(script: str, argv: list[str] | None = None) -> str:
    """The exact command line that reproduces this run, from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"bench/{Path(script).name}", *argv])


def write_result(name: str, script: str, body: str, argv: list[str] | None = None, mode: str = "") -> Path:
    """bench/results/<name>.md: first line names the exact command (and the mode), then the table(s).
    bench/update_readme.py copies the file between the `<!-- bench:<name> -->` markers of README.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    head = f"Command: `{command(script, argv)}`" + (f" ({mode})" if mode else "")
    path.write_text(head + "\n\n" + body.strip() + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
