"""The NimbleDiff quantized safetensors format: round trip, version check, bad files leave the model unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nimblediff.core.quant import ActQuant, quantize_model, quantized_modules
from nimblediff.errors import WeightsFormatError
from nimblediff.weights.quant_format import FORMAT_VERSION, load_quantized, save_quantized
from nimblediff.weights.safetensors_io import load_with_metadata, save_state_dict

torch.set_num_threads(1)


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(4, 32), torch.nn.Flatten(1),
                               torch.nn.Linear(32 * 4 * 4, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 16, bias=False))


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, [id(x) for x in m.modules()]


def unchanged(m, snap):
    sd, ids = snap
    now = m.state_dict()
    return [id(x) for x in m.modules()] == ids and sd.keys() == now.keys() and all(torch.equal(sd[k], now[k]) for k in sd)


@pytest.fixture
def saved(tmp_path):
    m = net()
    quantize_model(m, "int8", per_layer={"0": "int4k_g32", "5": "bfp4"})
    m[3].act_quant = ActQuant(torch.tensor([0.02]), ())  # W8A8 with a static scale
    path = save_quantized(m, tmp_path / "q.safetensors", model_class="Sequential")
    return m, path


def test_round_trip_is_exact(saved):
    m, path = saved
    target = net(seed=1)  # different float weights: everything must come from the file
    load_quantized(target, path)
    x = torch.randn(2, 4, 4, 4)
    assert torch.equal(target(x), m(x))
    assert {n: q.qweight.kind for n, q in quantized_modules(target).items()} == {"0": "int4", "3": "int8", "5": "bfp"}
    assert torch.equal(target[3].act_quant.scale, torch.tensor([0.02]))


def _rewrite(path, out, meta_fn=None, drop=None):
    sd, meta = load_with_metadata(path)
    if drop:
        sd.pop(drop)
    save_state_dict(sd, out, meta_fn(meta) if meta_fn else meta)
    return out


def test_version_mismatch_is_a_clear_error(saved, tmp_path):
    _, path = saved
    bad = _rewrite(path, tmp_path / "v2.safetensors", lambda m: {**m, "format_version": str(FORMAT_VERSION + 1)})
    target = net(seed=1)
    snap = state(target)
    with pytest.raises(WeightsFormatError, match=f"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        load_quantized(target, bad)
    assert unchanged(target, snap)


@pytest.mark.parametrize("case", ["truncated", "missing_tensor", "unknown_kind", "wrong_model", "not_ours"])
def test_bad_files_leave_the_model_unchanged(saved, tmp_path, case):
    _, path = saved
    target = net(seed=1)
    if case == "truncated":
        bad = tmp_path / "t.safetensors"
        bad.write_bytes(path.read_bytes()[:-100])
        match = "truncated|corrupt"
    elif case == "missing_tensor":
        bad, match = _rewrite(path, tmp_path / "m.safetensors", drop="0.qweight.scale"), "scale"
    elif case == "unknown_kind":
        def meta_fn(m):
            layers = json.loads(m["layers"])
            layers["3"]["kind"] = "int3_magic"
            return {**m, "layers": json.dumps(layers)}
        bad, match = _rewrite(path, tmp_path / "k.safetensors", meta_fn), "int3_magic"
    elif case == "wrong_model":
        torch.manual_seed(0)
        target = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(4, 32),
                                     torch.nn.Flatten(1), torch.nn.Linear(32 * 4 * 4, 48), torch.nn.LayerNorm(48),
                                     torch.nn.Linear(48, 16, bias=False))
        bad, match = path, "shape"
    else:
        bad, match = _rewrite(path, tmp_path / "n.safetensors", lambda m: {}), "not a NimbleDiff quantized file"
    snap = state(target)
    with pytest.raises(WeightsFormatError, match=match):
        load_quantized(target, bad)
    assert unchanged(target, snap)


def test_saving_a_float_model_is_refused(tmp_path):
    with pytest.raises(WeightsFormatError, match="no quantized layers"):
        save_quantized(net(), tmp_path / "f.safetensors")


def test_diffusers_unet_round_trip_through_the_pipeline_loader(tmp_path):
    from nimblediff.pipelines.quantized import load_quantized_unet
    from tests.factories import tiny_sd15_unet

    unet = tiny_sd15_unet()
    config = dict(unet.config)
    quantize_model(unet, "int8", exclude=("conv_in", "conv_out"))
    path = save_quantized(unet, tmp_path / "u.safetensors", model_class="UNet2DConditionModel", model_config=config)
    loaded = load_quantized_unet(path)  # config from the file
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    assert torch.equal(loaded(x, 10, encoder_hidden_states=c).sample, unet(x, 10, encoder_hidden_states=c).sample)
