"""core/caching on tiny random diffusers models. References: the DeepCache package and diffusers' own
FirstBlockCache on the same pipeline and noise (bit-identical), no-cache output, hand-constructed layers."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core.caching import BlockReuse, CacheSchedule, FirstBlockCache, count_calls, deepcache_paths
from nimblediff.core.caching import prune as laptop
from nimblediff.errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

sys.path.insert(0, str(Path(__file__).parent))
from factories import _seeded, tiny_flux_components, tiny_sd15_pipeline, tiny_sd15_unet  # noqa: E402


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15_pipeline(0, layout="sd15")       # the real 4-level SD1.5 block layout at tiny width


def _latents(pipe, steps=5, cfg=5.0):
    return pipe("a cat", num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def test_recompute_every_step_is_bit_identical_to_no_cache(sd15):
    base = _latents(sd15)
    for method, opts in [("deepcache", {"interval": 1}), ("reuse", {"paths": ["mid_block", "up_blocks.1"],
                                                                    "schedule": [True] * 5})]:
        cache = enable_nimble_cache(sd15, method, **opts)
        out = _latents(sd15)
        disable_nimble_cache(sd15)
        assert torch.equal(out, base), method
        assert cache.reused_calls == 0 and cache.full_calls == 5
    assert torch.equal(_latents(sd15), base)                      # disabled: the model is as before


@pytest.mark.parametrize("branch_id,branch", [(0, (0, 0)), (1, (0, 1)), (4, (1, 1))])
def test_deepcache_branch_matches_the_deepcache_package(sd15, branch_id, branch):
    deepcache = pytest.importorskip("DeepCache")
    helper = deepcache.DeepCacheSDHelper(pipe=sd15)
    helper.set_params(cache_interval=2, cache_branch_id=branch_id)
    helper.enable()
    try:
        theirs = _latents(sd15)
    finally:
        helper.disable()
    enable_nimble_cache(sd15, "deepcache", interval=2, branch=branch)
    ours = _latents(sd15)
    disable_nimble_cache(sd15)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, _latents(sd15))                   # reuse changed something


def test_reuse_really_skips_the_deep_blocks(sd15):
    probes = ["mid_block.resnets.0", "down_blocks.3.resnets.0", "up_blocks.3.resnets.1", "conv_in"]
    enable_nimble_cache(sd15, "deepcache", schedule=[True, False, False, True, False, False])
    with count_calls(sd15.unet, probes) as calls:
        _latents(sd15, steps=6)
    disable_nimble_cache(sd15)
    assert calls["mid_block.resnets.0"] == calls["down_blocks.3.resnets.0"] == 2     # 2 full steps of 6
    assert calls["up_blocks.3.resnets.1"] == calls["conv_in"] == 6                  # the shallow path every step


def test_block_reuse_replays_recorded_outputs_by_hand():
    """A module whose output is its call count: on off-steps the replayed value is the last full step's."""
    class Counter(torch.nn.Module):
        n = 0

        def forward(self, x):
            self.n += 1
            return x * 0 + self.n

    model = torch.nn.Sequential(Counter())
    cache = BlockReuse(model, ["0"], CacheSchedule((True, False, True, False)))
    outs = [float(cache(model, t, torch.zeros(1))) for t in (900, 600, 300, 100)]
    assert outs == [1, 1, 2, 2]
    assert float(cache(model, 950, torch.zeros(1))) == 3           # a higher timestep starts a new run


def _flux(num_single_layers=2):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    c = tiny_flux_components(0)
    c["transformer"] = _seeded(0, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=num_single_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]))
    pipe = FluxPipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    return _flux()


def _flux_latents(pipe, steps=2):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                guidance_scale=3.5, max_sequence_length=16, height=32, width=32).images


def test_first_block_cache_matches_diffusers_first_block_cache(flux):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = flux
    base = _flux_latents(pipe)
    cache = enable_nimble_cache(pipe, "first_block", threshold=0.0)
    assert torch.equal(_flux_latents(pipe), base) and cache.reused_calls == 0   # threshold 0 never skips
    cache = enable_nimble_cache(pipe, "first_block", threshold=1.0)
    with count_calls(pipe.transformer, ["single_transformer_blocks.0.attn"]) as calls:
        ours = _flux_latents(pipe)
    disable_nimble_cache(pipe)
    assert cache.reused_calls == 1 and calls["single_transformer_blocks.0.attn"] == 1
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1.0))
    theirs = _flux_latents(pipe)
    pipe.transformer.disable_cache()
    assert torch.equal(ours, theirs) and not torch.equal(ours, base)


def test_first_block_cache_accumulates_change_by_hand():
    """Blocks add constants; the head's residual changes by a known relative amount each step."""
    class Block(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, hidden_states):
            return hidden_states + self.k

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([Block(1.0), Block(2.0), Block(3.0)])

        def forward(self, x):
            for b in self.transformer_blocks:
                x = b(hidden_states=x)
            return x

    net = Net()
    cache = FirstBlockCache(net, 0.25, blocks=["transformer_blocks.0", "transformer_blocks.1",
                                               "transformer_blocks.2"])
    head = net.transformer_blocks[0]
    for t, k in zip((900, 800, 700, 600), (1.0, 1.1, 1.2, 1.3)):   # change 0.1, then 0.091 (sum 0.191), 0.083
        head.k = k
        out = cache(net, t, torch.zeros(2))
    # step 0 full, steps 1-2 skipped (sum 0.1, 0.191 < 0.25), step 3: sum 0.274 -> full
    assert (cache.full_calls, cache.reused_calls) == (2, 2)
    assert torch.allclose(out, torch.full((2,), 1.3 + 5.0))


def _flux_steps(pipe, steps):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                guidance_scale=3.5, max_sequence_length=16, height=32, width=32).images


def test_reference_rule_matches_diffusers_first_block_cache_when_it_skips(flux):
    """rule='reference' is diffusers' decision (vs the last full step's residual, no sum): same latents at a
    threshold where both full and skipped steps occur; the default accumulated rule skips less there."""
    from diffusers.hooks import FirstBlockCacheConfig

    cache = enable_nimble_cache(flux, "first_block", threshold=0.4, rule="reference")
    ours = _flux_steps(flux, 8)
    disable_nimble_cache(flux)
    flux.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.4))
    theirs = _flux_steps(flux, 8)
    flux.transformer.disable_cache()
    assert cache.full_calls >= 2 and cache.reused_calls >= 2
    assert torch.equal(ours, theirs)
    summed = enable_nimble_cache(flux, "first_block", threshold=0.4)
    _flux_steps(flux, 8)
    disable_nimble_cache(flux)
    assert summed.reused_calls < cache.reused_calls


class _Block(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, hidden_states):
        return hidden_states + self.k


class _Net(torch.nn.Module):
    """Three blocks adding constants: block 0's residual is its constant, blocks 1-2 add their sum."""

    def __init__(self, ks=(1.0, 2.0, 3.0)):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Block(k) for k in ks])

    def forward(self, x):
        for b in self.transformer_blocks:
            x = b(hidden_states=x)
        return x


_PATHS = ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]


def test_max_skip_caps_consecutive_skips_by_hand():
    net = _Net()
    cache = FirstBlockCache(net, 1.0, blocks=_PATHS, max_skip=2)        # the change never reaches 1.0
    full = []
    for t in range(900, 0, -100):                                      # 9 steps
        before = cache.full_calls
        cache(net, t, torch.zeros(2))
        full.append(cache.full_calls > before)
    assert full == [True, False, False, True, False, False, True, False, False]


def test_order_one_extrapolates_the_skipped_residual_by_hand():
    """Blocks 1-2 add 5 + 0.5 s at step s. Full steps 0 and 1 (warmup 2) record residuals 5 and 5.5; the skipped
    steps 2, 3 get the line through them: 6 and 6.5, exact. Order 0 reuses 5.5."""
    for order, want in ((0, [5.5, 5.5]), (1, [6.0, 6.5])):
        net = _Net()
        cache = FirstBlockCache(net, 1.0, blocks=_PATHS, warmup=2, order=order)
        outs = []
        for s, t in enumerate((900, 800, 700, 600)):
            net.transformer_blocks[1].k = 2.0 + 0.5 * s
            outs.append(float(cache(net, t, torch.zeros(1))))
        assert (cache.full_calls, cache.reused_calls) == (2, 2)
        assert outs[:2] == [6.0, 6.5] and [o - 1.0 for o in outs[2:]] == want, order


@pytest.fixture(scope="module")
def sd3():
    """A 3-block SD3 MM-DiT (the last block context_pre_only, as in NimbleDiff-Tiny-DiT)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from factories import tiny_sd3_components

    c = tiny_sd3_components(0)
    c["transformer"] = _seeded(0, lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=32))
    pipe = StableDiffusion3Pipeline(**{k: v for k, v in c.items() if k not in ("image_encoder", "feature_extractor")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_latents(pipe, steps=4):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                guidance_scale=5.0, max_sequence_length=8, height=32, width=32).images


@pytest.mark.parametrize("method,off,on", [
    ("first_block", {"threshold": 0.0}, {"threshold": 1.0, "warmup": 2}),
    ("reuse", {"paths": ["transformer_blocks.1.attn", "transformer_blocks.2.ff"], "interval": 1},
     {"paths": ["transformer_blocks.1.attn", "transformer_blocks.2.ff"], "interval": 2}),
])
def test_sd3_caches_skip_work_and_are_exact_when_off(sd3, method, off, on):
    """Both caches run on an SD3 transformer (CFG batched: one decision for cond and uncond): never reusing is
    bit-identical to no cache; reusing skips the named work (counted inside it) and changes the latents."""
    base = _sd3_latents(sd3)
    enable_nimble_cache(sd3, method, **off)
    assert torch.equal(_sd3_latents(sd3), base)
    cache = enable_nimble_cache(sd3, method, **on)
    probes = ["transformer_blocks.1.attn.to_q", "transformer_blocks.2.ff.net.2"]
    with count_calls(sd3.transformer, probes) as calls:
        out = _sd3_latents(sd3)
    disable_nimble_cache(sd3)
    assert cache.reused_calls >= 1 and cache.full_calls + cache.reused_calls == 4
    assert calls[probes[0]] == calls[probes[1]] == cache.full_calls < 4
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert torch.equal(_sd3_latents(sd3), base)


# ---------------------------------------------------------------------------------------------------- LAPTOP

def _unet_batches(unet, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, 16, 16, generator=g)
    ctx = torch.randn(n, 4, 8, generator=g)
    return [lambda t=t: unet(x, t, encoder_hidden_states=ctx).sample for t in (900, 500, 100)]


def test_laptop_zero_contribution_layer_scores_zero():
    unet = tiny_sd15_unet(0)
    batches = _unet_batches(unet)
    with torch.no_grad():
        unet.down_blocks[1].attentions[0].proj_out.weight.zero_()   # output = input + proj_out(...) = input
        unet.down_blocks[1].attentions[0].proj_out.bias.zero_()
    cands = laptop.candidates(unet, batches[0])
    assert "down_blocks.1.attentions.0" in cands and "up_blocks.1.resnets.0" not in cands   # 16 -> 4 channels
    scores = laptop.score_layers(unet, batches, cands)
    assert scores["down_blocks.1.attentions.0"] == 0.0
    assert all(s > 0 for p, s in scores.items() if p != "down_blocks.1.attentions.0")


def test_laptop_additivity_and_config_round_trip(tmp_path):
    unet = tiny_sd15_unet(0)
    batches = _unet_batches(unet)
    cands = laptop.candidates(unet, batches[0])
    scores = laptop.score_layers(unet, batches, cands)
    pred, meas, r = laptop.additivity(unet, batches, scores, n_sets=4, size=2)
    assert len(pred) == len(meas) == 4 and -1 <= r <= 1
    skip = laptop.choose(scores, laptop.param_costs(unet, cands), 0.3)
    path = tmp_path / "prune.json"
    laptop.save_config(path, unet, skip, scores)
    assert laptop.load_config(path, unet) == skip
    with torch.no_grad():
        base = batches[0]()
    patch = laptop.apply_pruning(unet, skip)
    with torch.no_grad():
        pruned = batches[0]()
    patch.remove()
    with torch.no_grad():
        assert torch.equal(batches[0](), base) and not torch.equal(pruned, base)
    # the measured joint effect equals removal_effect of the same set (the applied patch is the scored one)
    assert math.isclose(laptop.removal_effect(unet, batches[:1], skip),
                        float(((pruned - base) ** 2).sum() / (base ** 2).sum()), rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------- bad input

def _forwards(model):
    return {n: m.__dict__.get("forward") for n, m in model.named_modules()}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, _forwards(model)


def _same(model, before):
    weights, forwards = before
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and _forwards(model) == forwards


def test_unknown_model_type_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidParameterError, match="Sequential"):
        deepcache_paths(model)
    from diffusers import PixArtTransformer2DModel

    pix = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                   num_attention_heads=2, caption_channels=32, in_channels=4, out_channels=8,
                                   cross_attention_dim=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000)
    with pytest.raises(InvalidParameterError, match="PixArtTransformer2DModel.*supported"):
        enable_nimble_cache(pix, "first_block", threshold=0.1)
    with pytest.raises(InvalidParameterError, match="UNet2DConditionModel"):
        enable_nimble_cache(tiny_sd15_unet(0), "first_block", threshold=0.1)   # a UNet has no first block


@pytest.mark.parametrize("opts,match", [
    ({"method": "first_block", "threshold": 1.5}, "threshold=1.5"),
    ({"method": "first_block", "threshold": float("nan")}, "threshold=nan"),
    ({"method": "first_block", "threshold": -0.1}, "threshold=-0.1"),
    ({"method": "first_block", "rule": "teacache"}, "rule='teacache'"),
    ({"method": "first_block", "max_skip": 0}, "max_skip=0"),
    ({"method": "first_block", "order": 2}, "order=2"),
    ({"method": "deepcache", "interval": 0}, "interval=0"),
    ({"method": "deepcache", "interval": 2, "steps": 1}, "interval=2"),
    ({"method": "deepcache", "schedule": [False, True]}, "schedule\\[0\\]"),
    ({"method": "deepcache", "schedule": ["yes"]}, "schedule="),
    ({"method": "deepcache", "branch": (9, 0)}, "block=9"),
    ({"method": "reuse", "paths": ["up_blocks.7"]}, "up_blocks.7"),
    ({"method": "reuse", "paths": []}, "paths"),
    ({"method": "warp"}, "method='warp'"),
])
def test_bad_options_raise_and_leave_the_model_unchanged(sd15, flux, opts, match):
    model = flux.transformer if opts["method"] == "first_block" else sd15.unet
    before = _state(model)
    with pytest.raises(InvalidParameterError, match=match):
        enable_nimble_cache(model, **opts)
    assert _same(model, before)
    registry = getattr(model, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("nimblediff_cache") is None


def test_pruning_config_for_another_architecture_is_refused(tmp_path, sd15):
    small = tiny_sd15_unet(0)
    path = tmp_path / "prune.json"
    laptop.save_config(path, small, ["down_blocks.1.attentions.0"])
    before = _state(sd15.unet)
    base = _latents(sd15, steps=2)
    with pytest.raises(AdapterMismatchError, match="signature"):
        enable_nimble_cache(sd15, "prune", config=path)
    assert _same(sd15.unet, before) and torch.equal(_latents(sd15, steps=2), base)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(WeightsFormatError, match="nimblediff-layer-prune"):
        enable_nimble_cache(sd15, "prune", config=path)


def test_schedule_json_round_trip(tmp_path):
    s = CacheSchedule.edges(10, 3, first=2, last=2)
    assert s.compute == (True, True, False, False, True, False, False, True, True, True)
    s.to_json(tmp_path / "s.json", "UNet2DConditionModel")
    assert CacheSchedule.from_json(tmp_path / "s.json", "UNet2DConditionModel")[0] == s
    with pytest.raises(WeightsFormatError, match="made for"):
        CacheSchedule.from_json(tmp_path / "s.json", "FluxTransformer2DModel")


# ------------------------------------------------------------------------------------- searched DiT schedules
@pytest.mark.parametrize("seed", range(12))
def test_schedule_search_is_the_brute_force_optimum(seed):
    """The dynamic programme's schedule has the least staleness of every schedule with that many full steps (the
    first `warmup` among them), enumerated by brute force."""
    import itertools
    import random

    from nimblediff.core.caching import search

    rng = random.Random(seed)
    n = rng.randint(2, 10)
    changes = [0.0] + [rng.random() ** 2 for _ in range(n - 1)]
    warmup = rng.randint(1, n)
    k = rng.randint(warmup, n)
    got = search.search_schedule(changes, k, warmup).compute
    best = min(search.staleness(changes, f) for f in itertools.product((True, False), repeat=n)
               if sum(f) == k and all(f[:warmup]))
    assert sum(got) == k and all(got[:warmup])
    assert math.isclose(search.staleness(changes, got), best, abs_tol=1e-12)


def test_staleness_by_hand():
    from nimblediff.core.caching.search import search_schedule, staleness

    # skip steps 1, 2 after full 0 (0.1 + 0.3), full 3, skip 4 (0.5): 0.9
    assert math.isclose(staleness([0, 0.1, 0.2, 0.4, 0.5], [True, False, False, True, False]), 0.1 + 0.3 + 0.5)
    # one skip allowed: the step with the smallest change into it goes
    assert search_schedule([0, 0.5, 0.1, 0.9], 3).compute == (True, True, False, True)


@pytest.mark.parametrize("args, match", [(([0, 0.1], 3), "full_steps=3"), (([0, 0.1], 1, 2), "full_steps=1"),
                                         (([0, float("nan")], 2), "changes="), (([0, 0.1], 2, 0), "warmup=0")])
def test_schedule_search_refuses_bad_input(args, match):
    from nimblediff.core.caching.search import search_schedule

    with pytest.raises(InvalidParameterError, match=match):
        search_schedule(*args)


def test_searched_schedule_round_trip_on_an_sd3_pipeline(sd3, tmp_path):
    """search_dit_schedule profiles the uncached pipeline and saves the JSON; the pipeline then computes exactly the
    scheduled steps (no block runs on the others, the first one included) and a schedule of all steps is the
    uncached pipeline bit for bit."""
    from nimblediff.core.caching import search
    from nimblediff.pipelines.caching import search_dit_schedule

    call = dict(num_inference_steps=6, guidance_scale=5.0, max_sequence_length=8, height=32, width=32)
    path = tmp_path / "dit-cache.json"
    schedule, changes = search_dit_schedule(sd3, ["a cat", "a dog"], 3, path=path, **call)
    data = json.loads(path.read_text())
    assert data["kind"] == "dit-cache" and data["blocks"] == 3 and data["steps"] == 6 and len(changes) == 6
    assert sum(schedule.compute) == 3 and schedule.compute[0] and list(schedule.compute) == data["compute"]
    assert all(c > 0 for c in changes[1:])
    base = _latents_sd3(sd3, 6)
    cache = enable_nimble_cache(sd3, "first_block", schedule=str(path))
    probes = ["transformer_blocks.0.attn.to_q", "transformer_blocks.2.ff.net.2"]
    with count_calls(sd3.transformer, probes) as n:
        out = _latents_sd3(sd3, 6)
    assert [not k for _, k in cache.decisions] == list(schedule.compute)
    assert n[probes[0]] == n[probes[1]] == 3
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    enable_nimble_cache(sd3, "first_block", schedule=[True] * 6)
    assert torch.equal(_latents_sd3(sd3, 6), base)
    disable_nimble_cache(sd3)
    other = tmp_path / "other.json"
    search.save_schedule(other, schedule, blocks=8)
    with pytest.raises(WeightsFormatError, match="for 8 blocks.*has 3"):
        enable_nimble_cache(sd3, "first_block", schedule=str(other))


def _latents_sd3(pipe, steps):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                guidance_scale=5.0, max_sequence_length=8, height=32, width=32).images
