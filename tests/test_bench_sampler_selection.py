"""bench/sampler_accuracy.py: how the fitted solver's variant is chosen on the selection split, on hand-worked
error samples."""

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("sampler_accuracy")


def test_a_uniform_ratio_scores_the_same_in_every_draw(bench):
    peer = torch.rand(1000, generator=torch.Generator().manual_seed(0)) + 0.1
    # ours = 0.5 x the peer's per sample: mean ratio 0.5 / 0.7, p99 ratio 0.5, in every bootstrap draw
    assert bench.cautious_goal_score(0.5 * peer, {"mean": peer, "p99": peer}) == pytest.approx(0.5 / 0.7)


def test_a_tail_that_only_just_wins_on_this_draw_loses_to_a_steady_one(bench):
    peer = torch.ones(1000)
    # 9 of 1000 samples far off: the p99 (rank 989.01 of 0..999) is still a good sample, so the point score is
    # mean (991 x 0.3 + 9 x 5) / 1000 / 0.7 = 0.489; a draw with >= 11 of them (P ~ 0.29) has p99 5, so the 90th
    # percentile over draws is 5
    fragile = torch.cat([torch.full((991,), 0.3), torch.full((9,), 5.0)])
    steady = torch.full((1000,), 0.6)                                 # 0.6 / 0.7 = 0.857 in every draw
    both = {"mean": peer, "p99": peer}
    m = {"mean": float(fragile.mean()), "p99": float(torch.quantile(fragile, 0.99))}
    assert bench.goal_score(m, {"mean": 1.0, "p99": 1.0}) == pytest.approx((991 * 0.3 + 45) / 1000 / 0.7)
    assert bench.cautious_goal_score(fragile, both) == pytest.approx(5.0)
    assert bench.cautious_goal_score(steady, both) == pytest.approx(0.6 / 0.7)


def stub_fits(bench, monkeypatch, ratio_at):
    """choose_fit with fits replaced by stubs whose per-sample errors are ratio_at(label, iterations) x the peer's
    (1000 ones); returns the list of (label, iterations) fitted, in order."""
    calls = []

    def fit_for(problem, cal, nfe, iterations, variant):
        calls.append((variant[0], iterations))
        return {"variant": variant[0], "label": variant[0], "iterations": iterations}

    monkeypatch.setattr(bench, "fit_for", fit_for)
    monkeypatch.setattr(bench, "run_fitted", lambda problem, split, fit: fit)
    monkeypatch.setattr(bench, "errors", lambda split, fit: torch.full((1000,), ratio_at(fit["label"],
                                                                                        fit["iterations"])))
    return calls


VARIANTS = (("a", {}), ("b", {}))
PEER = {"mean": torch.ones(1000), "p99": torch.ones(1000)}


def test_no_refit_where_a_variant_meets_the_goals(bench, monkeypatch):
    # b at 400 iterations: mean 0.6 / 0.7 = 0.857 <= 1, so nothing is refitted
    calls = stub_fits(bench, monkeypatch, lambda label, it: 0.6 if label == "b" else 0.9)
    fit = bench.choose_fit(None, None, None, 4, 400, VARIANTS, PEER, escalations=1)
    assert calls == [("a", 400), ("b", 400)]
    assert fit["variant"] == "b" and fit["selection_score"] == pytest.approx(0.6 / 0.7)


def test_every_variant_is_refitted_at_3x_where_none_meets_the_goals(bench, monkeypatch):
    # at 400 the best scores 0.8 / 0.7 = 1.14 > 1; at 1200 variant a scores 0.5 / 0.7
    calls = stub_fits(bench, monkeypatch, lambda label, it: {("a", 400): 0.9, ("b", 400): 0.8,
                                                           ("a", 1200): 0.5, ("b", 1200): 0.95}[(label, it)])
    fit = bench.choose_fit(None, None, None, 4, 400, VARIANTS, PEER, escalations=1)
    assert calls == [("a", 400), ("b", 400), ("a", 1200), ("b", 1200)]
    assert fit["variant"] == "a, 1200 it" and fit["selection_score"] == pytest.approx(0.5 / 0.7)


def test_a_refit_that_scores_worse_is_not_kept_and_escalations_stop(bench, monkeypatch):
    calls = stub_fits(bench, monkeypatch, lambda label, it: 0.8 if it == 400 else 0.9)
    fit = bench.choose_fit(None, None, None, 4, 400, VARIANTS, PEER, escalations=1)
    assert len(calls) == 4                      # one refit round only, though none meets the goals after it
    assert fit["variant"] == "a" and fit["selection_score"] == pytest.approx(0.8 / 0.7)


def test_the_selection_split_is_fresh_noise_four_times_the_calibration_split(bench):
    from nimblediff.core.gmm import GaussianMixture

    problem = bench.Problem(GaussianMixture.family("grid", 2, 0), "vp", "held-out grid 0", False)
    cal, sel, test = bench.splits_for(problem, 2, quick=True)
    assert (len(cal.x), len(sel.x), len(test.x)) == (256, 1024, 500)
    assert bench.split_sizes(False)["sel"] == 4 * bench.split_sizes(False)["cal"] == 6144
    # no selection noise is a calibration (fitted-on) or held-out (reported) noise
    for other in (cal.latents, test.latents):
        assert torch.cdist(sel.latents, other).min() > 0
    assert len(bench.splits_for(problem, 2, quick=True, n_sel=300)[1].x) == 300
