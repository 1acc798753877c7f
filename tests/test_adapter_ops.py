"""Adapter operations (core/adapters rank / extract / merge, weights/lora_write) against PEFT, diffusers, dense
SVDs and hand-worked cases."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters import merge as M  # noqa: E402
from nimblediff.core.adapters.apply import fuse  # noqa: E402
from nimblediff.core.adapters.delta import Diff, LoRA  # noqa: E402
from nimblediff.core.adapters.extract import extract_lora, to_lora  # noqa: E402
from nimblediff.core.adapters.rank import lora_svd, prune_to_budget, resize_lora, weight_shape  # noqa: E402
from nimblediff.errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError  # noqa: E402
from nimblediff.weights.lora_formats import read_lora  # noqa: E402
from nimblediff.weights.lora_write import save_lora  # noqa: E402


def dense(d):
    return d.delta_weight(weight_shape(d))


def orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0].float()


def spectral_lora(out, fan_in, sv, seed, alpha=None, conv=None):
    """A LoRA whose unscaled B @ A has exactly the singular values `sv` (hidden behind a random mixing of the rank)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(sv)
    U, V = orthonormal(out, r, gen), orthonormal(fan_in if conv is None else fan_in * conv[0] * conv[1], r, gen)
    mix = torch.randn(r, r, generator=gen) + 3 * torch.eye(r)                # B = U S mix, A = mix^-1 V^T
    up, down = U * torch.tensor(sv, dtype=torch.float32) @ mix, torch.linalg.solve(mix, V.T)
    if conv is not None:
        return LoRA(down.reshape(r, fan_in, *conv), up.reshape(out, r, 1, 1), alpha)
    return LoRA(down, up, alpha)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------------------ rank
def test_thin_svd_of_the_product_equals_the_dense_svd():
    gen = torch.Generator().manual_seed(0)
    cases = [LoRA(torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen), 3.0),
             LoRA(torch.randn(5, 4, 3, 3, generator=gen), torch.randn(7, 5, 1, 1, generator=gen)),
             LoRA(torch.randn(4, 6, generator=gen), torch.randn(8, 4, generator=gen), 2.0,
                  mid=torch.randn(4, 4, 3, 3, generator=gen)),                       # LoCon Tucker core
             LoRA(torch.randn(12, 5, generator=gen), torch.randn(9, 12, generator=gen))]  # rank > the layer's
    for d in cases:
        W = dense(d).flatten(1) / d.scale
        U, S, Vh = lora_svd(d)
        torch.testing.assert_close(S, torch.linalg.svdvals(W)[: S.numel()], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(U * S @ Vh, W, rtol=1e-4, atol=1e-4)
    assert lora_svd(cases[-1])[1].numel() == 5


def uneven_loras(n=8, size=64, r=16):
    """Layers whose spectra decay at different rates (slow: needs many components; fast: one or two)."""
    decays = torch.linspace(0.05, 1.5, n).tolist()
    return {f"unet.down_blocks.0.attentions.{i}.proj_in":
            spectral_lora(size, size, [math.exp(-d * j) for j in range(r)], seed=i, alpha=8.0)
            for i, d in enumerate(decays)}


def test_budget_pruning_beats_uniform_truncation_at_the_same_size():
    deltas = uneven_loras()
    uniform, u_report = resize_lora(deltas, rank=8)
    pruned, p_report = prune_to_budget(deltas, fraction=0.5)
    assert u_report.params == p_report.params == p_report.params_before // 2
    errors = {}
    for name, result in (("uniform", uniform), ("pruned", pruned)):
        errors[name] = sum(rel_err(dense(result[k]) if k in result else 0 * dense(d), dense(d))
                           for k, d in deltas.items())
    assert errors["pruned"] < 0.8 * errors["uniform"], errors
    # the report's errors (read off the singular values) are the true ones
    assert p_report.total_rel_error == pytest.approx(errors["pruned"], rel=1e-4)
    ranks = list(p_report.ranks.values())
    assert ranks[0] > 8 > ranks[-1] and ranks == sorted(ranks, reverse=True)  # slow decay gets the rank
    for k, d in pruned.items():  # alpha / rank is kept
        assert d.scale == pytest.approx(deltas[k].scale)
    # a file-size budget in bytes for a dtype is the same budget
    same, b_report = prune_to_budget(deltas, max_bytes=p_report.params * 2, dtype=torch.float16)
    assert b_report.ranks == p_report.ranks and b_report.nbytes(torch.float16) <= p_report.params * 2


@pytest.mark.parametrize("score", ["relative", "energy", "sv"])
def test_pruning_respects_the_budget_and_min_rank(score):
    deltas = uneven_loras(n=4, size=32, r=8)
    pruned, report = prune_to_budget(deltas, params=10 * 64, score=score, min_rank=1)
    assert report.params <= 10 * 64 and min(report.ranks.values()) >= 1 and set(pruned) == set(deltas)
    tiny, report = prune_to_budget(deltas, params=64 * 2)
    assert sum(report.ranks.values()) == 2 and len(tiny) <= 2 and len(report.dropped) >= 2
    assert all(report.rel_error[k] == 1.0 for k in report.dropped)
    with pytest.raises(InvalidParameterError, match="min_rank=2 alone needs 512"):
        prune_to_budget(deltas, params=100, min_rank=2)
    with pytest.raises(InvalidParameterError, match="exactly one of"):
        prune_to_budget(deltas, params=100, fraction=0.5)


def test_resize_by_rank_ratio_fro_energy_cumulative_matches_hand_computed_svd():
    # unscaled singular values 8, 6, 4, 2; alpha 2 / rank 4 = scale 0.5
    d = spectral_lora(10, 12, [8.0, 6.0, 4.0, 2.0], seed=3, alpha=2.0)
    U, S, Vh = lora_svd(d)
    expected_rank = {
        "sv_ratio": (2.5, 3),         # keep S >= 8 / 2.5 = 3.2: 8, 6, 4
        "sv_fro": (0.9, 2),           # S^2 = 64, 36, 16, 4 (120): 64 + 36 = 100 >= 0.81 * 120 = 97.2
        "energy": (0.95, 3),          # 114 needed: 64 + 36 + 16 = 116
        "sv_cumulative": (0.5, 2),    # 10 of 20 needed: 8 + 6 = 14
        "rank": (1, 1),
    }
    for method, (value, k) in expected_rank.items():
        (key, out), = resize_lora({"unet.x": d}, **{method: value})[0].items()
        report = resize_lora({"unet.x": d}, **{method: value})[1]
        assert out.rank == k and report.ranks["unet.x"] == k, method
        hand = 0.5 * (U[:, :k] * torch.tensor([8.0, 6.0, 4.0, 2.0])[:k] @ Vh[:k])
        torch.testing.assert_close(dense(out), hand, rtol=1e-4, atol=1e-5)
        tail = [64.0, 36.0, 16.0, 4.0][k:]
        assert report.rel_error["unet.x"] == pytest.approx(math.sqrt(sum(tail) / 120), abs=1e-5)
        assert out.scale == pytest.approx(0.5)
    # a threshold with a rank cap; a rank the LoRA already has returns it untouched
    assert resize_lora({"unet.x": d}, sv_ratio=100, rank=2)[1].ranks["unet.x"] == 2
    assert resize_lora({"unet.x": d}, rank=4)[0]["unet.x"] is d


# --------------------------------------------------------------------------------------------------------- extract
def test_extraction_recovers_a_known_low_rank_difference():
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(16, 16))
    tuned = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(16, 16))
    tuned.load_state_dict(base.state_dict())
    known = {"0": torch.randn(16, 3, generator=gen) @ torch.randn(3, 24, generator=gen),
             "1": (torch.randn(8, 3, generator=gen) @ torch.randn(3, 36, generator=gen)).reshape(8, 4, 3, 3)}
    with torch.no_grad():
        tuned[0].weight += known["0"]
        tuned[1].weight += known["1"]
    for kwargs in ({"rank": 3}, {"energy": 0.999999, "rank": 8}):
        deltas, report = extract_lora(base, tuned, component="unet", **kwargs)
        assert set(deltas) == {"unet.0", "unet.1"} and "unet.2" in report.dropped  # unchanged layer skipped
        assert report.ranks == {"unet.0": 3, "unet.1": 3}
        assert deltas["unet.1"].down.shape == (3, 4, 3, 3) and deltas["unet.1"].up.shape == (8, 3, 1, 1)
        for name, diff in known.items():
            assert rel_err(dense(deltas[f"unet.{name}"]), diff) < 1e-5
            assert report.rel_error[f"unet.{name}"] < 1e-5
    # state dicts work the same; kohya's clamp_quantile bounds both factors by the quantile of their values
    sd_deltas, _ = extract_lora(base.state_dict(), tuned.state_dict(), component="unet", rank=3)
    torch.testing.assert_close(dense(sd_deltas["unet.0"]), dense(deltas["unet.0"]))
    clamped, _ = extract_lora(base, tuned, component="unet", rank=3, clamp_quantile=0.9)
    d = to_lora({"unet.0": Diff(known["0"])}, rank=3)[0]["unet.0"]
    hi = torch.quantile(torch.cat([d.up.flatten(), d.down.flatten()]), 0.9)
    assert float(clamped["unet.0"].up.abs().max()) == pytest.approx(float(hi), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- merges
def three_adapters():
    gen = torch.Generator().manual_seed(7)
    out = []
    for t in range(3):
        out.append({"unet.a": LoRA(torch.randn(4, 20, generator=gen), torch.randn(12, 4, generator=gen), 2.0 + t),
                    "unet.b": LoRA(torch.randn(3, 4, 3, 3, generator=gen), torch.randn(6, 3, 1, 1, generator=gen))})
    return out


@pytest.mark.parametrize("method", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_delta_merges_equal_peft_merge_utils_bit_for_bit(method):
    from peft.utils import merge_utils

    adapters, weights, density = three_adapters(), [0.7, -0.3, 1.2], 0.4
    reference = {"linear": merge_utils.task_arithmetic, "ties": merge_utils.ties, "dare_ties": merge_utils.dare_ties,
                 "dare_linear": merge_utils.dare_linear, "magnitude_prune": merge_utils.magnitude_prune}[method]
    ours, report = M.merge(adapters, weights, method, density=density, seed=5)
    torch.manual_seed(5)  # PEFT draws DARE masks from the global generator, key by key, adapter by adapter
    for key in ("unet.a", "unet.b"):
        args = ([dense(a[key]) for a in adapters], torch.tensor(weights))
        expected = reference(*args) if method == "linear" else reference(*args, density)
        assert isinstance(ours[key], Diff) and torch.equal(ours[key].weight, expected), (method, key)
    assert report.sources == {"unet.a": [0, 1, 2], "unet.b": [0, 1, 2]}


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_factor_merges_equal_peft_add_weighted_adapter(combination, monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                  init_lora_weights=False), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["0", "2"],
                                                init_lora_weights=False))
    layers = {name: m for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "first" in m.lora_A}
    adapters = [{f"unet.{n}": LoRA(m.lora_A[a].weight.detach().clone(), m.lora_B[a].weight.detach().clone(),
                                   m.lora_alpha[a]) for n, m in layers.items()} for a in ("first", "second")]
    # PEFT first initialises the new adapter from the global RNG, then draws DARE masks from it: record the RNG
    # state at its first merge call and give our merge a generator in that state
    states = []
    original = type(peft_model.base_model)._generalized_task_arithmetic_weighted_adapter

    def recording(self, *args, **kwargs):
        states.append(torch.get_rng_state())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(peft_model.base_model), "_generalized_task_arithmetic_weighted_adapter", recording)
    peft_model.add_weighted_adapter(["first", "second"], [0.6, -0.9], "merged", combination_type=combination,
                                    density=0.5)
    generator = torch.Generator()
    generator.set_state(states[0])
    ours, _ = M.merge(adapters, [0.6, -0.9], combination, density=0.5, space="factors", generator=generator)
    for name, m in layers.items():
        assert torch.equal(ours[f"unet.{name}"].down, m.lora_A["merged"].weight), (combination, name)
        assert torch.equal(ours[f"unet.{name}"].up, m.lora_B["merged"].weight), (combination, name)
        assert ours[f"unet.{name}"].scale == m.scaling["merged"] == 1.0


def test_dare_drops_at_rate_p_rescales_and_is_seeded():
    ones = [{"unet.x": Diff(torch.ones(200, 200))}]
    w = M.merge(ones, method="dare_linear", density=0.3, seed=1)[0]["unet.x"].weight
    kept = float((w != 0).float().mean())
    assert abs(kept - 0.3) < 4 * math.sqrt(0.3 * 0.7 / w.numel())    # drop probability p = 0.7
    assert torch.allclose(w[w != 0], torch.tensor(1 / 0.3))          # survivors rescaled by 1 / (1 - p)
    again = M.merge(ones, method="dare_linear", density=0.3, seed=1)[0]["unet.x"].weight
    other = M.merge(ones, method="dare_linear", density=0.3, seed=2)[0]["unet.x"].weight
    assert torch.equal(w, again) and not torch.equal(w, other)


def test_darex_q_fits_the_rescale_that_minimises_the_output_change():
    adapters, weights = three_adapters(), [1.0, 0.5, 0.8]
    gen = torch.Generator().manual_seed(3)
    X = {"unet.a": torch.randn(32, 20, generator=gen) + 1.0, "unet.b": torch.randn(32, 36, generator=gen)}
    ours, report = M.merge(adapters, weights, "darex_q", density=0.1, calibration=X, seed=0)
    dare, _ = M.merge(adapters, weights, "dare_linear", density=0.1, seed=0)   # same masks, rescale 1 / 0.1
    full, _ = M.merge(adapters, weights, "linear")
    for key in ("unet.a", "unet.b"):
        q = report.rescale[key]
        kept = dare[key].weight * 0.1                                       # the dropped, unrescaled merge
        torch.testing.assert_close(ours[key].weight, kept * q)

        def change(c):
            return float(((c * kept - full[key].weight).flatten(1) @ X[key].T).square().sum())

        assert change(q) <= min(change(q * 0.98), change(q * 1.02), change(10.0))
    assert report.rescale["unet.a"] < 10.0 and report.rescale["unet.b"] < 10.0  # 1/(1-p) = 10 overshoots here
    with pytest.raises(InvalidParameterError, match="calibration"):
        M.merge(adapters, weights, "darex_q", density=0.1)


def test_merged_update_back_to_a_lora_under_a_rank_budget():
    adapters = three_adapters()
    full, _ = M.merge(adapters, [1, 1, 1], "linear")
    low, report = M.merge(adapters, [1, 1, 1], "linear", rank=5)
    W = full["unet.a"].weight
    U, S, Vh = torch.linalg.svd(W)
    assert low["unet.a"].rank == 5 and report.rank.ranks["unet.a"] == 5
    torch.testing.assert_close(dense(low["unet.a"]), U[:, :5] * S[:5] @ Vh[:5], rtol=1e-4, atol=1e-5)
    cat, _ = M.merge(adapters, [0.5, 1, -1], "cat")                    # exact: one LoRA of the summed rank
    assert cat["unet.a"].rank == 12
    expected = sum(w * dense(a["unet.a"]) for a, w in zip(adapters, [0.5, 1, -1]))
    torch.testing.assert_close(dense(cat["unet.a"]), expected)


# ---------------------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("key,group,fine", [
    ("unet.down_blocks.1.attentions.0.proj_in", "input", "input.1"),
    ("unet.conv_in", "input", "input"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "middle", "middle"),
    ("unet.up_blocks.2.resnets.1.conv1", "output", "output.2"),
    ("unet.conv_out", "output", "output"),
    ("unet.time_embedding.linear_1", "other", "other"),
    ("transformer.transformer_blocks.3.attn.to_q", "double", "double.3"),
    ("transformer.single_transformer_blocks.12.proj_out", "single", "single.12"),
    ("transformer.x_embedder", "other", "other"),
    ("text_encoder.encoder.layers.5.mlp.fc1", "text_encoder", "text_encoder.5"),
    ("text_encoder_2.text_projection", "text_encoder_2", "text_encoder_2"),
])
def test_block_of(key, group, fine):
    assert M.block_of(key) == group and M.block_of(key, fine=True) == fine


def unet_adapter(seed):
    gen = torch.Generator().manual_seed(seed)
    keys = ["unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_in",
            "unet.up_blocks.0.attentions.0.proj_in", "unet.up_blocks.0.attentions.1.proj_in",
            "text_encoder.encoder.layers.0.mlp.fc1"]
    return {k: LoRA(torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen), 1.0) for k in keys}


def test_scale_blocks_by_group_numbered_block_and_module_prefix():
    a = unet_adapter(0)
    out = M.scale_blocks(a, {"input": 0.5, "output": 2.0, "unet.up_blocks.0.attentions.1": -1.0, "middle": 0})
    assert "unet.mid_block.attentions.0.proj_in" not in out                       # weight 0 leaves it out
    for key, c in [("unet.down_blocks.0.attentions.0.proj_in", 0.5), ("unet.up_blocks.0.attentions.0.proj_in", 2.0),
                   ("unet.up_blocks.0.attentions.1.proj_in", -1.0), ("text_encoder.encoder.layers.0.mlp.fc1", 1.0)]:
        torch.testing.assert_close(dense(out[key]), c * dense(a[key]))
    assert out["text_encoder.encoder.layers.0.mlp.fc1"] is a["text_encoder.encoder.layers.0.mlp.fc1"]
    with pytest.raises(InvalidParameterError, match="unknown block names \\['ouput'\\]; valid: input, middle"):
        M.scale_blocks(a, {"ouput": 1.0})


def test_compose_content_and_style_by_blocks():
    content, style = unet_adapter(1), unet_adapter(2)
    out, used = M.compose({"content": content, "style": style}, M.CONTENT_STYLE_UNET)
    assert out["unet.down_blocks.0.attentions.0.proj_in"] is content["unet.down_blocks.0.attentions.0.proj_in"]
    assert out["unet.mid_block.attentions.0.proj_in"] is content["unet.mid_block.attentions.0.proj_in"]
    assert out["unet.up_blocks.0.attentions.1.proj_in"] is style["unet.up_blocks.0.attentions.1.proj_in"]
    te = "text_encoder.encoder.layers.0.mlp.fc1"
    assert used[te] == ["content", "style"] and out[te].rank == 4
    torch.testing.assert_close(dense(out[te]), dense(content[te]) + dense(style[te]))
    # B-LoRA-style split inside one block, by module prefix; uncovered blocks must be assigned
    split, _ = M.compose({"content": content, "style": style},
                         {"unet.up_blocks.0.attentions.0": "content", "unet.up_blocks.0.attentions.1": "style"},
                         default=None)
    assert set(split) == {"unet.up_blocks.0.attentions.0.proj_in", "unet.up_blocks.0.attentions.1.proj_in"}
    with pytest.raises(InvalidParameterError, match="no assignment covers blocks \\['input', 'middle'"):
        M.compose({"content": content, "style": style}, {"output": "style", "text_encoder": "style"})


def test_fit_block_weights_recovers_known_coefficients():
    a, b = unet_adapter(3), unet_adapter(4)
    truth = [{"input": 0.3, "middle": 1.0, "output": 1.7, "text_encoder": -0.4},
             {"input": -0.5, "middle": 0.2, "output": 0.8, "text_encoder": 1.1}]
    X = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    target = {k: (sum(t[M.block_of(k)] * dense(d[k]) for t, d in zip(truth, (a, b)))) @ X.T for k in a}

    def loss(merged):
        return sum(((merged[k] @ X.T - target[k]) ** 2).mean() for k in merged)

    lbfgs = lambda p: torch.optim.LBFGS(p, lr=1, max_iter=20, line_search_fn="strong_wolfe")  # noqa: E731
    fit = M.fit_block_weights([a, b], loss, steps=20, optimizer=lbfgs)
    for got, want in zip(fit.coefficients, truth):
        assert got == pytest.approx(want, abs=1e-3)
    adam = M.fit_block_weights([a, b], loss, steps=300, lr=0.05)
    assert adam.losses[-1] < 1e-2 * adam.losses[0]
    # the fitted coefficients feed scale_blocks + a linear merge
    merged, _ = M.merge([M.scale_blocks(a, fit.coefficients[0]), M.scale_blocks(b, fit.coefficients[1])])
    key = "unet.up_blocks.0.attentions.0.proj_in"
    torch.testing.assert_close(merged[key].weight @ X.T, target[key], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------------- writing
def sd15_deltas():
    gen = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoRA(r(4, 8), r(8, 4), 2.0),
        "unet.mid_block.attentions.0.proj_in": LoRA(r(2, 16), r(16, 2), 1.5),
        "unet.up_blocks.1.resnets.0.conv1": LoRA(r(3, 6, 3, 3), r(5, 3, 1, 1)),
        "text_encoder.encoder.layers.0.self_attn.q_proj": LoRA(r(4, 8), r(8, 4), 4.0),
    }


@pytest.mark.parametrize("layout", ["peft", "kohya", "comfyui"])
def test_save_then_read_lora_round_trips(tmp_path, layout):
    deltas = sd15_deltas()
    if layout != "peft":  # full and bias differences, and a LoCon core, exist in kohya / ComfyUI files only
        deltas["unet.up_blocks.1.attentions.0.proj_out"] = Diff(torch.randn(8, 8), torch.randn(8))
        deltas["unet.down_blocks.1.resnets.0.conv2"] = LoRA(torch.randn(2, 6), torch.randn(5, 2, 1, 1), 1.0,
                                                           mid=torch.randn(2, 2, 3, 3))
    path = save_lora(deltas, tmp_path / f"{layout}.safetensors", layout, metadata={"note": "round trip"})
    read, report = read_lora(path)
    assert report.layout == layout and report.unmatched == [] and set(read) == set(deltas)
    assert report.metadata["note"] == "round trip"
    for key, d in deltas.items():
        got = read[key]
        assert type(got) is type(d), key
        if isinstance(d, LoRA):
            assert torch.equal(got.down, d.down) and torch.equal(got.up, d.up) and got.scale == d.scale, key
            assert (got.mid is None) == (d.mid is None)
        else:
            assert torch.equal(got.weight, d.weight) and torch.equal(got.bias, d.bias)
    if layout != "peft":  # one alpha for the whole file: the same updates, alpha / rank folded into up
        path = save_lora(deltas, tmp_path / f"{layout}_uniform.safetensors", layout, uniform_alpha=True)
        read, _ = read_lora(path)
        assert len({d.alpha for d in read.values() if isinstance(d, LoRA)}) == 1
        for key, d in deltas.items():
            torch.testing.assert_close(dense(read[key]), dense(d), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_written_file_loads_in_diffusers_like_our_fuse(tmp_path, layout):
    """Dynamic ranks and alphas (a pruned LoRA) through diffusers' load_lora_weights + fuse_lora. kohya with
    uniform_alpha: diffusers 0.42 gives some kohya modules the file's most common alpha instead of their own."""
    pipe = factories.tiny_sd15_pipeline()
    mods = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    lora = factories.random_lora(mods, rank=4, alpha=2.0, seed=4, scale=0.3)
    deltas = {k: LoRA(down, up, alpha) for k, (down, up, alpha) in lora.items()}
    deltas, report = prune_to_budget(deltas, fraction=0.6)
    assert len(set(report.ranks.values())) > 1
    path = save_lora(deltas, tmp_path / "pruned.safetensors", layout, uniform_alpha=layout == "kohya")
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = factories.tiny_sd15_pipeline()
    fuse({"unet": ours.unet, "text_encoder": ours.text_encoder}, deltas)
    for name in ("unet", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(ours, name).state_dict()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_save_lora_never_overwrites_without_the_flag(tmp_path):
    deltas = sd15_deltas()
    path = save_lora(deltas, tmp_path / "x.safetensors", "kohya")
    before = path.read_bytes()
    with pytest.raises(WeightsFormatError, match=f"{path}: exists; pass overwrite=True"):
        save_lora(resize_lora(deltas, rank=1)[0], path, "kohya")
    assert path.read_bytes() == before
    save_lora(resize_lora(deltas, rank=1)[0], path, "kohya", overwrite=True)
    assert read_lora(path)[1].metadata["ss_network_dim"] == "1"


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_parameter_value_and_what_is_valid(tmp_path):
    d = {"unet.x": LoRA(torch.randn(4, 6), torch.randn(5, 4))}
    with pytest.raises(InvalidParameterError, match="rank=9 is larger than layer 'unet.x' allows.*at most 5"):
        resize_lora(d, rank=9)
    with pytest.raises(InvalidParameterError, match="rank=7 is larger than layer 'unet.y'"):
        to_lora({"unet.y": Diff(torch.randn(6, 6))}, rank=7)
    nan = {"unet.x": LoRA(torch.randn(4, 6), torch.full((5, 4), float("nan")))}
    for call in (lambda: resize_lora(nan, rank=2), lambda: prune_to_budget(nan, fraction=0.5),
                 lambda: M.merge([nan, d]), lambda: save_lora(nan, tmp_path / "n.safetensors")):
        with pytest.raises(InvalidParameterError, match="'unet.x'.*up tensor.*NaN"):
            call()
    with pytest.raises(InvalidParameterError, match="method='slerp'; valid: linear, ties, dare_linear, dare_ties, "
                                                    "darex_q, magnitude_prune, cat"):
        M.merge([d, d], method="slerp")
    with pytest.raises(InvalidParameterError, match="density=0; expected a fraction in \\(0, 1\\]"):
        M.merge([d, d], method="ties", density=0)
    with pytest.raises(AdapterMismatchError, match="different shapes"):
        M.merge([d, {"unet.x": Diff(torch.randn(5, 7))}])
    with pytest.raises(AdapterMismatchError, match="space='factors'.*use space='delta'"):
        M.merge([d, {"unet.x": LoRA(torch.randn(2, 6), torch.randn(5, 2))}], space="factors")
    with pytest.raises(AdapterMismatchError, match="missing in the fine-tune \\['1'\\]"):
        extract_lora(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
                     torch.nn.Sequential(torch.nn.Linear(2, 2)), component="unet", rank=1)
    with pytest.raises(InvalidParameterError, match="sv_fro=1.5; expected a fraction"):
        resize_lora(d, sv_fro=1.5)
    with pytest.raises(InvalidParameterError, match="peft layout: key 'unet.x' holds a full difference"):
        save_lora({"unet.x": Diff(torch.randn(5, 6))}, tmp_path / "d.safetensors", "peft")
    with pytest.raises(InvalidParameterError, match="layout='a1111'; valid: peft, kohya, comfyui"):
        save_lora(d, tmp_path / "d.safetensors", "a1111")


def test_merge_key_check_names_the_file_warns_on_strays_and_refuses_no_match():
    """Issue 17: read_lora names any PEFT module as given; the merge checks the names against the claimed base."""
    from nimblediff.weights.lora_ops import check_merge_keys

    good = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    pairs = {good: (320, 320), "unet.head.proj": (8, 8)}
    sd = {f"{m}.lora_{ab}.weight": torch.randn(*((2, i) if ab == "A" else (o, 2)))
          for m, (o, i) in pairs.items() for ab in "AB"}
    deltas, report = read_lora(sd)
    with pytest.warns(UserWarning, match=r"<state dict>: 1 of its 2 modules are not modules of a.*head"):
        check_merge_keys([deltas], [report])
    stray, stray_report = read_lora({k: v for k, v in sd.items() if "head" in k})
    with pytest.raises(AdapterMismatchError, match=r"<state dict>: none of its 1 modules is a module of an SD1.x / "
                                                   r"SD2.x / SDXL UNet or text encoder, e.g. \['unet.head.proj'\]"):
        check_merge_keys([stray, deltas], [stray_report, report])
    # DiT modules have no list without a model: only the check against the other LoRAs applies to them
    dit, dit_report = read_lora({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 8),
                                 "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2)})
    check_merge_keys([dit, dit], [dit_report, dit_report])
    with pytest.raises(AdapterMismatchError, match=r"<state dict>: none of its 1 modules \(e.g. \['transformer.blocks"), \
            pytest.warns(UserWarning, match="head"):
        check_merge_keys([dit, deltas], [dit_report, report])
