"""AutoDiffusion's joint step + block search (core/caching/block_search.py) and its surfaces. References: the
unpatched model, the same model with one block's forward replaced by hand (input + residual recorded by a forward
hook), brute-force optima of an additive toy problem, random plans at equal budget, diffusers' own scheduler."""

import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core.caching import BlockPlan, BlockPlanCache, count_calls
from nimblediff.core.caching import block_search
from nimblediff.errors import InvalidParameterError, WeightsFormatError

sys.path.insert(0, str(Path(__file__).parent))
from factories import _seeded  # noqa: E402


# ------------------------------------------------------------------------------------------- tiny SD3 models
def _sd3_transformer(layers=3, seed=0):
    from diffusers import SD3Transformer2DModel

    return _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=32)).eval()


@pytest.fixture(scope="module")
def sd3():
    """A 3-block SD3 MM-DiT pipeline (the last block context_pre_only, as in NimbleDiff-Tiny-DiT)."""
    from diffusers import StableDiffusion3Pipeline

    from factories import tiny_sd3_components

    c = tiny_sd3_components(0)
    c["transformer"] = _sd3_transformer()
    pipe = StableDiffusion3Pipeline(**{k: v for k, v in c.items() if k not in ("image_encoder", "feature_extractor")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(guidance_scale=5.0, max_sequence_length=8, height=32, width=32, output_type="latent")


def _latents(pipe, steps=4, **kw):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **CALL, **kw).images


def _inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g)}


# ------------------------------------------------------------------------------------------- the runtime patch
def test_a_plan_computing_every_block_is_the_unpatched_pipeline(sd3):
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    base = _latents(sd3)
    cache = enable_nimble_cache(sd3, "block_plan", plan=BlockPlan.full(4, 3))
    out = _latents(sd3)
    disable_nimble_cache(sd3)
    assert torch.equal(out, base)
    assert cache.reused == 0 and cache.evaluated == 4 * 3
    assert [s for s, _ in cache.decisions] == [0, 1, 2, 3]
    assert torch.equal(_latents(sd3), base)                     # disabled: the model is as before


def _hand_reference(model, x, ts, skipped):
    """The transformer called at timesteps ts, block j's forward replaced by hand at the steps in skipped[j]: its
    input plus the residual (output - input, hidden and context) of the last step where it ran."""
    blocks = model.transformer_blocks
    last, outs = {}, []
    for step, t in enumerate(ts):
        saved = {}
        for j, blk in enumerate(blocks):
            if step in skipped.get(j, ()):
                r_enc, r_hid = last[j]

                def replaced(hidden_states, encoder_hidden_states=None, temb=None, joint_attention_kwargs=None,
                             r_enc=r_enc, r_hid=r_hid):
                    enc = None if r_enc is None else encoder_hidden_states + r_enc
                    return enc, hidden_states + r_hid
                saved[j] = blk.forward
                blk.forward = replaced
        hooks = []
        for j, blk in enumerate(blocks):
            if step in skipped.get(j, ()):
                continue

            def record(_m, args, kwargs, out, j=j):
                hid, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
                last[j] = (None if out[0] is None else out[0] - enc, out[1] - hid)
            hooks.append(blk.register_forward_hook(record, with_kwargs=True))
        try:
            with torch.no_grad():
                outs.append(model(**x, timestep=torch.full((2,), float(t))).sample)
        finally:
            for h in hooks:
                h.remove()
            for j, f in saved.items():
                blocks[j].forward = f
    return outs


@pytest.mark.parametrize("skipped", [{0: (1,)}, {1: (1, 2)}, {2: (2,)}, {0: (2,), 2: (1, 2)}])
def test_a_skipped_block_adds_its_last_residual_as_a_hand_built_reference(skipped):
    """Block j skipped at the listed steps: the model's output equals the same model with that block's forward
    replaced by input + its residual from the last step it ran (the context-pre-only last block included)."""
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = _sd3_transformer()
    x, ts = _inputs(), (1000.0, 700.0, 400.0)
    blocks = tuple(tuple(i not in skipped.get(j, ()) for j in range(3)) for i in range(3))
    want = _hand_reference(model, x, ts, skipped)
    cache = enable_nimble_cache(model, "block_plan", plan=BlockPlan(blocks))
    with torch.no_grad():
        got = [model(**x, timestep=torch.full((2,), t)).sample for t in ts]
    disable_nimble_cache(model)
    plain = _hand_reference(model, x, ts, {})
    for i in range(3):
        assert torch.allclose(got[i], want[i], atol=1e-6, rtol=0), (i, float((got[i] - want[i]).abs().max()))
    last = max(s for steps in skipped.values() for s in steps)
    assert not torch.allclose(got[last], plain[last], atol=1e-4)               # the skip changed the result
    assert [ran for _, ran in cache.decisions] == list(blocks)


def test_skipped_blocks_do_not_run():
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = _sd3_transformer()
    blocks = ((True,) * 3, (False, True, False), (True, False, False), (False, False, False))
    enable_nimble_cache(model, "block_plan", plan=BlockPlan(blocks))
    probes = [f"transformer_blocks.{j}.norm1.linear" for j in range(3)]
    with count_calls(model, probes) as calls, torch.no_grad():
        for t in (1000.0, 750.0, 500.0, 250.0):
            model(**_inputs(), timestep=torch.full((2,), t))
    disable_nimble_cache(model)
    assert [calls[p] for p in probes] == [sum(r[j] for r in blocks) for j in range(3)] == [2, 2, 1]


def test_bad_plans_are_refused_and_leave_the_model_unchanged(sd3, tmp_path):
    from nimblediff.pipelines.caching import enable_nimble_cache

    model = sd3.transformer
    with pytest.raises(InvalidParameterError, match="every block must compute at step 0"):
        BlockPlan(((True, False, True), (True,) * 3))
    with pytest.raises(InvalidParameterError, match="same number"):
        BlockPlan(((True,) * 3, (True, False)))
    with pytest.raises(InvalidParameterError, match="for 4 transformer blocks; SD3Transformer2DModel has 3"):
        enable_nimble_cache(sd3, "block_plan", plan=BlockPlan.full(2, 4))
    with pytest.raises(InvalidParameterError, match="takes plan= only"):
        enable_nimble_cache(sd3, "block_plan", plan=BlockPlan.full(2, 3), threshold=0.1)
    with pytest.raises(InvalidParameterError, match="sigmas: a plan of 2 steps needs 3"):
        BlockPlan.full(2, 3, sigmas=[1.0, 0.0])
    registry = getattr(model, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("nimblediff_cache") is None
    assert all("forward" not in m.__dict__ for m in model.transformer_blocks.modules())


# ------------------------------------------------------------------------------------------- JSON
def test_plan_json_round_trip_and_refusals(sd3, tmp_path):
    model = sd3.transformer
    plan = BlockPlan(((True,) * 3, (False, True, False), (True, True, False)), sigmas=(1.0, 0.6, 0.25, 0.0))
    path = tmp_path / "plan.json"
    block_search.save_plan(path, plan, model, budget=0.7)
    data = json.loads(path.read_text())
    assert data["kind"] == "block-plan" and data["model_type"] == "sd3-mmdit" and data["n_blocks"] == 3
    assert data["blocks"] == [list(r) for r in plan.blocks] and data["sigmas"] == [1.0, 0.6, 0.25, 0.0]
    assert block_search.load_plan(path, model) == plan
    # another block count, another model family, another kind of file: refused naming the file and what is valid
    BlockPlan.full(3, 8).to_json(tmp_path / "eight.json", "sd3-mmdit")
    with pytest.raises(WeightsFormatError, match=r"eight.json: block plan made for 8 transformer blocks; this model "
                                                 r"has 3 \(valid: .*n_blocks=3\)"):
        block_search.load_plan(tmp_path / "eight.json", model)
    BlockPlan.full(3, 3).to_json(tmp_path / "flux.json", "flux")
    with pytest.raises(WeightsFormatError, match="flux.json: block plan made for model_type='flux', not 'sd3-mmdit'"):
        block_search.load_plan(tmp_path / "flux.json", model)
    (tmp_path / "cache.json").write_text(json.dumps({"model_type": "dit", "kind": "dit-cache", "compute": [True]}))
    with pytest.raises(WeightsFormatError, match="cache.json: not a block plan"):
        block_search.load_plan(tmp_path / "cache.json", model)
    bad = dict(data, blocks=[[False, True, True]] + data["blocks"][1:])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(WeightsFormatError, match="bad.json: .*step 0"):
        block_search.load_plan(tmp_path / "bad.json", model)


def test_plan_sigmas_reach_the_stock_scheduler_unshifted():
    """A plan's sigmas are the model's noise levels; plan_sigmas un-shifts them so that diffusers'
    FlowMatchEulerDiscreteScheduler (which shifts what it is given) steps through exactly them."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from nimblediff.pipelines.caching import plan_sigmas

    plan = BlockPlan.full(4, 2, sigmas=(1.0, 0.9, 0.7, 0.3, 0.0))
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        pipe = SimpleNamespace(scheduler=scheduler)
        scheduler.set_timesteps(sigmas=plan_sigmas(pipe, plan))
        assert torch.allclose(scheduler.sigmas, torch.tensor(plan.sigmas), atol=1e-6), (shift, scheduler.sigmas)
    with pytest.raises(InvalidParameterError, match="no sigmas.*num_inference_steps=4"):
        plan_sigmas(pipe, BlockPlan.full(4, 2))


# ------------------------------------------------------------------------------------------- the search
def _additive(steps, n, seed):
    """A toy problem with a known optimum: each skipped (step, block) cell costs its own weight."""
    rng = random.Random(seed)
    w = {(i, j): rng.random() for i in range(1, steps) for j in range(n)}
    return w, lambda plan: sum(w[i, j] for (i, j) in w if not plan.blocks[i][j])


@pytest.mark.parametrize("seed", range(4))
def test_search_finds_the_known_optimum_of_an_additive_toy_problem(seed):
    """Each skipped cell costs a weight: the best plan at a budget computes the heaviest cells (brute force over
    every plan at that budget agrees), and the search finds it."""
    steps, n, budget = 5, 3, 0.6
    w, evaluate = _additive(steps, n, seed)
    m = block_search.budget_cells(steps, n, budget) - n
    brute = min(sum(w[c] for c in w if c not in on) for on in itertools.combinations(sorted(w), m))
    out = block_search.search_plan(evaluate, steps, n, budget, population=12, generations=20, seed=seed)
    assert out["plan"].evaluations() == m + n
    assert math.isclose(out["error"], brute, abs_tol=1e-12), (out["error"], brute)
    assert math.isclose(evaluate(out["plan"]), out["error"])
    assert out["history"] == sorted(out["history"], reverse=True)            # elitism: never worse


class _ToyDiT(torch.nn.Module):
    """Residual blocks with the diffusers joint-block call, on a flow-Euler sampler: a stand-in with real dynamics."""

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d + 1, d)

        def forward(self, hidden_states, encoder_hidden_states=None, temb=None):
            t = temb[:, None, None].expand(*hidden_states.shape[:2], 1)
            return encoder_hidden_states, hidden_states + 0.5 * torch.tanh(self.lin(torch.cat([hidden_states, t], -1)))

    def __init__(self, d=6, n=5):
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = torch.nn.ModuleList([self.Block(d) for _ in range(n)])

    def forward(self, x, timestep):
        h = x
        for b in self.transformer_blocks:
            _, h = b(hidden_states=h, encoder_hidden_states=None, temb=timestep)
        return h                                                   # the predicted x0


def _toy_sample(model, plan, x, sigmas):
    cache = BlockPlanCache(model, plan, blocks=[f"transformer_blocks.{j}" for j in range(plan.n_blocks)])
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x0 = cache(model, s, x, torch.full((len(x),), float(s)))
            x = x0 + s_next / s * (x - x0)
    return x


def test_search_beats_random_plans_at_equal_budget_on_a_toy_dit():
    """The search's plan (seeded) has lower error to the uncached result than the best of 30 random plans with the
    same number of block evaluations, by a margin (40%), and every plan it evaluated kept the budget exactly."""
    model, steps, n, budget = _ToyDiT(), 8, 5, 0.5
    sigmas = [1 - i / steps for i in range(steps)] + [0.0]
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(5))
    ref = _toy_sample(model, BlockPlan.full(steps, n), x, sigmas)
    want = block_search.budget_cells(steps, n, budget)
    seen = []

    def evaluate(plan):
        seen.append(plan)
        return block_search.latent_mse(_toy_sample(model, plan, x, sigmas), ref)

    out = block_search.search_plan(evaluate, steps, n, budget, population=10, generations=20, seed=0)
    assert all(p.evaluations() == want and all(p.blocks[0]) for p in seen) and len(seen) == out["evaluations"]
    rng = random.Random(1)
    free = [(i, j) for i in range(1, steps) for j in range(n)]
    random_errors = []
    for _ in range(30):
        on = set(rng.sample(free, want - n))
        plan = BlockPlan(((True,) * n,) + tuple(tuple((i, j) in on for j in range(n)) for i in range(1, steps)))
        random_errors.append(evaluate(plan))
    assert out["error"] < 0.6 * min(random_errors), (out["error"], min(random_errors))
    uniform = BlockPlan.from_schedule([i % 2 == 0 for i in range(steps)], n)         # the per-step plan
    assert out["error"] <= evaluate(uniform)


def test_joint_search_moves_the_sigmas_and_keeps_them_valid():
    """search_sigmas: the interior noise levels are genes too. A toy fitness that wants the middle sigma at 0.2 and
    block 1 computed at step 2: the search gets both, with sigma[0] and the final 0 fixed and the list decreasing."""
    steps, n = 3, 2
    start = (1.0, 0.66, 0.33, 0.0)

    def evaluate(plan):
        return (plan.sigmas[2] - 0.2) ** 2 + (0.0 if plan.blocks[2][1] else 1.0)

    out = block_search.search_plan(evaluate, steps, n, 0.5 + 1 / 6, population=10, generations=25, seed=0,
                                   sigmas=start, search_sigmas=True)
    sig = out["plan"].sigmas
    assert sig[0] == 1.0 and sig[-1] == 0.0 and all(a > b for a, b in zip(sig, sig[1:]))
    assert out["plan"].blocks[2][1] and abs(sig[2] - 0.2) < 0.03, out
    assert out["error"] < evaluate(BlockPlan(((True,) * 2, (True, False), (False, True)), start))


@pytest.mark.parametrize("seed", range(6))
def test_allocate_plan_is_the_brute_force_optimum(seed):
    """allocate_plan's plan has the least summed per-block staleness of every plan with that many block evaluations
    (the first `warmup` steps computing every block), enumerated by brute force."""
    from nimblediff.core.caching.search import staleness

    rng = random.Random(seed)
    steps, n = rng.randint(2, 5), rng.randint(1, 3)
    warmup = rng.randint(1, steps)
    changes = [[0.0] * n] + [[rng.random() ** 2 for _ in range(n)] for _ in range(steps - 1)]
    total = rng.randint(n * warmup, steps * n)

    def cost(cols):
        return sum(staleness([changes[i][j] for i in range(steps)], cols[j]) for j in range(n))
    per_block = [c for c in itertools.product((True, False), repeat=steps) if all(c[:warmup])]
    brute = min(cost(cols) for cols in itertools.product(per_block, repeat=n) if sum(map(sum, cols)) == total)
    plan = block_search.allocate_plan(changes, total, warmup)
    cols = [tuple(plan.blocks[i][j] for i in range(steps)) for j in range(n)]
    assert plan.evaluations() == total and all(all(plan.blocks[i]) for i in range(warmup))
    assert math.isclose(cost(cols), brute, abs_tol=1e-12), (cost(cols), brute)


def test_block_profile_measures_each_blocks_residual_change_by_hand():
    """BlockProfile's c[i][j] = mean |r_j(step i) - r_j(step i - 1)| with r_j block j's hidden output minus input,
    recorded here with plain forward hooks on an unpatched twin call."""
    from nimblediff.pipelines.caching import _CacheHook, disable_nimble_cache
    from diffusers.hooks import HookRegistry

    model = _sd3_transformer()
    ts = (1000.0, 600.0, 200.0)
    xs = [_inputs(seed) for seed in (1, 2, 3)]
    residuals = []
    hooks = [b.register_forward_hook(lambda _m, a, k, out, j=j: residuals[-1].__setitem__(
        j, out[1] - k["hidden_states"]), with_kwargs=True) for j, b in enumerate(model.transformer_blocks)]
    with torch.no_grad():
        for x, t in zip(xs, ts):
            residuals.append([None] * 3)
            model(**x, timestep=torch.full((2,), t))
    for h in hooks:
        h.remove()
    profiler = block_search.BlockProfile(model)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(profiler), "nimblediff_cache")
    with torch.no_grad():
        for x, t in zip(xs, ts):
            model(**x, timestep=torch.full((2,), t))
    disable_nimble_cache(model)
    want = [[0.0] * 3] + [[float((residuals[i][j] - residuals[i - 1][j]).abs().mean()) for j in range(3)]
                          for i in (1, 2)]
    got = profiler.profile()
    assert all(math.isclose(g, w, rel_tol=1e-6) for gr, wr in zip(got, want) for g, w in zip(gr, wr)), (got, want)


@pytest.mark.parametrize("kwargs, match", [({"budget": 0.1}, "step 0 alone"), ({"budget": 1.5}, "budget=1.5"),
                                           ({"search_sigmas": True}, "needs the starting sigmas"),
                                           ({"population": 1}, "population=1")])
def test_search_refuses_bad_input(kwargs, match):
    args = dict({"budget": 0.5}, **kwargs)
    with pytest.raises(InvalidParameterError, match=match):
        block_search.search_plan(lambda p: 0.0, 5, 3, **args)


def test_search_block_plan_on_an_sd3_pipeline(sd3, tmp_path):
    """search_block_plan: the saved plan keeps the budget and its recorded error is the latent MSE of the pipeline
    following it (recomputed here), and a per-step schedule given as init is no better than the result."""
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache, search_block_plan

    path = tmp_path / "plan.json"
    schedule = [True, False, True, False]
    out = search_block_plan(sd3, ["a cat", "a dog"], 0.5, path=path, init=[schedule], population=4, generations=2,
                            num_inference_steps=4, guidance_scale=5.0, max_sequence_length=8, height=32, width=32)
    plan = block_search.load_plan(path, sd3.transformer)
    assert plan == out["plan"] and plan.evaluations() == 6
    gens = [torch.Generator().manual_seed(7000 + i) for i in range(2)]
    ref = sd3(["a cat", "a dog"], num_inference_steps=4, generator=gens, **CALL).images

    def error(p):
        enable_nimble_cache(sd3, "block_plan", plan=p)
        gens = [torch.Generator().manual_seed(7000 + i) for i in range(2)]
        got = sd3(["a cat", "a dog"], num_inference_steps=4, generator=gens, **CALL).images
        disable_nimble_cache(sd3)
        return float(((got - ref) ** 2).mean())
    assert math.isclose(error(plan), out["error"], rel_tol=1e-6)
    assert math.isclose(out["init_errors"][0], error(BlockPlan.from_schedule(schedule, 3)), rel_tol=1e-6)
    assert len(out["init_errors"]) == 2                               # and the profile allocation
    assert out["error"] <= min(out["init_errors"]) and out["error"] > 0


def test_joint_search_on_an_sd3_pipeline_runs_the_plans_sigmas(sd3):
    """search_sigmas on a pipeline whose scheduler shifts (shift 3): the plan's sigmas are what the scheduler steps
    through when called with plan_sigmas, and the recorded error is the pipeline's latent MSE with them to the
    uncached 8-step reference."""
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache, plan_sigmas, search_block_plan

    out = search_block_plan(sd3, ["a cat"], 0.7, search_sigmas=True, reference_steps=8, population=4, generations=2,
                            num_inference_steps=3, guidance_scale=5.0, max_sequence_length=8, height=32, width=32)
    plan = out["plan"]
    assert plan.sigmas is not None and len(plan.sigmas) == 4 and plan.sigmas[0] == 1.0 and plan.sigmas[-1] == 0.0
    ref = sd3(["a cat"], num_inference_steps=8, generator=[torch.Generator().manual_seed(7000)], **CALL).images
    enable_nimble_cache(sd3, "block_plan", plan=plan)
    seen = []
    hook = sd3.transformer.register_forward_pre_hook(lambda _m, a, k: seen.append(float(k["timestep"][0])),
                                                     with_kwargs=True)
    try:
        got = sd3(["a cat"], num_inference_steps=3, sigmas=plan_sigmas(sd3, plan),
                  generator=[torch.Generator().manual_seed(7000)], **CALL).images
    finally:
        hook.remove()
        disable_nimble_cache(sd3)
    assert torch.allclose(torch.tensor(seen) / 1000, torch.tensor(plan.sigmas[:-1]), atol=1e-5), (seen, plan.sigmas)
    assert math.isclose(float(((got - ref) ** 2).mean()), out["error"], rel_tol=1e-6)


def test_cli_plan_search_writes_a_plan_the_pipeline_loads(sd3, tmp_path):
    from nimblediff import cli

    folder = tmp_path / "sd3"
    sd3.save_pretrained(folder)
    out = tmp_path / "plan.json"
    args = ["cache", "plan-search", "--model", str(folder), "--out", str(out), "--steps", "3", "--budget", "0.7",
            "--population", "3", "--generations", "1", "--size", "32", "--max-sequence-length", "8", "--threads", "1",
            "--prompt", "a cat", "-q"]
    assert cli.main(args) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "block-plan" and data["steps"] == 3 and data["n_blocks"] == 3 and data["budget"] == 0.7
    plan = block_search.load_plan(out, sd3.transformer)
    assert plan.evaluations() == round(0.7 * 9)
    assert cli.main(args) == 2                                     # exists: never overwritten without --overwrite


# ------------------------------------------------------------------------------------------- ComfyUI node (stubs)
@pytest.fixture
def comfy(tmp_path):
    import fake_comfy

    fake_comfy.install(input_dir=tmp_path)
    from nimblediff.nodes import caching

    yield caching
    fake_comfy.uninstall()


def test_node_registered():
    from nimblediff import nodes

    assert nodes.NODE_CLASS_MAPPINGS["NimbleDiffBlockPlan"].__name__ == "BlockPlanModel"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["NimbleDiffBlockPlan"] == "NimbleDiff Block Plan (DiT)"


def test_node_and_pipeline_follow_the_same_plan_file(comfy, tmp_path):
    """One plan JSON (in ComfyUI's input folder) read by the node on a ComfyUI-layout MMDiT and by
    enable_nimble_cache on the same weights in diffusers' layout: the same blocks run, outputs equal bit for bit."""
    from test_caching_nodes import SD3Transformer2DModel, DiTBase, Patcher, comfy_call, euler

    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = Patcher(DiTBase())
    dit = model.model.diffusion_model
    twin = SD3Transformer2DModel(dit)
    rng = random.Random(0)
    blocks = ((True,) * 4,) + tuple(tuple(rng.random() < 0.5 for _ in range(4)) for _ in range(11))
    plan = BlockPlan(blocks)
    block_search.save_plan(tmp_path / "plan.json", plan, dit)
    (patched, sigmas) = comfy.BlockPlanModel().patch(model, "plan.json")
    assert sigmas is None and "model_function_wrapper" not in model.model_options
    probes = [f"joint_blocks.{j}.img" for j in range(4)]
    with count_calls(dit, probes) as calls:
        ours = euler(comfy_call(patched))
    assert [calls[p] for p in probes] == [sum(r[j] for r in blocks) for j in range(4)]
    assert [ran for _, ran in patched.model_options["model_function_wrapper"].cache.decisions] == list(blocks)
    enable_nimble_cache(twin, "block_plan", plan=str(tmp_path / "plan.json"))
    theirs = euler(lambda x, s: twin(x, timestep=s))
    disable_nimble_cache(twin)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    uncached = euler(comfy_call(model))
    assert not all(torch.equal(a, b) for a, b in zip(ours, uncached))
    full = BlockPlan.full(12, 4)
    block_search.save_plan(tmp_path / "full.json", full, dit)
    (patched, _) = comfy.BlockPlanModel().patch(model, "full.json")
    assert all(torch.equal(a, b) for a, b in zip(euler(comfy_call(patched)), uncached))


def test_node_outputs_the_plans_sigmas_and_refuses_mismatches(comfy, tmp_path):
    from test_caching_nodes import DiTBase, Patcher, comfy_call, euler

    model = Patcher(DiTBase())
    dit = model.model.diffusion_model
    sig = (1.0, 0.8, 0.5, 0.0)
    block_search.save_plan(tmp_path / "three.json", BlockPlan(((True,) * 4, (True, False) * 2, (False,) * 4), sig),
                           dit)
    (patched, sigmas) = comfy.BlockPlanModel().patch(model, "three.json")
    assert torch.equal(sigmas, torch.tensor(sig))
    with pytest.raises(InvalidParameterError, match="searched for 3 steps, the sampler runs 12"):
        euler(comfy_call(patched))
    BlockPlan.full(12, 8).to_json(tmp_path / "eight.json", "sd3-mmdit")
    with pytest.raises(WeightsFormatError, match="made for 8 transformer blocks; this model has 4"):
        comfy.BlockPlanModel().patch(model, "eight.json")
    with pytest.raises(InvalidParameterError, match="plan_file="):
        comfy.BlockPlanModel().patch(model, "../eight.json")
    with pytest.raises(InvalidParameterError, match="plan_file is empty"):
        comfy.BlockPlanModel().patch(model, "")
    assert "model_function_wrapper" not in model.model_options
    assert all("forward" not in m.__dict__ for m in model.model.modules())
