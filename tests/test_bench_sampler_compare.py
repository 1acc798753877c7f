"""bench/sampler_compare.py reads two sampler_accuracy reports cell by cell: on a hand-written pair of reports."""

import pytest

ROWS = """| 16-D vp | design random 0 | 4 | 0.300 [0.29, 0.31] | 0.400 [0.3, 0.5] | x | x | x | x | x | x | x | 4/4 |
| 16-D vp | held-out grid 9 | 4 | {mean} | {p99} | x | x | x | x | x | x | x | 4/4 |"""
FIT_DESIGN = ("- design random 0 / NFE 4: 14.6, 0; plain, start ddim/trailing, calibration mean L2 0.1, cautious goal "
              "score on the selection split 0.500")
FIT_HELD_OUT = ("- held-out grid 9 / NFE 4: 14.6, 1.5, 0; {variant}, start dpmpp_2m+corrector/trailing, calibration "
                "mean L2 0.087, cautious goal score on the selection split 0.594; time shifts -0.27")


def report(mean: str, p99: str, variant: str) -> str:
    return f"""Command: `python bench/sampler_accuracy.py --problem-seed 9`

## Every problem: ratios with paired-bootstrap 95% intervals (held-out noise)

| case | problem | NFE | fitted: mean L2 | p99 | ... |
|---|---|---:|---:|---:|---|
{ROWS.format(mean=mean, p99=p99)}

## Frozen on the design problems, applied to held-out problems unchanged

| 16-D vp | held-out grid 9 | 4 | 9.9 [9, 9] | 9.9 [9, 9] | x |

## 16-D vp: every metric on held-out noise

Fitted solvers (sigmas; start):

{FIT_DESIGN}
{FIT_HELD_OUT.format(variant=variant)}
"""


@pytest.fixture(scope="module")
def compare(load_bench):
    return load_bench("sampler_compare")


def test_reads_only_the_held_out_cells_of_the_per_problem_table(compare):
    cells = compare.cells(report("0.650 [0.6, 0.7]", "1.050 [0.9, 1.2]", "time shift + start, tail 3"))
    # the design row and the frozen table's row are not goal cells
    assert cells == {("16-D vp", "held-out grid 9", "4"): {"mean": "0.650 [0.6, 0.7]", "p99": "1.050 [0.9, 1.2]",
                                                           "variant": "time shift + start, tail 3", "score": "0.594"}}
    cell = cells[("16-D vp", "held-out grid 9", "4")]
    assert not compare.meets(cell)                                     # p99 1.05 > 1.0
    assert compare.meets({**cell, "p99": "1.000 [0.9, 1.1]"})          # the goal is <=
    assert not compare.meets({**cell, "mean": "0.701 [0.6, 0.8]", "p99": "0.5 [0.4, 0.6]"})


def test_tallies_a_pair_of_reports(compare, tmp_path, capsys):
    before, after = tmp_path / "before.md", tmp_path / "after.md"
    before.write_text(report("0.650 [0.6, 0.7]", "1.050 [0.9, 1.2]", "plain"))
    after.write_text(report("0.600 [0.5, 0.7]", "0.800 [0.7, 0.9]", "time shift"))
    compare.main(["--labels", "1536", "6144", str(before), str(after)])
    out = capsys.readouterr().out
    assert ("| 16-D vp held-out grid 9 | 4 | 0.650 [0.6, 0.7] | 0.600 [0.5, 0.7] | 1.050 [0.9, 1.2] | "
            "0.800 [0.7, 0.9] | plain (0.594) | time shift (0.594) |") in out
    assert "| after.md | 1 | 0 | 1 | 1 |" in out                     # 1 cell: met in 0 before, 1 after; 1 change
    compare.main(["--brief", str(after), str(after)])                  # met in both runs: not listed
    brief = capsys.readouterr().out
    assert "| after.md | 1 | 1 | 1 | 0 |" in brief and "held-out grid 9 | 4 |" not in brief
    compare.main(["--brief", str(before), str(after)])                 # missed in one run: listed
    assert "| 16-D vp held-out grid 9 | 4 | 0.650" in capsys.readouterr().out


def test_pairs_must_hold_the_same_cells(compare, tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text(report("0.6 [0.5, 0.7]", "0.8 [0.7, 0.9]", "plain"))
    b.write_text(report("0.6 [0.5, 0.7]", "0.8 [0.7, 0.9]", "plain").replace("grid 9", "grid 8"))
    with pytest.raises(SystemExit, match="same held-out cells"):
        compare.main([str(a), str(b)])
