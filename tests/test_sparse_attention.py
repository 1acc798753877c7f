"""Re-ttention sparse attention (core/caching/sparse_attention.py and its two surfaces). References: dense
`F.scaled_dot_product_attention`, a naive masked softmax written here from the definition, a hand-worked three-key
case, the unpatched tiny SD3 transformer, and (ComfyUI side) a toy MMDiT calling attention through ComfyUI's
wrap_attn contract (transformer_options["optimized_attention_override"](func, q, k, v, heads, ...))."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nimblediff.core.caching import Rettention
from nimblediff.core.caching import sparse_attention as sa
from nimblediff.errors import InvalidParameterError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402
from factories import _seeded, tiny_sd3_pipeline  # noqa: E402


def qkv(seed=0, b=2, h=3, n=13, d=4, n_k=None):
    g = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n_k, d, generator=g),
            torch.randn(b, h, n_k, d, generator=g))


def masked_reference(q, k, v, keep, block):
    """Top-k attention from the definition: for query i in block c, the kept keys are the ceil(keep * N_k) keys of
    largest sum_{i' in c} q_i' . k_j; softmax over them only (a loop over blocks, no gather, no padding)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n_q, n_k = s.shape[-2:]
    kk = max(1, math.ceil(keep * n_k - 1e-9))
    mask = torch.zeros_like(s, dtype=torch.bool)
    for start in range(0, n_q, block):
        pooled = s[..., start:start + block, :].sum(-2)                        # (B, H, N_k)
        top = pooled.topk(kk, -1).indices
        mask[..., start:start + block, :] = torch.zeros_like(pooled, dtype=torch.bool).scatter(
            -1, top, True).unsqueeze(-2)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return p @ v, mask


# ------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("block", [1, 4, 13])
def test_keep_one_is_dense_sdpa(block):
    q, k, v = qkv()
    dense = F.scaled_dot_product_attention(q, k, v)
    state = Rettention(1.0, warmup=1, block=block)
    state(lambda: None, 0, step=3)
    assert torch.equal(state.attend(q, k, v, "l"), dense)
    index = sa.select_keys(q, k, 1.0, block)                # every key kept
    assert torch.allclose(sa.sparse_attention(q, k, v, index, block), dense, atol=1e-6)
    assert state.flops_kept == 1.0


@pytest.mark.parametrize("keep,block", [(0.3, 1), (0.3, 4), (0.1, 5), (0.5, 13), (0.03, 2)])
def test_plain_top_k_equals_a_masked_softmax(keep, block):
    q, k, v = qkv(1, n=13, n_k=17)
    want, mask = masked_reference(q, k, v, keep, block)
    index = sa.select_keys(q, k, keep, block)
    got = sa.sparse_attention(q, k, v, index, block)
    assert torch.allclose(got, want, atol=1e-6)
    assert int(mask[0, 0, 0].sum()) == index.shape[-1] == max(1, math.ceil(keep * 17 - 1e-9))


@pytest.mark.parametrize("keep,block", [(0.3, 1), (0.25, 4), (0.05, 6)])
def test_reshape_with_same_step_statistics_is_dense_attention(keep, block):
    q, k, v = qkv(2, n=14, n_k=14)
    dense = F.scaled_dot_product_attention(q, k, v)
    o, index, alpha, r = sa.dense_with_statistics(q, k, v, keep, block)
    assert torch.allclose(o, dense, atol=1e-6)
    plain = sa.sparse_attention(q, k, v, index, block)
    assert torch.allclose(sa.reshape(plain, alpha, r), dense, atol=1e-6)
    assert (plain - dense).abs().max() > 1e-2                        # the restored mass is not a rounding error
    # alpha is the kept share of the softmax mass: the masked reference's probabilities summed over kept keys
    _, mask = masked_reference(q, k, v, keep, block)
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    assert torch.allclose(alpha, (p * mask).sum(-1), atol=1e-6)
    assert torch.allclose(r, (p * ~mask) @ v, atol=1e-6)


def test_explicit_logsumexp_matches_the_fused_cpu_kernel():
    q, k, v = qkv(6, n=9, n_k=11)
    o, lse = sa.sdpa_with_lse(q, k, v, scale=0.3)
    assert torch.equal(o, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1), atol=1e-5)
    o2, lse2 = sa.sdpa_with_lse(q.double(), k.double(), v.double(), scale=0.3)     # any dtype: explicit or fused
    assert torch.allclose(o2.float(), o, atol=1e-5) and torch.allclose(lse2.float(), lse, atol=1e-5)


def test_hand_worked_three_keys():
    """One query, scores 0, ln 2, ln 4 (scale 1): Z = 7; keep 2 of 3 keeps keys 1 and 2 (mass 6/7).
    v = 7, 0, 14: dense o = (7 + 0 + 56) / 7 = 9; top-k o^S = (0 + 56) / 6; alpha = 6/7; r = 7/7 = 1;
    alpha o^S + r = 8 + 1 = 9."""
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([0.0, math.log(2), math.log(4)]).view(1, 1, 3, 1)
    v = torch.tensor([7.0, 0.0, 14.0]).view(1, 1, 3, 1)
    o, index, alpha, r = sa.dense_with_statistics(q, k, v, 2 / 3, 1, scale=1.0)
    assert sorted(index.flatten().tolist()) == [1, 2]
    assert torch.allclose(o, torch.tensor(9.0)) and torch.allclose(alpha, torch.tensor(6 / 7))
    assert torch.allclose(r, torch.tensor(1.0))
    plain = sa.sparse_attention(q, k, v, index, 1, scale=1.0)
    assert torch.allclose(plain, torch.tensor(56 / 6))
    assert torch.allclose(sa.reshape(plain, alpha, r), torch.tensor(9.0))


def test_schedule_statistics_and_flops_by_hand():
    """warmup 2, refresh 3: steps 0, 1 dense, then one dense step in every 3 (4, 7); a sparse step t returns
    alpha_tau o^S_t + r_tau with (S, alpha, r) from the last dense step tau, all computed here from the masked
    reference; FLOPs: 4 B H N_q N_k D per dense call (+ the kept keys' attention and the pooled scores where the
    next step is sparse), 4 B H N_q kk D per sparse call."""
    keep, block, steps = 0.25, 3, 9
    state = Rettention(keep, warmup=2, refresh=3, block=block)
    assert [s for s in range(steps) if state.is_dense(s)] == [0, 1, 4, 7]
    last, flops = None, 0
    for step in range(steps):
        q, k, v = qkv(10 + step, n=12)
        got = state(lambda: state.attend(q, k, v, "layer"), None, step=step)
        cost = 4 * q.numel() * 12
        kk = math.ceil(keep * 12)
        if state.is_dense(step):
            _, mask = masked_reference(q, k, v, keep, block)
            p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
            last = mask, (p * mask).sum(-1), (p * ~mask) @ v
            assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
            # step 0 is followed by a dense step: no record; a recording step adds the kept keys' attention and the
            # pooled scores (N_q / block rows of Q K^T)
            flops += cost + (4 * q.numel() * kk + cost // (2 * block) if step != 0 else 0)
        else:
            mask, alpha, r = last
            s = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf"))
            want = alpha.unsqueeze(-1) * (torch.softmax(s, -1) @ v) + r
            assert torch.allclose(got, want, atol=1e-6), step
            flops += 4 * q.numel() * kk
    assert state.dense_calls == 4 and state.sparse_calls == 5
    assert state.flops == flops and state.dense_flops == steps * 4 * q.numel() * 12


def test_statistics_from_a_nearby_step_beat_plain_top_k():
    """The point of the reshape: attention drifts slowly between denoising steps, so the dropped mass recorded one
    step earlier brings a sparse step much closer to dense attention than renormalised top-k does."""
    q, k, v = qkv(3, n=32, d=8)
    g = torch.Generator().manual_seed(4)
    q2, k2, v2 = (x + 0.05 * torch.randn(x.shape, generator=g) for x in (q, k, v))
    errs = {}
    for reshape in (True, False):
        state = Rettention(0.1, warmup=1, reshape=reshape, block=4)
        state(lambda: state.attend(q, k, v, 0), None, step=0)
        got = state(lambda: state.attend(q2, k2, v2, 0), None, step=1)
        errs[reshape] = float((got - F.scaled_dot_product_attention(q2, k2, v2)).abs().mean())
    assert errs[True] < errs[False] / 3, errs


def test_new_run_and_new_stream_start_dense():
    state = Rettention(0.25, warmup=1, block=2)
    q, k, v = qkv(5)
    state(lambda: state.attend(q, k, v, 0), 1.0, stream=(0,))
    state(lambda: state.attend(q, k, v, 0), 0.5, stream=(0,))
    assert (state.dense_calls, state.sparse_calls) == (1, 1)
    state(lambda: state.attend(q, k, v, 0), 0.5, stream=(1,))                   # no statistics for uncond yet
    assert state.dense_calls == 2
    state(lambda: state.attend(q, k, v, 0), 1.0, stream=(0,))                   # t went up: a new image
    assert state.dense_calls == 3 and not any(key[0] == (1,) for key in state.stats)


@pytest.mark.parametrize("kwargs,match", [
    ({"keep": 0.0}, "keep=0.0"), ({"keep": 1.5}, "keep=1.5"), ({"keep": float("nan")}, "keep=nan"),
    ({"keep": True}, "keep=True"), ({"warmup": 0}, "warmup=0"), ({"warmup": 2.5}, "warmup=2.5"),
    ({"refresh": -1}, "refresh=-1"), ({"block": 0}, "block=0"), ({"reshape": "yes"}, "reshape='yes'"),
])
def test_bad_parameters_are_refused_naming_them(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        Rettention(**dict({"keep": 0.25}, **kwargs))


# ------------------------------------------------------------------------------------------- diffusers surface
@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline(0)


def _latents(pipe, steps=6):
    return pipe("a cat", num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, max_sequence_length=8,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def _processors(model):
    return dict(model.attn_processors)


def test_pipeline_keep_one_is_the_unpatched_model_and_disable_restores(sd3):
    from nimblediff.pipelines.caching import RettentionProcessor, disable_nimble_cache, enable_nimble_cache

    base, before = _latents(sd3), _processors(sd3.transformer)
    state = enable_nimble_cache(sd3, "rettention", keep=1.0, warmup=1)
    assert all(isinstance(p, RettentionProcessor) for p in sd3.transformer.attn_processors.values())
    assert torch.equal(_latents(sd3), base)
    assert state.dense_calls == 6 and state.sparse_calls == 0
    disable_nimble_cache(sd3)
    after = _processors(sd3.transformer)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_latents(sd3), base)


def test_pipeline_sparse_steps_differ_stay_finite_and_reshape_helps(sd3):
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    base = _latents(sd3)
    err = {}
    for reshape in (True, False):
        state = enable_nimble_cache(sd3, "rettention", keep=0.25, warmup=2, reshape=reshape, block=4)
        out = _latents(sd3)
        disable_nimble_cache(sd3)
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        assert state.dense_calls == 2 and state.sparse_calls == 4              # 1 layer, CFG batched
        assert state.flops_kept < 0.7
        err[reshape] = float((out - base).abs().max())
    assert err[True] < err[False], err
    # every step dense: dense attention up to the explicit-softmax rounding
    enable_nimble_cache(sd3, "rettention", keep=0.25, warmup=6)
    out = _latents(sd3)
    disable_nimble_cache(sd3)
    assert torch.allclose(out, base, atol=1e-4)


def test_dual_attention_and_qk_norm_layers():
    """SD3.5-style blocks: RMS q/k norm and a second (image-only) attention per block go through the processor."""
    from diffusers import SD3Transformer2DModel

    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = _seeded(0, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,)))
    g = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                pooled_projections=torch.randn(2, 16, generator=g))
    with torch.no_grad():
        base = [model(timestep=torch.tensor([t, t]), **args).sample for t in (900.0, 500.0)]
        state = enable_nimble_cache(model, "rettention", keep=1.0)
        same = [model(timestep=torch.tensor([t, t]), **args).sample for t in (900.0, 500.0)]
        assert state.dense_calls == 2 * 3                                    # attn, attn2, attn per call
        enable_nimble_cache(model, "rettention", keep=0.2, warmup=1, block=2)
        sparse = [model(timestep=torch.tensor([t, t]), **args).sample for t in (900.0, 500.0)]
        disable_nimble_cache(model)
    assert all(torch.equal(a, b) for a, b in zip(same, base))
    assert torch.allclose(sparse[0], base[0], atol=1e-5) and not torch.allclose(sparse[1], base[1], atol=1e-5)
    assert torch.isfinite(sparse[1]).all()


@pytest.mark.parametrize("opts,match", [
    ({"keep": 0}, "keep=0"), ({"keep": 2.0}, "keep=2.0"), ({"keep": 0.5, "warmup": 0}, "warmup=0"),
    ({"keep": 0.5, "refresh": -2}, "refresh=-2"), ({"keep": 0.5, "kep": 0.1}, "kep"),
])
def test_pipeline_bad_parameters_leave_it_unchanged(sd3, opts, match):
    from nimblediff.pipelines.caching import enable_nimble_cache

    before = _processors(sd3.transformer)
    with pytest.raises(InvalidParameterError, match=match):
        enable_nimble_cache(sd3, "rettention", **opts)
    after = _processors(sd3.transformer)
    assert all(after[n] is before[n] for n in before)
    registry = getattr(sd3.transformer, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("nimblediff_cache") is None


def test_pipeline_unknown_model_type_is_named():
    from factories import tiny_flux_pipeline

    from nimblediff.pipelines.caching import enable_nimble_cache

    flux = tiny_flux_pipeline(0)
    before = _processors(flux.transformer)
    with pytest.raises(InvalidParameterError, match="model type FluxTransformer2DModel is not supported.*SD3"):
        enable_nimble_cache(flux, "rettention", keep=0.25)
    assert all(_processors(flux.transformer)[n] is p for n, p in before.items())


# --------------------------------------------------------------------------------------------- ComfyUI surface
def wrap_attn(func):
    """comfy.ldm.modules.attention.wrap_attn's contract: an override in transformer_options gets (func, *args)."""
    def wrapper(q, k, v, heads, transformer_options=None, **kwargs):
        override = (transformer_options or {}).get("optimized_attention_override")
        if override is not None:
            return override(func, q, k, v, heads, transformer_options=transformer_options, **kwargs)
        return func(q, k, v, heads, **kwargs)
    return wrapper


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    b, _, dim = q.shape
    q, k, v = (x.view(b, -1, heads, dim // heads).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, dim)


class JointBlock(torch.nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads, self.qkv_x, self.qkv_c = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, 3 * d)

    def forward(self, context, x, c=None, transformer_options=None):
        qx, kx, vx = self.qkv_x(x).chunk(3, -1)
        qc, kc, vc = self.qkv_c(context).chunk(3, -1)
        out = attention_pytorch(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), self.heads,
                                transformer_options=transformer_options)
        n = context.shape[1]
        return context + out[:, :n], x + out[:, n:] + c[:, None, None]


class MMDiT(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(4, d), torch.nn.Linear(d, 4)
        self.joint_blocks = torch.nn.ModuleList([JointBlock(d) for _ in range(2)])
        self.register_buffer("context", torch.randn(1, 5, d, generator=torch.Generator().manual_seed(2)))

    def forward(self, x, timesteps, transformer_options=None, **_):
        h = self.proj_in(x.flatten(2).transpose(1, 2))
        ctx = self.context.expand(x.shape[0], -1, -1)
        for block in self.joint_blocks:
            ctx, h = block(ctx, h, c=timesteps.float().expand(x.shape[0]), transformer_options=transformer_options)
        return self.proj_out(h).transpose(1, 2).reshape(x.shape)


class Base(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = inner

    def apply_model(self, x, t, transformer_options=None, **c):
        return self.diffusion_model(x, t, transformer_options=transformer_options)


Patcher = fake_comfy.OptionsPatcher


SIGMAS = torch.linspace(1.0, 0.0, 7)
X = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))


def comfy_sample(patcher):
    """One call per step as calc_cond_batch makes it: model_options' transformer_options merged into c."""
    wrapper, outs, x = patcher.model_options.get("model_function_wrapper"), [], X.clone()
    for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
        c = {"transformer_options": dict(patcher.model_options["transformer_options"], sample_sigmas=SIGMAS)}
        with torch.no_grad():
            x0 = wrapper(patcher.model.apply_model, {"input": x, "timestep": s.reshape(1), "c": c,
                                                     "cond_or_uncond": [0, 1]}) if wrapper else \
                patcher.model.apply_model(x, s.reshape(1), **c)
        outs.append(x0)
        x = x0 + s_next / s * (x - x0)
    return outs


@pytest.fixture
def comfy():
    fake_comfy.install()
    from nimblediff.nodes import caching

    yield caching
    fake_comfy.uninstall()


def test_node_registered_with_tooltips():
    from nimblediff import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["NimbleDiffSparseAttention"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["NimbleDiffSparseAttention"] == "NimbleDiff Sparse Attention (Re-ttention)"
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "keep", "warmup", "refresh", "reshape"]
    assert all("tooltip" in opts for group in spec.values() for _, opts in group.values())
    assert cls.DESCRIPTION


def test_node_keep_one_is_the_unpatched_model_and_input_untouched(comfy):
    model = Patcher(Base(MMDiT()))
    (patched,) = comfy.SparseAttentionModel().patch(model, 1.0, 1)
    assert model.model_options == {"transformer_options": {}}
    assert all(torch.equal(a, b) for a, b in zip(comfy_sample(patched), comfy_sample(model)))
    state = patched.model_options["model_function_wrapper"].state
    assert state.dense_calls == 6 * 2 and state.sparse_calls == 0


def test_node_sparse_steps_are_the_core_rule_by_hand(comfy):
    """warmup 2: steps 0, 1 dense, later steps per layer alpha o^S + r from step 1's statistics; the node's result
    equals the model run with a hand-made override that calls the core functions directly (layers by call order)."""
    model = Patcher(Base(MMDiT()))
    (patched,) = comfy.SparseAttentionModel().patch(model, 0.25, 2, 0, True, 3)
    got = comfy_sample(patched)
    stats, step = {}, {"i": -1, "layer": 0}

    def hand(func, q, k, v, heads, transformer_options=None, **_):
        b = q.shape[0]
        qh, kh, vh = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        layer, step["layer"] = step["layer"], step["layer"] + 1
        if step["i"] < 2:
            o, index, alpha, r = sa.dense_with_statistics(qh, kh, vh, 0.25, 3)
            stats[layer] = index, alpha, r
        else:
            index, alpha, r = stats[layer]
            o = sa.reshape(sa.sparse_attention(qh, kh, vh, index, 3), alpha, r)
        return o.transpose(1, 2).reshape(b, -1, q.shape[-1])

    ref_model = Patcher(model.model)
    ref_model.model_options["transformer_options"]["optimized_attention_override"] = hand
    x, want = X.clone(), []
    for i, (s, s_next) in enumerate(zip(SIGMAS[:-1], SIGMAS[1:])):
        step.update(i=i, layer=0)
        with torch.no_grad():
            x0 = ref_model.model.apply_model(x, s.reshape(1), transformer_options=ref_model.model_options[
                "transformer_options"])
        want.append(x0)
        x = x0 + s_next / s * (x - x0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert not torch.allclose(got[-1], comfy_sample(model)[-1], atol=1e-4)
    state = patched.model_options["model_function_wrapper"].state
    assert (state.dense_calls, state.sparse_calls) == (4, 8)


@pytest.mark.parametrize("name", ["Flux", "UNetModel", "Linear"])
def test_node_refuses_other_model_types_naming_them(comfy, name):
    inner = torch.nn.Linear(2, 2) if name == "Linear" else type(name, (torch.nn.Module,), {})()
    model = Patcher(Base(inner))
    with pytest.raises(InvalidParameterError, match=f"model type {name} is not supported.*MMDiT"):
        comfy.SparseAttentionModel().patch(model, 0.25, 5)
    assert model.model_options == {"transformer_options": {}}


@pytest.mark.parametrize("kwargs,match", [({"keep": 0.0}, "keep=0.0"), ({"keep": 1.2}, "keep=1.2"),
                                          ({"warmup": 0}, "warmup=0"), ({"refresh": -1}, "refresh=-1"),
                                          ({"block": 0}, "block=0")])
def test_node_bad_widget_values_are_refused(comfy, kwargs, match):
    model = Patcher(Base(MMDiT()))
    with pytest.raises(InvalidParameterError, match=match):
        comfy.SparseAttentionModel().patch(model, **dict({"keep": 0.25, "warmup": 5}, **kwargs))
    assert model.model_options == {"transformer_options": {}}
