"""Shared settings of the fuzz tests (tests/test_fuzz_*.py); no tests here.

Profiles: "fast" (the default, a few dozen examples per property: `make test` stays quick) and "large"
(NIMBLEDIFF_FUZZ=large, thousands per property). Both are derandomized (the same cases every run, so CI is
reproducible) and keep no example database (nothing is written into the checkout).

Every property counts its cases; NIMBLEDIFF_FUZZ_REPORT=<file> appends one JSON line per test module with the counts
(the numbers the report quotes come from the large run).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")  # the [test] extra; `make report-newest` installs pytest alone
from hypothesis import HealthCheck, settings  # noqa: E402

from nimblediff.errors import NimbleDiffError  # noqa: E402

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("nimblediff-fast", max_examples=int(os.environ.get("NIMBLEDIFF_FUZZ_EXAMPLES", 25)),
                          **_COMMON)
settings.register_profile("nimblediff-large", max_examples=int(os.environ.get("NIMBLEDIFF_FUZZ_EXAMPLES", 1500)),
                          **_COMMON)
PROFILE = "nimblediff-large" if os.environ.get("NIMBLEDIFF_FUZZ") == "large" else "nimblediff-fast"
settings.load_profile(PROFILE)

COUNTS: collections.Counter = collections.Counter()


def count(kind: str) -> None:
    COUNTS[kind] += 1
    path = os.environ.get("NIMBLEDIFF_FUZZ_REPORT")
    if path and COUNTS[kind] % 100 == 0:      # a running tally: a long run that is stopped still has its counts
        with open(path, "a") as fh:
            fh.write(json.dumps({"tally": kind, "cases": COUNTS[kind]}) + "\n")


def report(module: str) -> None:
    path = os.environ.get("NIMBLEDIFF_FUZZ_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"module": module, "profile": PROFILE, "counts": dict(COUNTS)}) + "\n")


def only_ours(fn, *args, **kwargs):
    """Call fn; return (result, None) or (None, the NimbleDiffError it raised). Any other exception propagates,
    which fails the property: only NimbleDiff's own error types may escape a loader."""
    try:
        return fn(*args, **kwargs), None
    except NimbleDiffError as exc:
        assert str(exc), "an error without a message"
        return None, exc


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (what a case may not change outside its output folder)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def state_bytes(modules: dict) -> dict[str, bytes]:
    """Every parameter and buffer of every module as raw bytes: byte-identical means the same dict."""
    return {f"{c}.{k}": v.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
            for c, m in modules.items() for k, v in m.state_dict().items()}
