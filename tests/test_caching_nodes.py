"""nodes/caching.py with stub ComfyUI objects: a ModelPatcher with model_options and the real function-wrapper
contract (comfy/samplers.py calc_cond_batch: wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})),
and a diffusion model with ComfyUI's openaimodel UNetModel layout (input_blocks / middle_block / output_blocks,
skip connections popped from a stack). References: the unpatched model and a hand-composed shallow path."""

import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core.caching import count_calls
from nimblediff.core.caching import prune as laptop
from nimblediff.errors import AdapterMismatchError, InvalidParameterError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, h, emb=None, context=None):
        return torch.tanh(self.conv(h))


class UNetModel(torch.nn.Module):
    """ComfyUI's UNetModel control flow at toy size: hs.append after each input block, cat(h, hs.pop()) before each
    output block."""

    def __init__(self):
        super().__init__()
        self.num_res_blocks = [1, 1]
        self.input_blocks = torch.nn.ModuleList([Block(4, 8), Block(8, 8), Block(8, 8)])
        self.middle_block = Block(8, 8)
        self.output_blocks = torch.nn.ModuleList([Block(16, 8), Block(16, 8), Block(16, 8)])
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x, timesteps=None, context=None, transformer_options=None, **_):
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h)
            hs.append(h)
        h = self.middle_block(h)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1))
        return self.out(h)


class BaseModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = UNetModel()

    def apply_model(self, x, t, transformer_options=None, **c):
        return self.diffusion_model(x, t, transformer_options=transformer_options)


Patcher = fake_comfy.OptionsPatcher


def sample(patcher, sigmas, x, streams=((0, 1),)):
    """One model call per step and stream, as calc_cond_batch makes them; returns the outputs."""
    wrapper = patcher.model_options.get("model_function_wrapper")
    outs = []
    for s in sigmas[:-1]:
        for stream in streams:
            c = {"transformer_options": {"sample_sigmas": sigmas}}
            args = {"input": x, "timestep": s.reshape(1), "c": c, "cond_or_uncond": list(stream)}
            with torch.no_grad():
                outs.append(wrapper(patcher.model.apply_model, args) if wrapper else
                            patcher.model.apply_model(x, s.reshape(1), **c))
    return outs


@pytest.fixture
def comfy(tmp_path):
    fake_comfy.install(input_dir=tmp_path)       # layer-prune configs are read by name inside ComfyUI's input folder
    from nimblediff.nodes import caching

    yield caching
    fake_comfy.uninstall()


SIGMAS = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.0])
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def test_node_registered():
    from nimblediff import nodes

    assert nodes.NODE_CLASS_MAPPINGS["NimbleDiffDeepCache"].__name__ == "DeepCacheModel"
    assert "NimbleDiffSkipLayers" in nodes.NODE_CLASS_MAPPINGS


def test_interval_one_is_the_unpatched_model_and_input_model_is_untouched(comfy):
    model = Patcher(BaseModel())
    (patched,) = comfy.DeepCacheModel().patch(model, 1, 0, 0)
    assert "model_function_wrapper" not in model.model_options
    for a, b in zip(sample(patched, SIGMAS, X), sample(model, SIGMAS, X)):
        assert torch.equal(a, b)


def test_off_steps_run_only_the_shallow_path(comfy):
    model = Patcher(BaseModel())
    unet = model.model.diffusion_model
    (patched,) = comfy.DeepCacheModel().patch(model, 2, 0, 0)
    deep = ["input_blocks.1.conv", "middle_block.conv", "output_blocks.0.conv", "output_blocks.1.conv"]
    with count_calls(unet, deep + ["input_blocks.0.conv", "output_blocks.2.conv"]) as calls:
        outs = sample(patched, SIGMAS, X)
    assert all(calls[p] == 3 for p in deep)                       # steps 0, 2, 4 of 5
    assert calls["input_blocks.0.conv"] == calls["output_blocks.2.conv"] == 5
    # hand reference for step 1: the feature entering output_blocks.2 comes from step 0, the skip from now
    with torch.no_grad():
        hs, h = [], X
        for m in unet.input_blocks:
            h = m(h)
            hs.append(h)
        h = unet.middle_block(h)
        h = unet.output_blocks[1](torch.cat([unet.output_blocks[0](torch.cat([h, hs[2]], 1)), hs[1]], 1))
        ref = unet.out(unet.output_blocks[2](torch.cat([h, unet.input_blocks[0](X)], 1)))
    assert torch.equal(outs[1], ref)


def test_cond_and_uncond_calls_keep_separate_features(comfy):
    model = Patcher(BaseModel())
    (patched,) = comfy.DeepCacheModel().patch(model, 2, 0, 0)
    joint = sample(patched, SIGMAS, X)
    split = sample(patched, SIGMAS, X, streams=((0,), (1,)))
    assert all(torch.equal(a, b) for a, b in zip(joint, split[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(joint, split[1::2]))


def test_full_first_and_last_steps(comfy):
    model = Patcher(BaseModel())
    (patched,) = comfy.DeepCacheModel().patch(model, 5, 0, 0, full_first=2, full_last=2)
    with count_calls(model.model.diffusion_model, ["middle_block.conv"]) as calls:
        sample(patched, SIGMAS, X)                                 # 5 steps: 0, 1 full; 2 reuse; 3, 4 full
    assert calls["middle_block.conv"] == 4


def test_bad_input_names_the_model_type_and_leaves_it_unchanged(comfy, tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    with pytest.raises(InvalidParameterError, match="Linear"):
        comfy.DeepCacheModel().patch(Patcher(Odd()), 2, 0, 0)
    model = Patcher(BaseModel())
    with pytest.raises(InvalidParameterError, match="block=7"):
        comfy.DeepCacheModel().patch(model, 2, 7, 0)
    with pytest.raises(InvalidParameterError, match="first"):
        comfy.DeepCacheModel().patch(model, 2, 0, 0, full_first=0)
    assert "model_function_wrapper" not in model.model_options
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    path = tmp_path / "p.json"
    laptop.save_config(path, other, ["0"])
    with pytest.raises(AdapterMismatchError, match="Sequential"):
        comfy.SkipLayersModel().patch(model, path.name)
    assert "model_function_wrapper" not in model.model_options


def test_skip_layers_node_passes_the_layer_input_through(comfy, tmp_path):
    model = Patcher(BaseModel())
    unet = model.model.diffusion_model
    path = tmp_path / "p.json"
    laptop.save_config(path, unet, ["middle_block"])
    (patched,) = comfy.SkipLayersModel().patch(model, path.name)
    out = sample(patched, SIGMAS[:2], X)[0]
    with torch.no_grad():
        hs, h = [], X
        for m in unet.input_blocks:
            h = m(h)
            hs.append(h)
        for m in unet.output_blocks:                               # middle_block removed: h passes through
            h = m(torch.cat([h, hs.pop()], 1))
        assert torch.equal(out, unet.out(h))
    assert torch.equal(sample(model, SIGMAS[:2], X)[0], sample(Patcher(model.model), SIGMAS[:2], X)[0])


@pytest.mark.parametrize("name", ["../p.json", "/abs/p.json", "..\\p.json", "sub/../../p.json", "missing.json"])
def test_skip_layers_config_path_stays_inside_comfyuis_folders(tmp_path, name):
    """config_path is a name inside ComfyUI's input / output folder: '../p.json' is refused although it exists."""
    inner = tmp_path / "input"
    inner.mkdir()
    fake_comfy.install(input_dir=inner)
    try:
        from nimblediff.nodes import caching

        model = Patcher(BaseModel())
        laptop.save_config(tmp_path / "p.json", model.model.diffusion_model, ["middle_block"])
        with pytest.raises(InvalidParameterError, match="config_path="):
            caching.SkipLayersModel().patch(model, name.replace("/abs/p.json", str(tmp_path / "p.json")))
        assert "model_function_wrapper" not in model.model_options
    finally:
        fake_comfy.uninstall()


# ---------------------------------------------------------------------------------------------- first-block (DiT)
class ToyJoint(torch.nn.Module):
    """A joint block with ComfyUI's JointBlock call: (context, x, c=..., use_checkpoint, transformer_options) ->
    (context, x); the last block is pre-only on the context side and returns (None, x), as in mmdit.block_mixing."""

    def __init__(self, d, pre_only):
        super().__init__()
        self.img, self.txt, self.pre_only = torch.nn.Linear(d, d), torch.nn.Linear(d, d), pre_only

    def mix(self, context, x, c):
        x = x + torch.tanh(self.img(x) + self.txt(context).mean(1, keepdim=True) + c[:, None, None])
        context = None if self.pre_only else context + torch.tanh(self.txt(context) + x.mean(1, keepdim=True))
        return context, x

    def forward(self, context, x, c=None, use_checkpoint=False, transformer_options=None):
        return self.mix(context, x, c)


class MMDiT(torch.nn.Module):
    """ComfyUI's MMDiT control flow at toy size (the class name is what the cache's layout table matches)."""

    def __init__(self, d=8, n=4):
        super().__init__()
        self.proj_in, self.proj_out = torch.nn.Linear(4, d), torch.nn.Linear(d, 4)
        self.joint_blocks = torch.nn.ModuleList([ToyJoint(d, i == n - 1) for i in range(n)])
        self.register_buffer("context", torch.randn(1, 3, d, generator=torch.Generator().manual_seed(2)))

    def forward(self, x, timesteps, context=None, transformer_options=None, **_):
        h = self.proj_in(x.flatten(2).transpose(1, 2))                     # (B, HW, D)
        ctx, c = self.context.expand(x.shape[0], -1, -1), timesteps.float().expand(x.shape[0]) / 10
        for block in self.joint_blocks:
            ctx, h = block(ctx, h, c=c, use_checkpoint=False, transformer_options=transformer_options)
        return self.proj_out(h).transpose(1, 2).reshape(x.shape)


class DiffusersJoint(torch.nn.Module):
    """The same block with diffusers' SD3 call: (hidden_states=, encoder_hidden_states=, temb=) -> (enc, hidden)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None):
        return self.inner.mix(encoder_hidden_states, hidden_states, temb)


class SD3Transformer2DModel(torch.nn.Module):
    """The toy MMDiT's weights in diffusers' layout (transformer_blocks, keyword calls, timestep=)."""

    def __init__(self, mmdit):
        super().__init__()
        self.m = mmdit
        self.transformer_blocks = torch.nn.ModuleList([DiffusersJoint(b) for b in mmdit.joint_blocks])

    def forward(self, hidden_states, timestep=None):
        x, m = hidden_states, self.m
        h = m.proj_in(x.flatten(2).transpose(1, 2))
        ctx, c = m.context.expand(x.shape[0], -1, -1), timestep.float().expand(x.shape[0]) / 10
        for block in self.transformer_blocks:
            ctx, h = block(hidden_states=h, encoder_hidden_states=ctx, temb=c)
        return m.proj_out(h).transpose(1, 2).reshape(x.shape)


class DiTBase(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = MMDiT()

    def apply_model(self, x, t, transformer_options=None, **c):
        return self.diffusion_model(x, t, transformer_options=transformer_options)


DIT_SIGMAS = torch.linspace(1.0, 0.0, 13)
NOISE = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))


def euler(call, sigmas=DIT_SIGMAS):
    """Flow Euler on x0-predictions: x <- x0 + sigma' (x - x0) / sigma; returns every call's output."""
    x, outs = NOISE.clone(), []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            x0 = call(x, s.reshape(1))
        outs.append(x0)
        x = x0 + s_next / s * (x - x0)
    return outs


def comfy_call(patcher):
    wrapper = patcher.model_options.get("model_function_wrapper")

    def call(x, s):
        c = {"transformer_options": {"sample_sigmas": DIT_SIGMAS}}
        if wrapper is None:
            return patcher.model.apply_model(x, s, **c)
        return wrapper(patcher.model.apply_model, {"input": x, "timestep": s, "c": c, "cond_or_uncond": [0, 1]})
    return call


@pytest.mark.parametrize("options", [{}, {"warmup": 1}, {"rule": "reference"}, {"order": 1}, {"max_skip": 1}])
def test_first_block_node_decides_as_the_diffusers_side_on_the_same_weights(comfy, options):
    """The node on a ComfyUI-layout MMDiT and enable_nimble_cache on the same weights in diffusers' layout make the
    same skip decisions and the same outputs, bit for bit (one core implementation, two block call orders)."""
    pytest.importorskip("diffusers")
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = Patcher(DiTBase())
    twin = SD3Transformer2DModel(model.model.diffusion_model)
    kw = dict({"warmup": 2, "max_skip": 0, "rule": "accumulated", "order": 0}, **options)
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 0.15, **kw)
    ours = euler(comfy_call(patched))
    node_cache = patched.model_options["model_function_wrapper"].cache
    pipe_cache = enable_nimble_cache(twin, "first_block", threshold=0.15, warmup=kw["warmup"], rule=kw["rule"],
                                     max_skip=kw["max_skip"] or None, order=kw["order"])
    theirs = euler(lambda x, s: twin(x, timestep=s))
    disable_nimble_cache(twin)
    skipped = [step for step, skip in node_cache.decisions if skip]
    assert node_cache.decisions == pipe_cache.decisions and 0 < len(skipped) < 12, node_cache.decisions
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    uncached = euler(comfy_call(model))
    assert not torch.equal(ours[skipped[-1]], uncached[skipped[-1]])


def test_first_block_threshold_zero_is_the_uncached_model_and_input_untouched(comfy):
    model = Patcher(DiTBase())
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 0.0, 1)
    assert "model_function_wrapper" not in model.model_options
    ours, ref = euler(comfy_call(patched)), euler(comfy_call(model))
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    cache = patched.model_options["model_function_wrapper"].cache
    assert [s for s, _ in cache.decisions] == list(range(12)) and not any(k for _, k in cache.decisions)


def test_first_block_skipped_step_by_hand(comfy):
    """threshold 1 (never reached here), warmup 1: step 0 computes; step 1 runs block 0 and adds the residual that
    blocks 1-3 added at step 0 to block 0's new output."""
    model = Patcher(DiTBase())
    dit = model.model.diffusion_model
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 1.0, 1)
    call = comfy_call(patched)
    x0, x1 = NOISE, NOISE * 0.9
    with torch.no_grad():
        call(x0, DIT_SIGMAS[0].reshape(1))
        got = call(x1, DIT_SIGMAS[1].reshape(1))

        def head_and_rest(x, s):
            h = dit.proj_in(x.flatten(2).transpose(1, 2))
            ctx, c = dit.context.expand(2, -1, -1), s.expand(2) / 10
            ctx, h = dit.joint_blocks[0].mix(ctx, h, c)
            head = h
            for b in dit.joint_blocks[1:]:
                ctx, h = b.mix(ctx, h, c)
            return head, h
        head0, full0 = head_and_rest(x0, DIT_SIGMAS[0])
        head1, _ = head_and_rest(x1, DIT_SIGMAS[1])
        want = dit.proj_out(head1 + (full0 - head0)).transpose(1, 2).reshape(x1.shape)
    assert patched.model_options["model_function_wrapper"].cache.decisions == [(0, False), (1, True)]
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("name", ["Flux", "UNetModel", "Linear"])
def test_first_block_on_a_model_type_it_does_not_know_names_it_and_leaves_it_unchanged(comfy, name):
    base = {"UNetModel": BaseModel, "Linear": None, "Flux": None}[name]
    if base is None:
        inner = type(name, (torch.nn.Module,), {})() if name == "Flux" else torch.nn.Linear(2, 2)
        base = type("Base", (torch.nn.Module,), {})
        model = base()
        model.diffusion_model = inner
    else:
        model = base()
    patcher = Patcher(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidParameterError, match=f"model type {name} is not supported.*MMDiT"):
        comfy.FirstBlockCacheModel().patch(patcher, 0.2, 5)
    assert "model_function_wrapper" not in patcher.model_options
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [({"threshold": 1.5}, "threshold=1.5"), ({"warmup": 0}, "warmup=0"),
                                           ({"rule": "teacache"}, "rule='teacache'"), ({"order": 2}, "order=2")])
def test_first_block_bad_widget_values_are_refused(comfy, kwargs, match):
    model = Patcher(DiTBase())
    args = dict({"threshold": 0.2, "warmup": 5}, **kwargs)
    with pytest.raises(InvalidParameterError, match=match):
        comfy.FirstBlockCacheModel().patch(model, **args)
    assert "model_function_wrapper" not in model.model_options


def test_first_block_node_and_pipeline_follow_the_same_schedule_file(comfy, tmp_path):
    """One searched-schedule JSON (in ComfyUI's input folder) read by the node and by enable_nimble_cache: the same
    steps compute and the outputs are equal bit for bit; on a skipped step no block runs, the first one included."""
    pytest.importorskip("diffusers")
    from nimblediff.core.caching import CacheSchedule, search
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    model = Patcher(DiTBase())
    dit = model.model.diffusion_model
    twin = SD3Transformer2DModel(dit)
    flags = (True, True, False, False, True, False, True, False, False, True, False, True)
    search.save_schedule(tmp_path / "dit-cache.json", CacheSchedule(flags), blocks=4)
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 0.3, 1, schedule_file="dit-cache.json")
    with count_calls(dit, ["joint_blocks.0.img", "joint_blocks.3.img"]) as calls:
        ours = euler(comfy_call(patched))
    assert calls["joint_blocks.0.img"] == calls["joint_blocks.3.img"] == sum(flags)
    enable_nimble_cache(twin, "first_block", schedule=str(tmp_path / "dit-cache.json"))
    theirs = euler(lambda x, s: twin(x, timestep=s))
    disable_nimble_cache(twin)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert [not k for _, k in patched.model_options["model_function_wrapper"].cache.decisions] == list(flags)


def test_first_block_schedule_skipped_step_by_hand(comfy, tmp_path):
    """Schedule mode, step 1 skipped: the hidden input passes every block and gets the whole stack's residual of
    step 0 (blocks 0-3 output minus their input)."""
    from nimblediff.core.caching import CacheSchedule, search

    model = Patcher(DiTBase())
    dit = model.model.diffusion_model
    sigmas = DIT_SIGMAS[:3]
    search.save_schedule(tmp_path / "s.json", CacheSchedule((True, False)), blocks=4)
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 0.3, 1, schedule_file="s.json")
    wrapper = patched.model_options["model_function_wrapper"]
    x0, x1 = NOISE, NOISE * 0.9

    def call(x, s):
        c = {"transformer_options": {"sample_sigmas": sigmas}}
        return wrapper(model.model.apply_model, {"input": x, "timestep": s.reshape(1), "c": c, "cond_or_uncond": [0]})

    with torch.no_grad():
        call(x0, sigmas[0])
        got = call(x1, sigmas[1])
        h0 = dit.proj_in(x0.flatten(2).transpose(1, 2))
        ctx, h = dit.context.expand(2, -1, -1), h0
        for b in dit.joint_blocks:
            ctx, h = b.mix(ctx, h, sigmas[0].expand(2) / 10)
        h1 = dit.proj_in(x1.flatten(2).transpose(1, 2))
        want = dit.proj_out(h1 + (h - h0)).transpose(1, 2).reshape(x1.shape)
    assert torch.allclose(got, want, atol=1e-6)


def test_first_block_schedule_file_for_another_model_or_step_count_is_refused(comfy, tmp_path):
    from nimblediff.core.caching import CacheSchedule, search
    from nimblediff.errors import WeightsFormatError

    model = Patcher(DiTBase())
    search.save_schedule(tmp_path / "eight.json", CacheSchedule((True, False) * 6), blocks=8)
    with pytest.raises(WeightsFormatError, match="for 8 blocks; MMDiT has 4"):
        comfy.FirstBlockCacheModel().patch(model, 0.3, 1, schedule_file="eight.json")
    with pytest.raises(InvalidParameterError, match="schedule_file="):
        comfy.FirstBlockCacheModel().patch(model, 0.3, 1, schedule_file="../eight.json")
    assert "model_function_wrapper" not in model.model_options
    search.save_schedule(tmp_path / "five.json", CacheSchedule((True, False, True, False, True)), blocks=4)
    (patched,) = comfy.FirstBlockCacheModel().patch(model, 0.3, 1, schedule_file="five.json")
    with pytest.raises(InvalidParameterError, match="searched for 5 steps, the sampler runs 12"):
        euler(comfy_call(patched))
    assert all("forward" not in m.__dict__ for m in model.model.modules())
