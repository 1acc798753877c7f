"""Two runs of bench/sampler_accuracy.py on the same held-out problems, cell by cell: what a change to the protocol
(e.g. the selection split's size) did to the fitted solver's goal ratios and to the variant it kept.

Each pair is BEFORE AFTER: full reports (--out files) of the same --problem-seed. A path may be REV:PATH to read the
file as git committed it at REV (the result a rerun overwrote). Reads the reports' per-problem goal tables and
their 'Fitted solvers' lists; runs nothing.

Usage: python bench/sampler_compare.py [--labels "1536" "6144"] [--out F] BEFORE AFTER [BEFORE AFTER ...]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"mean": 0.7, "p99": 1.0}
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", nargs=2, default=("before", "after"), help="names of the two runs")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("reports", nargs="+", help="BEFORE AFTER pairs of full reports (REV:PATH for a committed one)")
    args = parser.parse_args(argv)
    if len(args.reports) % 2:
        parser.error("reports come in BEFORE AFTER pairs")
    b, a = args.labels
    command = "python bench/sampler_compare.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    lines = [f"Command: `{command}`", "",
             f"Fitted solver / the calibration-chosen diffusers peer on held-out noise, per held-out cell, in the run "
             f"'{b}' and the run '{a}' (ratio [95% paired-bootstrap interval]); variant = the fit variant kept, "
             f"with its cautious goal score on the selection split. Goals: mean L2 <= 0.7, p99 <= 1.0.", "",
             f"| cell | NFE | mean L2, {b} | mean L2, {a} | p99, {b} | p99, {a} | variant, {b} | variant, {a} |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    tally = {b: 0, a: 0}
    total = changed = 0
    for before_spec, after_spec in zip(args.reports[::2], args.reports[1::2]):
        before, after = cells(read(before_spec)), cells(read(after_spec))
        if before.keys() != after.keys():
            raise SystemExit(f"{before_spec} and {after_spec} do not hold the same held-out cells")
        for key in before:                       # the report's order: case by case, problem by problem
            x, y = before[key], after[key]
            total += 1
            tally[b] += meets(x)
            tally[a] += meets(y)
            changed += x["variant"] != y["variant"]
            lines.append(f"| {key[0]} {key[1]} | {key[2]} | {x['mean']} | {y['mean']} | {x['p99']} | {y['p99']} | "
                         f"{x['variant']} ({x['score']}) | {y['variant']} ({y['score']}) |")
    lines += ["", f"Cells meeting both per-sample goals: {b} {tally[b]}/{total}, {a} {tally[a]}/{total}; kept "
                  f"variant changed in {changed} of {total}."]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
