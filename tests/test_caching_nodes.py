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


class Patcher(fake_comfy.FakeModelPatcher):
    def __init__(self, module):
        super().__init__(module)
        self.model_options = {"transformer_options": {}}

    def clone(self):
        c = Patcher(self.model)
        c.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        return c

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


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
