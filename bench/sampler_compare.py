"""Two runs of bench/sampler_accuracy.py on the same held-out problems, cell by cell: what a change to the protocol
(e.g. the selection split's size) did to the fitted solver's goal ratios and to the variant it kept.

Each pair is BEFORE AFTER: full reports (--out files) of the same --problem-seed. A path may be REV:PATH to read the
file as git committed it at REV (the result a rerun overwrote). Reads the reports' per-problem goal tables and
their 'Fitted solvers' lists; runs nothing.

Usage: python bench/sampler_compare.py [--labels "1536" "6144"] [--brief] [--out F] BEFORE AFTER [BEFORE AFTER ...]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from sampler_accuracy import GOALS as ALL_GOALS  # noqa: E402

GOALS = {m: ALL_GOALS[m] for m in ("mean", "p99")}     # the per-sample goals, the ones a fit variant is chosen on
ROW = re.compile(r"^\| (?P<case>\d+-D \w+) \| (?P<problem>held-out [\w ]+?) \| (?P<nfe>\d+) \| (?P<mean>[^|]+) \| "
                 r"(?P<p99>[^|]+) \|")
CASE = re.compile(r"^## (?P<case>\d+-D \w+): every metric")
FIT = re.compile(r"^- (?P<problem>held-out [\w ]+?) / NFE (?P<nfe>\d+): [^;]*; (?P<variant>.*?), start .*"
                 r"cautious goal score on the selection split (?P<score>[\d.inf]+)")


def read(spec: str) -> str:
    rev, sep, path = spec.partition(":")
    if sep and not Path(spec).exists():
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
    return Path(spec).read_text()


def cells(text: str) -> dict:
    """{(case, problem, nfe): {"mean": str, "p99": str, "variant": str, "score": str}} of the held-out cells."""
    out, case = {}, None
    section = text.split("## Every problem", 1)[1].split("## Frozen", 1)[0]
    for line in section.splitlines():
        if m := ROW.match(line):
            out[(m["case"], m["problem"], m["nfe"])] = {"mean": m["mean"].strip(), "p99": m["p99"].strip()}
    for line in text.splitlines():
        if m := CASE.match(line):
            case = m["case"]
        elif (m := FIT.match(line)) and (case, m["problem"], m["nfe"]) in out:
            out[(case, m["problem"], m["nfe"])].update(variant=m["variant"], score=m["score"])
    if not out:
        raise SystemExit("no held-out rows found: is this a full report of bench/sampler_accuracy.py (--out)?")
    return out


def point(ratio: str) -> float:
    return float(ratio.split()[0])


def meets(c: dict) -> bool:
    return all(point(c[k]) <= goal for k, goal in GOALS.items())


def compare_pair(before: dict, after: dict, b: str, a: str) -> tuple[dict, list]:
    """(tally, rows) of one BEFORE AFTER pair: cells meeting both goals in each run, kept-variant changes."""
    tally = {"cells": len(before), b: 0, a: 0, "changed": 0}
    rows = []
    for key in before:                           # the report's order: case by case, problem by problem
        x, y = before[key], after[key]
        tally[b] += meets(x)
        tally[a] += meets(y)
        tally["changed"] += x["variant"] != y["variant"]
        rows.append((key, x, y))
    return tally, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", nargs=2, default=("before", "after"), help="names of the two runs")
    parser.add_argument("--brief", action="store_true", help="list only the cells that miss a goal in either run")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("reports", nargs="+", help="BEFORE AFTER pairs of full reports (REV:PATH for a committed one)")
    args = parser.parse_args(argv)
    if len(args.reports) % 2:
        parser.error("reports come in BEFORE AFTER pairs")
    b, a = args.labels
    command = "python bench/sampler_compare.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    tallies, table = [], []
    for before_spec, after_spec in zip(args.reports[::2], args.reports[1::2]):
        before, after = cells(read(before_spec)), cells(read(after_spec))
        if before.keys() != after.keys():
            raise SystemExit(f"{before_spec} and {after_spec} do not hold the same held-out cells")
        tally, rows = compare_pair(before, after, b, a)
        tallies.append((Path(after_spec.split(":")[-1]).name, tally))
        table += [r for r in rows if not args.brief or not (meets(r[1]) and meets(r[2]))]
    lines = [f"Command: `{command}`", "",
             f"Fitted solver / the calibration-chosen diffusers peer on held-out noise, per held-out cell, in the run "
             f"'{b}' and the run '{a}'. Goals: mean L2 <= {GOALS['mean']}, p99 <= {GOALS['p99']}.", "",
             f"| report ({a}) | held-out cells | both goals met, {b} | both goals met, {a} | kept variant changed |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {t['cells']} | {t[b]} | {t[a]} | {t['changed']} |" for name, t in tallies]
    total = {k: sum(t[k] for _, t in tallies) for k in ("cells", b, a, "changed")}
    lines += [f"| all | {total['cells']} | {total[b]} | {total[a]} | {total['changed']} |", ""]
    lines += [("Cells that miss a goal in either run" if args.brief else "Every held-out cell")
              + " (ratio [95% paired-bootstrap interval]; variant = the fit variant kept, with its cautious goal "
                "score on the selection split):", "",
              f"| cell | NFE | mean L2, {b} | mean L2, {a} | p99, {b} | p99, {a} | variant, {b} | variant, {a} |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {key[0]} {key[1]} | {key[2]} | {x['mean']} | {y['mean']} | {x['p99']} | {y['p99']} | "
              f"{x['variant']} ({x['score']}) | {y['variant']} ({y['score']}) |" for key, x, y in table]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
