"""The fast merge path (issue 11) against independent references: the dense sum and torch.linalg.svd (Eckart-Young
optimum) for linear merges, PEFT's merge_utils on the dense task tensors for TIES / DARE / magnitude pruning at
sizes that take the sampled top-k threshold, and the exact truncated SVD for the randomized one."""

import math

import pytest
import torch

from nimblediff.core.adapters import merge as M
from nimblediff.core.adapters.delta import LoRA
from nimblediff.core.adapters.rank import randomized_svd, weight_shape
from nimblediff.errors import InvalidParameterError

SHAPES = {"unet.lin": (72, 96), "unet.conv": (48, 16, 3, 3)}


def lora(shape, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LoRA(torch.randn(rank, *shape[1:], generator=g),
                torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.1, alpha)


def pair(ranks=(3, 5)):
    return ([{k: lora(s, ranks[0], 1, alpha=2.0) for k, s in SHAPES.items()},
             {k: lora(s, ranks[1], 2) for k, s in SHAPES.items()}])


def dense(d):
    return d.delta_weight(weight_shape(d)).flatten(1).double()


def truncated(W: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def hand_sum(adapters, weights, key):
    """sum_t w_t (alpha_t / r_t) B_t A_t from the factors, written out."""
    out = 0
    for a, w in zip(adapters, weights):
        d = a[key]
        out = out + w * d.scale * (d.up.flatten(1).double() @ d.down.flatten(1).double())
    return out


def test_linear_fast_merge_is_exact_when_the_budget_holds_the_summed_rank():
    adapters, weights = pair(), [0.7, -1.3]
    merged, report = M.merge(adapters, weights, "linear", rank=8)            # 8 >= 3 + 5
    for key in SHAPES:
        assert merged[key].rank == 8 and report.rank.rel_error[key] < 1e-6
        torch.testing.assert_close(dense(merged[key]), hand_sum(adapters, weights, key), rtol=0, atol=1e-5)


def test_linear_fast_merge_under_a_smaller_budget_is_the_truncated_svd():
    adapters, weights = pair(), [0.7, -1.3]
    fast, report = M.merge(adapters, weights, "linear", rank=4)
    for key in SHAPES:
        W = hand_sum(adapters, weights, key)
        torch.testing.assert_close(dense(fast[key]), truncated(W, 4), rtol=0, atol=1e-5)
        S = torch.linalg.svdvals(W)
        assert report.rank.rel_error[key] == pytest.approx(float(S[4:].norm() / S.norm()), rel=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_randomized_reduction_is_close_to_the_exact_truncated_svd(method):
    adapters = [{k: lora((160, 200), r, s)} for k, r, s in (("unet.x", 4, 1), ("unet.x", 8, 2))]
    fast, rf = M.merge(adapters, [0.8, 0.6], method, density=0.5, seed=3, rank=8)
    full, _ = M.merge(adapters, [0.8, 0.6], method, density=0.5, seed=3)             # the dense merged update
    W = dense(full["unet.x"])
    S = torch.linalg.svdvals(W)
    optimum = float(S[8:].norm() / S.norm())
    actual = float((W - dense(fast["unet.x"])).norm() / W.norm())
    assert rf.rank.rel_error["unet.x"] == pytest.approx(actual, rel=1e-4)       # the report is the real error
    assert optimum <= actual <= optimum * 1.02                                   # within 2 % of Eckart-Young
    exact, re = M.merge(adapters, [0.8, 0.6], method, density=0.5, seed=3, rank=8, svd="exact")
    torch.testing.assert_close(dense(exact["unet.x"]), truncated(W, 8), rtol=0, atol=1e-5)
    assert re.rank.rel_error["unet.x"] == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_large_task_tensors_still_equal_peft_merge_utils(method):
    """600 x 500 entries take the sampled-bracket top-k threshold and the rand < p DARE masks."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    T = [torch.randn(600, 500, generator=g), torch.randn(600, 500, generator=g) * 2]
    adapters = [{"unet.x": M.Diff(t)} for t in T]
    ours, _ = M.merge(adapters, [0.6, 1.1], method, density=0.3, seed=7)
    torch.manual_seed(7)  # PEFT draws from the global generator
    fn = {"ties": merge_utils.ties, "magnitude_prune": merge_utils.magnitude_prune,
          "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties}[method]
    ref = fn([t.clone() for t in T], torch.tensor([0.6, 1.1]), density=0.3)
    assert torch.equal(ours["unet.x"].weight, ref)


def test_kth_largest_matches_a_full_sort_also_when_the_bracket_misses():
    g = torch.Generator().manual_seed(1)
    for a in (torch.rand(300_000, generator=g), torch.cat([torch.zeros(290_000), torch.rand(10_000, generator=g)])):
        for k in (1, 7, 150_000, 299_999, 300_000):
            assert float(M._kth_largest(a, k)) == float(a.sort(descending=True).values[k - 1])


def test_randomized_svd_is_seeded_and_leaves_the_global_rng_alone():
    W = torch.randn(200, 150, dtype=torch.float64) @ torch.diag(0.8 ** torch.arange(150.0, dtype=torch.float64)) \
        @ torch.linalg.qr(torch.randn(150, 150, dtype=torch.float64))[0]
    state = torch.get_rng_state()
    U, S, Vh = randomized_svd(W, 10, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    U2, S2, Vh2 = randomized_svd(W, 10, seed=4)
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(Vh, Vh2)
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:10], rtol=1e-8, atol=0)   # fast spectral decay
    best = truncated(W, 10)
    assert float((U @ torch.diag(S) @ Vh - best).norm() / best.norm()) < 1e-5   # subspace error: first order


def test_progress_is_called_per_layer_and_raising_from_it_cancels():
    calls = []
    M.merge(pair(), [1, 1], "ties", density=0.5, rank=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        M.merge(pair(), [1, 1], "linear", rank=4, progress=cancel)


def test_rank_budget_is_a_per_layer_maximum_and_svd_is_validated():
    small = [{"unet.conv_out": lora((4, 320, 3, 3), 4, s)} for s in (1, 2)]   # SD's conv_out: rank <= 4
    merged, report = M.merge(small, [1, 1], "ties", density=0.5, rank=16)
    assert merged["unet.conv_out"].rank == 4 and report.rank.ranks["unet.conv_out"] == 4
    with pytest.raises(InvalidParameterError, match="svd='full'; valid: fast, exact"):
        M.merge(small, method="linear", rank=2, svd="full")


def test_randomized_path_is_taken_and_faster_than_the_exact_one_on_a_conv_sized_layer():
    """Not a timing test: counts floating point work by the shapes torch.linalg.svd is asked for."""
    calls = []
    original = torch.linalg.svd

    def spy(A, *args, **kwargs):
        calls.append(tuple(A.shape))
        return original(A, *args, **kwargs)

    adapters = [{"unet.x": lora((96, 64, 3, 3), r, s)} for r, s in ((4, 1), (8, 2))]
    torch.linalg.svd = spy
    try:
        M.merge(adapters, [1, 1], "ties", density=0.5, rank=8)
        fast_calls = list(calls)
        calls.clear()
        M.merge(adapters, [1, 1], "ties", density=0.5, rank=8, svd="exact")
    finally:
        torch.linalg.svd = original
    assert all(math.prod(s) <= 16 * 576 for s in fast_calls)    # only small (q, n) cores
    assert (96, 576) in calls                                     # the exact path decomposes the whole update


# ------------------------------------------------------------------ streamed TIES / DARE into a LoRA (issue 11)
def _capture_merged(monkeypatch):
    """The dense merged update the streamed path hands to randomized_svd."""
    seen = {}
    original = M.randomized_svd

    def spy(mat, k, **kwargs):
        seen["M"] = mat.clone()
        return original(mat, k, **kwargs)

    monkeypatch.setattr(M, "randomized_svd", spy)
    return seen


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
@pytest.mark.parametrize("shape", [(300, 900), (96, 64, 3, 3)])
def test_streamed_merge_builds_the_update_peft_merge_utils_builds(method, shape, monkeypatch):
    """300 x 900 takes the sampled bracket and several row blocks; the conv one the small-tensor threshold. The
    update is formed block by block from the factors, so it is compared with PEFT's merge of the dense task tensors
    (to float rounding of the products: an entry at the trim threshold may flip when its product differs in the
    last bit)."""
    from peft.utils import merge_utils

    seen = _capture_merged(monkeypatch)
    adapters = [{"unet.x": lora(shape, r, s, alpha)} for r, s, alpha in ((4, 1, 2.0), (8, 2, None), (6, 3, 6.0))]
    weights = [0.8, -0.6, 1.1]
    monkeypatch.setattr(M, "_BLOCK", 1 << 14)                     # several blocks at test sizes
    low, report = M.merge(adapters, weights, method, density=0.3, seed=5, rank=12)
    fn = {"ties": merge_utils.ties, "magnitude_prune": merge_utils.magnitude_prune,
          "dare_linear": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties}[method]
    torch.manual_seed(5)
    ref = fn([dense(a["unet.x"]).float() for a in adapters], torch.tensor(weights), density=0.3)
    got = seen["M"]
    assert int((got != ref).sum()) <= max(3, ref.numel() // 10_000)
    assert float((got - ref).norm() / ref.norm()) < 1e-3
    # the LoRA is the randomized SVD of that update: its reported error is its real one, within 5 % of the optimum
    W = ref.double()
    actual = float((W - dense(low["unet.x"])).norm() / W.norm())
    optimum = float(torch.linalg.svdvals(W)[12:].norm() / W.norm())
    assert report.rank.rel_error["unet.x"] == pytest.approx(actual, rel=1e-3)
    assert optimum <= actual * (1 + 1e-6) and actual <= 1.05 * optimum


def test_streamed_kth_largest_equals_a_full_sort_also_when_the_bracket_misses():
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(700, 5, generator=g), torch.randn(5, 800, generator=g)
    B[::2] = 0                                                 # half the entries exactly zero: k > N / 2 has tau = 0
    ws = M._Workspace()
    for rows in (1, 37, 700):
        blocks = [(i, min(i + rows, 700)) for i in range(0, 700, rows)]
        full = ((B @ A) * 0.3).abs().flatten().sort(descending=True).values
        for k in (1, 1000, 200_000, 279_999, 280_000, 300_000, 560_000):
            assert M._kth_largest_abs(B, A, 0.3, k, blocks, ws) == float(full[k - 1]), (rows, k)
            for wrong in ((0.0, 1e-9), (float(full[0]) * 2, math.inf), (float(full[k - 1]) * 1.001, math.inf)):
                assert M._kth_largest_abs(B, A, 0.3, k, blocks, ws, bracket=wrong) == float(full[k - 1])


def test_streamed_kth_largest_on_layers_with_fewer_rows_or_columns_than_sample_blocks():
    g = torch.Generator().manual_seed(5)
    ws = M._Workspace()
    for m, n in ((8, 20_000), (20_000, 8)):
        B, A = torch.randn(m, 3, generator=g), torch.randn(3, n, generator=g)
        rows = max(1, M._BLOCK // n)
        blocks = [(i, min(i + rows, m)) for i in range(0, m, rows)]
        full = (B @ A).abs().flatten().sort(descending=True).values
        for k in (1, 1000, 80_000, 160_000):
            assert M._kth_largest_abs(B, A, 1.0, k, blocks, ws) == float(full[k - 1]), (m, k)


def test_streamed_merge_keeps_per_layer_progress_the_rank_cap_and_leaves_the_inputs_alone():
    adapters = [{"unet.a": lora((400, 700), 4, 1), "unet.conv_out": lora((4, 320, 3, 3), 4, 2)},
                {"unet.a": lora((400, 700), 8, 3), "unet.conv_out": lora((4, 320, 3, 3), 4, 4)}]
    before = [{k: (d.down.clone(), d.up.clone()) for k, d in a.items()} for a in adapters]
    calls = []
    merged, report = M.merge(adapters, [1, 1], "dare_ties", density=0.5, rank=16,
                             progress=lambda done, total: calls.append(done))
    assert calls == [1, 2] and merged["unet.conv_out"].rank == 4 and merged["unet.a"].rank == 16
    for a, b in zip(adapters, before):
        assert all(torch.equal(a[k].down, b[k][0]) and torch.equal(a[k].up, b[k][1]) for k in a)
    # the same seed gives the same LoRA; the DARE masks are drawn from `seed` as without a rank
    again, _ = M.merge(adapters, [1, 1], "dare_ties", density=0.5, rank=16)
    assert torch.equal(merged["unet.a"].up, again["unet.a"].up)
