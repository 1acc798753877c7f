"""bench/timing.py: the one timing protocol, checked against hand-worked cases."""

import pytest


@pytest.fixture(scope="module")
def timing(load_bench):
    return load_bench("timing")


def test_median_interval_order_statistics(timing):
    # n = 9: ranks 2 and 8 (1-based); coverage 1 - 2 P(Bin(9, 1/2) <= 1) = 1 - 2 * 10/512
    med, lo, hi, cov = timing.median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (med, lo, hi) == (5, 2, 8) and cov == pytest.approx(1 - 20 / 512)
    # n = 15: ranks 4 and 12, the textbook pair; 1 - 2 * (1 + 15 + 105 + 455) / 2**15
    med, lo, hi, cov = timing.median_interval(list(range(1, 16)))
    assert (med, lo, hi) == (8, 4, 12) and cov == pytest.approx(1 - 2 * 576 / 2**15)
    # n = 5 cannot reach 95%: the range, with its own coverage 1 - 2/32
    med, lo, hi, cov = timing.median_interval([3, 1, 2, 5, 4])
    assert (med, lo, hi) == (3, 1, 5) and cov == pytest.approx(0.9375)
    assert "94% only" in str(timing.Ratio(1.0, lo, hi, cov, 5))


def test_interleave_rotates_and_ratio_is_per_round(timing, monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    # arm "a" takes 1 tick; "b" returns its own phases, so its total is their sum, not the wall time
    runs = timing.interleave({"a": lambda: calls.append("a"),
                              "b": lambda: calls.append("b") or {"load": 2.0, "apply": 1.0}}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]      # warm-up, then A B / B A / A B
    assert [r["total"] for r in runs["b"]] == [3.0] * 3 and [r["total"] for r in runs["a"]] == [1] * 3
    r = timing.ratio(runs, "b", "a")
    assert (r.median, r.n) == (3.0, 3) and timing.median(runs, "b", "load") == 2.0


def test_result_file_names_its_command(timing, tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "RESULTS", tmp_path)
    path = timing.write_result("x", "bench/x.py", "| a |\n", ["--quick", "--repeats", "3"], "quick mode")
    assert path.read_text().splitlines()[0] == "Command: `python bench/x.py --quick --repeats 3` (quick mode)"
