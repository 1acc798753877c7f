"""Schedule search: Bellman DP on hand-checkable costs, BOSS and AutoDiffusion on an analytic mixture, JSON."""

import itertools
import json

import pytest
import torch

from nimblediff.core import schedule_search as search
from nimblediff.core import schedules
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import SAMPLERS, run
from nimblediff.errors import InvalidParameterError



def test_bellman_hand_checked():
    """4 nodes. Two jumps: 0-1-3 costs 1 + 5, 0-2-3 costs 2 + 1 (best); one jump: 0-3; three: 0-1-2-3."""
    inf = float("inf")
    cost = torch.tensor([[inf, 1.0, 2.0, 10.0],
                         [inf, inf, 0.5, 5.0],
                         [inf, inf, inf, 1.0],
                         [inf, inf, inf, inf]])
    assert search.bellman_path(cost, 2) == [0, 2, 3]
    assert search.bellman_path(cost, 1) == [0, 3]
    assert search.bellman_path(cost, 3) == [0, 1, 2, 3]
    with pytest.raises(InvalidParameterError, match="jumps"):
        search.bellman_path(cost, 4)


def test_bellman_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n, k = 8, 3
    cost = torch.rand(n, n, generator=g, dtype=torch.float64)
    best = min((sum(float(cost[a, b]) for a, b in zip((0,) + mid, mid + (n - 1,))), (0,) + mid + (n - 1,))
               for mid in itertools.combinations(range(1, n - 1), k - 1))
    assert tuple(search.bellman_path(cost, k)) == best[1]


def test_fine_grid():
    for param in (VP(), Flow()):
        grid = search.fine_grid(param, 30)
        assert len(grid) == 31 and grid[-1] == 0.0
        assert grid[0] == pytest.approx(float(param.sigma_max))
        assert all(a > b for a, b in zip(grid, grid[1:]))


def _problem(kind="vp", dim=2, n=64, seed=5):
    param = VP() if kind == "vp" else Flow()
    gmm = GaussianMixture.circle() if dim == 2 else GaussianMixture.random(dim=dim)
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = z * float(param.sigma_max) if kind == "vp" else z
    return param, gmm, x


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_reference_solve_is_accurate(kind):
    param, gmm, x = _problem(kind)
    grid = search.fine_grid(param, 40)
    states, preds, final = search.reference_solve(gmm.denoiser(param), param, x, grid, substeps=6)
    assert len(states) == len(preds) == len(grid) - 1
    exact = gmm.ode_solve(x, kind, float(param.sigma_max), steps=300)
    assert (final - exact).norm(dim=1).mean() < 2e-3


def _l2(param, gmm, x, sigmas, sampler="euler", ref=None):
    ref = gmm.ode_solve(x, param.kind, float(param.sigma_max), steps=200) if ref is None else ref
    out = run(SAMPLERS[sampler], gmm.denoiser(param), x, torch.as_tensor(sigmas, dtype=torch.float64),
              param=param)
    return float((out - ref).norm(dim=1).mean())


def test_boss_beats_the_default_schedule():
    """Calibrated on one batch, the 4-jump Euler path of BOSS is better than trailing on another batch."""
    param, gmm, cal = _problem(seed=1)
    _, _, x = _problem(n=512, seed=2)
    seen = []
    result = search.search_schedule("boss", gmm.denoiser(param), param, 4, x=cal, sampler="euler", grid_size=40,
                                    progress=lambda done, total: seen.append((done, total)))
    sig = result["sigmas"]
    assert result["model_type"] == "vp" and result["nfe"] == 4 and result["created_by"] == "boss"
    assert len(sig) == 5 and sig[-1] == 0 and sig[0] == pytest.approx(float(param.sigma_max))
    # progress counts model calls (reference solve and coarse solves included): never falls, ends at the total
    assert seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] and a[1] == b[1] for a, b in zip(seen, seen[1:]))
    ref = gmm.ode_solve(x, "vp", float(param.sigma_max), steps=200)
    assert _l2(param, gmm, x, sig, ref=ref) < _l2(param, gmm, x, schedules.make_sigmas("trailing", 4, param),
                                                   ref=ref)


def test_boss_plain_local_error_option():
    param, gmm, cal = _problem(seed=1)
    grid, cost = search.boss_costs(gmm.denoiser(param), param, x=cal, grid_size=20, propagate=False)
    assert cost.shape == (21, 21) and torch.isinf(cost[3, 2]) and torch.isfinite(cost[2, 3])
    path = search.bellman_path(cost, 3)
    assert search.boss(gmm.denoiser(param), param, 3, x=cal, costs=(grid, cost))["sigmas"] == [grid[i]
                                                                                               for i in path]


def test_autodiffusion_seeded_and_no_worse_than_its_init():
    param, gmm, cal = _problem("flow", seed=1)
    den = gmm.denoiser(param)
    init = schedules.make_sigmas("flow", 3, param).tolist()
    kw = dict(x=cal, sampler="plms", population=8, generations=4, init=[init])
    a = search.search_schedule("autodiffusion", den, param, 3, seed=0, **kw)
    b = search.search_schedule("autodiffusion", den, param, 3, seed=0, **kw)
    assert a["sigmas"] == b["sigmas"] and a["created_by"] == "autodiffusion"
    ref = gmm.ode_solve(cal, "flow", 1.0, steps=200)
    assert a["error"] <= _l2(param, gmm, cal, init, "plms", ref) + 1e-3
    assert a["sigmas"][0] == 1.0 and a["sigmas"][-1] == 0.0
    schedules.check_sigmas(a["sigmas"])


def test_search_input_errors():
    param, gmm, cal = _problem()
    den = gmm.denoiser(param)
    with pytest.raises(InvalidParameterError, match="method"):
        search.search_schedule("grid", den, param, 4, x=cal)
    with pytest.raises(InvalidParameterError, match="nfe"):
        search.search_schedule("boss", den, param, 0, x=cal)
    with pytest.raises(InvalidParameterError, match="sampler"):
        search.search_schedule("boss", den, param, 4, x=cal, sampler="heun9")
    with pytest.raises(InvalidParameterError, match="shape"):
        search.search_schedule("boss", den, param, 4)
    r = search.search_schedule("autodiffusion", den, param, 2, shape=(2,), batch=8, population=4, generations=1)
    assert len(r["sigmas"]) == 3


def test_json_round_trip_and_model_type_mismatch(tmp_path):
    schedule = {"model_type": "flow", "sampler": "plms", "nfe": 3, "sigmas": [1.0, 0.6, 0.2, 0.0],
                "created_by": "boss"}
    path = tmp_path / "flux_3.json"
    search.save_schedule(path, schedule)
    loaded = search.load_schedule(path, model_type="flow")
    assert loaded["sampler"] == "plms" and loaded["nfe"] == 3 and loaded["created_by"] == "boss"
    torch.testing.assert_close(loaded["sigmas"], torch.tensor([1.0, 0.6, 0.2, 0.0]))
    assert json.loads(path.read_text())["sigmas"] == [1.0, 0.6, 0.2, 0.0]
    with pytest.raises(InvalidParameterError, match="model_type='flow'.*'vp'"):
        search.load_schedule(path, model_type="vp")


@pytest.mark.parametrize("content,word", [
    ("not json", "cannot read"),
    ('{"model_type": "vp", "sigmas": [1.0, 0.0]}', "lacks"),
    ('{"model_type": "vp", "nfe": 2, "sigmas": [14.6, 1.0, 0.0]}', None),
    ('{"model_type": "vp", "nfe": 3, "sigmas": [14.6, 1.0, 0.0]}', "nfe=3"),
    ('{"model_type": "vp", "nfe": 2, "sigmas": [1.0, 14.6, 0.0]}', "decreasing"),
])
def test_bad_schedule_files(tmp_path, content, word):
    path = tmp_path / "s.json"
    path.write_text(content)
    if word is None:
        assert len(search.load_schedule(path, model_type="vp")["sigmas"]) == 3
        return
    with pytest.raises(InvalidParameterError, match=word):
        search.load_schedule(path, model_type="vp")
    with pytest.raises(InvalidParameterError, match="lacks"):
        search.save_schedule(tmp_path / "t.json", {"sigmas": [1.0, 0.0]})


def test_sampler_of_a_schedule():
    assert search.sampler_of({"sampler": "plms", "options": {"order": 3}}) == ("plms", {"order": 3})
    assert search.sampler_of({}) == ("euler", {})                       # older files name no sampler
    with pytest.raises(InvalidParameterError, match="'nope'"):
        search.sampler_of({"sampler": "nope"})
    with pytest.raises(InvalidParameterError, match=r"\['bogus'\]"):
        search.sampler_of({"sampler": "fitted", "options": {"bogus": 1}})


# --- what a schedule was fitted on -----------------------------------------------------------------------------------

def test_fingerprint_tells_models_apart():
    param = VP()
    a, b = GaussianMixture.random(dim=4, seed=0), GaussianMixture.random(dim=4, seed=1)
    fa = search.fingerprint(a.denoiser(param), param, (4,))
    assert fa == search.fingerprint(a.denoiser(param), param, (4,))              # deterministic
    assert fa != search.fingerprint(b.denoiser(param), param, (4,))
    assert a.fingerprint() == GaussianMixture.random(dim=4, seed=0).fingerprint() != b.fingerprint()


def test_fit_records_what_it_was_fitted_on_and_warns_elsewhere(tmp_path):
    """A fitted file names its model type, noise schedule and model; used on the same one it is silent, on a VP
    model with another beta schedule (another sigma_max) or another model fingerprint it warns; a fitted file from
    before `fitted_on` existed warns that it cannot tell."""
    import warnings

    from nimblediff.core.parameterization import sd_alphas_cumprod

    param, gmm, cal = _problem(n=16)
    fit = search.fit_solver(gmm.denoiser(param), param, 2, x=cal, iterations=2, model_fingerprint=gmm.fingerprint())
    assert fit["fitted_on"]["model_type"] == "vp" and fit["fitted_on"]["model"] == gmm.fingerprint()
    assert fit["fitted_on"]["schedule"]["sigma_max"] == pytest.approx(float(param.sigma_max), rel=1e-3)
    search.save_schedule(tmp_path / "fit.json", fit)
    data = search.load_schedule(tmp_path / "fit.json", model_type="vp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert search.warn_if_fitted_elsewhere(data, VP(), model=gmm.fingerprint()) is data
    other = VP(sd_alphas_cumprod(1000, 0.0001, 0.02, "linear"))                  # DDPM's linear betas
    with pytest.warns(search.FittedElsewhereWarning, match="noise schedule"):
        search.warn_if_fitted_elsewhere(data, other)
    with pytest.warns(search.FittedElsewhereWarning, match="model"):
        search.warn_if_fitted_elsewhere(data, VP(), model=GaussianMixture.circle(seed=3).fingerprint())
    old = {k: v for k, v in data.items() if k != "fitted_on"}
    with pytest.warns(search.FittedElsewhereWarning, match="does not record"):
        search.warn_if_fitted_elsewhere(old, VP())
    with warnings.catch_warnings():                                   # a plain BOSS list is no fitted solver
        warnings.simplefilter("error")
        search.warn_if_fitted_elsewhere({**old, "sampler": "euler"}, VP())


def test_scheduler_from_file_warns_on_another_noise_schedule(tmp_path):
    """The diffusers entry point calls the check: a VP fit loaded onto linear betas warns."""
    pytest.importorskip("diffusers")
    from nimblediff.pipelines import NimbleScheduler

    param, gmm, cal = _problem(n=16)
    search.save_schedule(tmp_path / "fit.json", search.fit_solver(gmm.denoiser(param), param, 2, x=cal,
                                                                  iterations=1))
    NimbleScheduler.from_schedule_file(tmp_path / "fit.json", beta_schedule="scaled_linear")
    with pytest.warns(search.FittedElsewhereWarning, match="noise schedule"):
        NimbleScheduler.from_schedule_file(tmp_path / "fit.json", beta_start=0.0001, beta_end=0.02,
                                           beta_schedule="linear")


# --- problem families (the benchmark's held-out problems) -----------------------------------------------------------

def test_problem_families_seeded_and_file_round_trip(tmp_path):
    from nimblediff.core.gmm import FAMILIES, HELD_OUT_FAMILIES

    for name in HELD_OUT_FAMILIES:
        for dim in (2, 16):
            a, b = GaussianMixture.family(name, dim, 3), GaussianMixture.family(name, dim, 3)
            assert a.dim == dim and a.fingerprint() == b.fingerprint()
            assert a.fingerprint() != GaussianMixture.family(name, dim, 4).fingerprint()
    assert GaussianMixture.family("circle", 2, 0).fingerprint() == GaussianMixture.circle().fingerprint()
    assert set(HELD_OUT_FAMILIES) < set(FAMILIES)
    mix = GaussianMixture.family("clusters", 16, 2)
    mix.save(tmp_path / "mix.json")
    back = GaussianMixture.load(tmp_path / "mix.json")
    x = torch.randn(8, 16, dtype=torch.float64)
    torch.testing.assert_close(back.posterior_mean(x, 1.0, 0.7), mix.posterior_mean(x, 1.0, 0.7))
    (tmp_path / "bad.json").write_text('{"means": [[0.0]], "stds": [0.0], "weights": [1.0]}')
    with pytest.raises(InvalidParameterError, match="stds and weights"):
        GaussianMixture.load(tmp_path / "bad.json")
    with pytest.raises(InvalidParameterError, match="'circle' is 2-D"):
        GaussianMixture.family("circle", 16, 0)
    with pytest.raises(InvalidParameterError, match="unknown"):
        GaussianMixture.family("moons", 2, 0)
