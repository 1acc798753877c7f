"""Quantized model nodes (nodes/quant.py) with stub comfy modules: loading the ComfyUI-GGUF fixtures as MODEL, LoRA
through NimbleDiff's LoRA node on the quantized layers, and the quantize node.

References: the fixture file read by the gguf package (base weights), hand-written LoRA math W + s * up @ down
(factories.lora_reference) on the dequantized weights, and the file formats' own readers.
"""

import copy
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import fake_comfy  # noqa: E402

from nimblediff.core.quant.gguf_quantize import quantize_rows  # noqa: E402
from nimblediff.core.quant.gguf_weight import GGUFWeight  # noqa: E402
from nimblediff.core.quant.modules import QuantModule, quantized_modules  # noqa: E402
from nimblediff.errors import InvalidParameterError, WeightsFormatError  # noqa: E402
from nimblediff.nodes import quant as qn  # noqa: E402
from nimblediff.weights import keymaps  # noqa: E402
from nimblediff.weights.gguf_io import read_gguf, to_original  # noqa: E402

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data" / "gguf"
_spec = __import__("importlib.util").util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
mf = __import__("importlib.util").util.module_from_spec(_spec)
_spec.loader.exec_module(mf)
FIXTURE = "sd1_small-Q4_K_S.gguf"


# ------------------------------------------------------------------------------------------------- stub comfy
class Patcher(fake_comfy.FakeModelPatcher):
    """ModelPatcher's contract used here: clone shares the model; patch_weight_to_device applies a key's patches
    (float path: W + strength * delta, as comfy.lora.calculate_weight); unpatch_model restores."""

    def __init__(self, model, load_device="cpu", offload_device="cpu"):
        super().__init__(model)
        self.load_device, self.offload_device, self.backup = load_device, offload_device, {}

    def clone(self):
        c = copy.copy(self)
        c.patches = {k: list(v) for k, v in self.patches.items()}
        c.backup = {}
        return c

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        w = self.model.get_parameter(key)
        self.backup.setdefault(key, w.detach().clone())
        out = w.detach().float().clone()
        for strength, patch in self.patches[key]:
            kind, values = patch
            if kind == "diff":
                out += strength * values[0].float()
            else:
                up, down, alpha = values[0].float(), values[1].float(), values[2]
                s = strength * (1.0 if alpha is None else alpha / down.shape[0])
                out += s * (up.flatten(1) @ down.flatten(1)).reshape(out.shape)
        with torch.no_grad():
            w.copy_(out)

    def patch_model(self):
        for key in self.patches:
            self.patch_weight_to_device(key)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        with torch.no_grad():
            for key, w in self.backup.items():
                self.model.get_parameter(key).copy_(w)
        self.backup = {}


class _Holder(torch.nn.Module):
    pass


class _Net(_Holder):
    """Root of a skeleton: its forward feeds every Linear / Conv2d a random input (enough for calibration hooks)."""

    def forward(self, x, timesteps=None):
        g = torch.Generator().manual_seed(int(timesteps.flatten()[0]) if timesteps is not None else 0)
        for m in self.modules():
            if isinstance(m, torch.nn.Linear) or (isinstance(m, QuantModule) and len(m.shape) == 2):
                m(torch.randn(3, (m.in_features if isinstance(m, torch.nn.Linear) else m.shape[1]), generator=g))
            elif isinstance(m, torch.nn.Conv2d) or isinstance(m, QuantModule):
                m(torch.randn(1, m.in_channels if isinstance(m, torch.nn.Conv2d) else m.shape[1], 6, 6, generator=g))
        return x


def skeleton(shapes: dict) -> torch.nn.Module:
    """A module tree with the state dict's names: Linear for 2-D weights, Conv2d for 4-D, bare parameters else
    (what ComfyUI's model construction gives, without the forward)."""
    root = _Net()
    by_module = {}
    for key, shape in shapes.items():
        name, _, leaf = key.rpartition(".")
        by_module.setdefault(name, {})[leaf] = tuple(shape)
    for name, leaves in by_module.items():
        w = leaves.get("weight")
        if w is not None and len(w) == 2:
            m = torch.nn.Linear(w[1], w[0], bias="bias" in leaves)
        elif w is not None and len(w) == 4:
            m = torch.nn.Conv2d(w[1], w[0], w[2:], padding=w[2] // 2, bias="bias" in leaves)
        else:
            m = _Holder()
            for leaf, shape in leaves.items():
                m.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, _Holder())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], m)
    return root


def base_model(shapes: dict, unet_config: dict) -> torch.nn.Module:
    base = _Holder()
    base.diffusion_model = skeleton(shapes)
    base.model_config = types.SimpleNamespace(unet_config=unet_config)
    return base


@pytest.fixture(scope="module")
def unet():
    return mf.build_model("sd1_small")


@pytest.fixture
def comfy(tmp_path, unet):
    """Stub comfy: models/diffusion_models holds the fixtures, output/ and loras/ under tmp_path."""
    models, out, loras = tmp_path / "diffusion_models", tmp_path / "output", tmp_path / "loras"
    for d in (models, out, loras):
        d.mkdir()
    for f in DATA.glob("*.gguf"):
        (models / f.name).symlink_to(f)
    fake_comfy.install()
    fp = sys.modules["folder_paths"]
    fp.get_folder_paths = lambda kind: [str(models)] if kind in ("diffusion_models", "unet") else [str(loras)]
    fp.get_output_directory = lambda: str(out)
    fp.get_filename_list = lambda kind: sorted(p.name for p in loras.iterdir()) if kind == "loras" else []
    fp.get_full_path_or_raise = lambda kind, name: str(loras / name)
    from nimblediff.nodes.loaders import unet_config_from_diffusers

    unet_config = unet_config_from_diffusers(dict(unet.config))
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = Patcher
    sd_mod = types.ModuleType("comfy.sd")
    built = []

    def load_diffusion_model_state_dict(sd, model_options=None):
        built.append(sd)
        return Patcher(base_model({k: v.shape for k, v in sd.items()}, unet_config))

    sd_mod.load_diffusion_model_state_dict = load_diffusion_model_state_dict
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda i, total=None: None)
    sys.modules.update({"comfy.model_patcher": mp, "comfy.sd": sd_mod, "comfy.utils": utils})
    c = sys.modules["comfy"]
    c.model_patcher, c.sd, c.utils = mp, sd_mod, utils
    qn._patcher_class.cache_clear()
    yield types.SimpleNamespace(models=models, out=out, loras=loras, built=built, unet_config=unet_config)
    qn._patcher_class.cache_clear()
    for name in ("comfy.model_patcher", "comfy.sd", "comfy.utils", "comfy.sample"):
        sys.modules.pop(name, None)
    fake_comfy.uninstall()


def _load(lora_mode="branch"):
    (model,) = qn.NimbleQuantizedModelLoader().load(FIXTURE, lora_mode)
    return model


# ----------------------------------------------------------------------------------------------------- loader
def test_loader_lists_and_loads_the_comfyui_gguf_file(comfy):
    assert FIXTURE in qn.NimbleQuantizedModelLoader.INPUT_TYPES()["required"]["unet_name"][0]
    model = _load()
    dm = model.model.diffusion_model
    quant = quantized_modules(dm)
    reader = gguf.GGUFReader(str(DATA / FIXTURE))
    qnames = {t.name.rpartition(".")[0] for t in reader.tensors
              if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)}
    assert set(quant) == qnames and all(isinstance(m, qn.LAYER_CLASSES) for m in quant.values())
    # every value equals what the gguf package reads (ComfyUI-GGUF's orig_shape applied)
    sd = model.model.state_dict()
    for t in reader.tensors:
        ref = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        got = sd[f"diffusion_model.{t.name}"]
        np.testing.assert_array_equal(got.float().numpy().reshape(-1), ref.reshape(-1))
    assert type(model).__name__ == "QuantModelPatcher" and comfy.built  # built from shapes by ComfyUI


def test_loader_refuses_bad_files(comfy):
    src = (DATA / FIXTURE).read_bytes()
    (comfy.models / "cut.gguf").write_bytes(src[: len(src) // 2])
    with pytest.raises(WeightsFormatError, match="cut.gguf"):
        qn.NimbleQuantizedModelLoader().load("cut.gguf")
    assert not comfy.built
    with pytest.raises(InvalidParameterError, match="relative path"):
        qn.NimbleQuantizedModelLoader().load("../outside.gguf")
    with pytest.raises(InvalidParameterError, match="lora_mode"):
        qn.NimbleQuantizedModelLoader().load(FIXTURE, "fuse")


# ------------------------------------------------------------------------------------------ LoRA on quantized
def _lora_file(comfy, unet, name="style.safetensors"):
    from safetensors.torch import save_file

    lora = factories.random_lora({"unet": unet}, rank=2, seed=3, alpha=1.0, scale=0.3)
    save_file(factories.lora_state_dict(lora, "kohya"), str(comfy.loras / name))
    return lora


def _reference(model, lora, strength: float, base_sd: dict) -> dict:
    """{LDM module: W + strength * alpha / r * up @ down} on the loaded (dequantized) base weights."""
    layout = keymaps.UNetLayout.from_comfy_config(model.model.model_config.unet_config)
    kmap = keymaps.unet_keymap(layout)
    out = {}
    for key, (down, up, alpha) in lora.items():
        ldm = kmap.to_b(key.split(".", 1)[1])
        w = base_sd[f"diffusion_model.{ldm}.weight"]
        out[ldm] = factories.lora_reference(w.double(), down, up, alpha, strength)
    return out


@pytest.mark.parametrize("mode", ["branch", "merge"])
def test_lora_node_on_quantized_model(comfy, unet, mode):
    from nimblediff.nodes.adapters import LoRALoader

    lora = _lora_file(comfy, unet)
    model = _load(mode)
    dm = model.model.diffusion_model
    base_sd = {k: v.clone() for k, v in model.model.state_dict().items()}
    qweights = {n: m.qweight for n, m in quantized_modules(dm).items()}
    patched, _, report = LoRALoader().load(model, None, "style.safetensors", 0.8, 0.0)
    assert type(patched).__name__ == "QuantModelPatcher" and patched.lora_mode == mode
    ref = _reference(model, lora, 0.8, base_sd)
    assert set(ref) & set(qweights)            # the LoRA touches quantized layers ...
    assert set(ref) - set(qweights)            # ... and float ones
    patched.patch_model()                      # what ComfyUI does when it loads the model for sampling
    g = torch.Generator().manual_seed(0)
    for name, want in ref.items():
        layer = dm.get_submodule(name)
        if isinstance(layer, QuantModule):
            assert layer.qweight is qweights[name]          # the base blocks are untouched
            got = layer.dequantized_weight(torch.float64)
            if mode == "branch":   # exact: the LoRA runs beside the quantized weight
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                x = torch.randn(2, *(layer.shape[1:2]), *([5, 5] if len(layer.shape) == 4 else []), generator=g)
                conv = len(layer.shape) == 4
                y = F.conv2d(x, want.float(), layer.bias, layer.stride, layer.padding) if conv else \
                    F.linear(x, want.float(), layer.bias)
                torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-5)
            else:                  # merged and re-quantized: within the type's quantization error, and the LoRA
                base = base_sd[f"diffusion_model.{name}.weight"].double()   # has its effect (closer than the base)
                assert (got - want).norm() / want.norm() < 0.12, name
                assert (got - want).norm() < (base - want).norm(), name
        else:
            torch.testing.assert_close(layer.weight.double(), want, rtol=1e-5, atol=1e-6)
    patched.unpatch_model()
    for name, layer in quantized_modules(dm).items():
        assert not layer.lora and layer._merged is None and layer.qweight is qweights[name]
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, base_sd[k]), k


def test_full_difference_requantizes_one_layer_and_restores(comfy):
    model = _load()
    dm = model.model.diffusion_model
    name, layer = next((n, m) for n, m in quantized_modules(dm).items() if len(m.shape) == 2)
    base = layer.qweight
    w0 = base.dequantize()
    diff = torch.full(tuple(layer.shape), 0.01)
    p = model.clone()
    assert p.add_patches({f"diffusion_model.{name}.weight": ("diff", (diff,))}, 1.0) == \
        [f"diffusion_model.{name}.weight"]
    p.patch_model()
    assert layer.qweight is not base and layer.qweight.qtype == base.qtype
    assert (layer.qweight.dequantize() - (w0 + diff)).abs().max() < 0.1 * w0.abs().max()
    p.unpatch_model()
    assert layer.qweight is base


# ------------------------------------------------------------------------------------------------ quantizing
def _float_model(comfy):
    """A float MODEL in ComfyUI's layout (LDM names) with the fixture's source weights."""
    src = {k.removeprefix("model.diffusion_model."): v for k, v in mf.source_state_dict("sd1_small").items()}
    base = base_model({k: v.shape for k, v in src.items()}, comfy.unet_config)
    base.diffusion_model.load_state_dict(src)
    return Patcher(base), src


def test_quantize_node_gguf_q4_k_writes_llama_cpp_bytes(comfy):
    model, src = _float_model(comfy)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    qmodel, report = qn.NimbleQuantizeModel().quantize(model, "gguf_Q4_K", "q/sd1", False, 8, 5.0, 0, False)
    assert '"layers"' in report
    f = read_gguf(comfy.out / "q" / "sd1.gguf")
    assert f.arch == "sd15" and f.layout == "original" and f.file_arch == "sd1"
    for key, v in f.tensors.items():
        if isinstance(v, GGUFWeight):
            assert torch.equal(v.blocks, quantize_rows(src[key].reshape(v.stored_shape), "Q4_K"))
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())   # input untouched
    assert quantized_modules(qmodel.model.diffusion_model)
    # the saved file loads back through the loader node
    (comfy.models / "sd1.gguf").symlink_to(comfy.out / "q" / "sd1.gguf")
    (again,) = qn.NimbleQuantizedModelLoader().load("sd1.gguf")
    a = again.model.state_dict()
    for k, v in qmodel.model.state_dict().items():   # quantized: the same blocks; float ones stored as F16 / F32
        if ".qweight." not in k:
            torch.testing.assert_close(a[k].float(), v.float(), rtol=1e-3, atol=1e-6)


def test_quantize_node_nimblediff_format_round_trip(comfy):
    model, src = _float_model(comfy)
    qmodel, _ = qn.NimbleQuantizeModel().quantize(model, "int8", "q/sd1_int8", False, 8, 5.0, 0, False)
    path = comfy.out / "q" / "sd1_int8.safetensors"
    assert path.is_file()
    (comfy.models / path.name).symlink_to(path)
    (again,) = qn.NimbleQuantizedModelLoader().load(path.name)
    a, b = again.model.state_dict(), qmodel.model.state_dict()
    assert {k for k in a if ".qweight." not in k} == {k for k in b if ".qweight." not in k}
    for k in b:
        if ".qweight." not in k:
            assert torch.equal(a[k], b[k]), k
    with pytest.raises(WeightsFormatError, match="exists"):
        qn.NimbleQuantizeModel().quantize(model, "int8", "q/sd1_int8", False, 8, 5.0, 0, False)


class _OpsLinear(torch.nn.Linear):      # what ComfyUI builds its models from: comfy.ops.disable_weight_init.Linear
    pass


class _OpsConv2d(torch.nn.Conv2d):
    pass


_OpsLinear.__module__ = _OpsConv2d.__module__ = "comfy.ops"


def test_quantize_node_quantizes_comfyuis_op_layers(comfy):
    """A real ComfyUI model is made of comfy.ops subclasses, not nn.Linear / nn.Conv2d: they are quantized too (the
    node saved "no quantized layers" in a real server), and the input MODEL keeps its classes."""
    model, _ = _float_model(comfy)
    plain = {n for n, m in model.model.diffusion_model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}
    for m in model.model.diffusion_model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = _OpsLinear
        elif type(m) is torch.nn.Conv2d:
            m.__class__ = _OpsConv2d
    qmodel, _ = qn.NimbleQuantizeModel().quantize(model, "int8", "q/ops", False, 8, 5.0, 0, False)
    assert set(quantized_modules(qmodel.model.diffusion_model)) == plain
    assert all(type(m) in (_OpsLinear, _OpsConv2d) for n, m in model.model.diffusion_model.named_modules()
               if n in plain)


def test_quantize_node_calibrates_on_the_sampling_trajectory(comfy):
    model, src = _float_model(comfy)
    calls = []

    def sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=0, disable_pbar=True):
        """Stands in for KSampler: calls the model it was given once per step."""
        calls.append(patcher)
        for t in range(steps):
            patcher.model.diffusion_model(latent, torch.tensor([999 - 500 * t]))

    fake_comfy.install_sample(sample=sample, prepare_noise=lambda latent, seed: torch.zeros_like(latent))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(InvalidParameterError, match="positive, negative and latent_image"):
        qn.NimbleQuantizeModel().quantize(model, "int8", "c", True, 2, 5.0, 0, False)
    with pytest.raises(InvalidParameterError, match="GGUF types"):
        qn.NimbleQuantizeModel().quantize(model, "gguf_Q4_K", "c", True, 2, 5.0, 0, False, [], [], latent)
    qmodel, report = qn.NimbleQuantizeModel().quantize(model, "int8", "c", True, 2, 5.0, 0, False, [], [], latent)
    assert calls and calls[0].model is not model.model          # calibration sampled the copy being quantized
    assert quantized_modules(qmodel.model.diffusion_model)
    assert (comfy.out / "c.safetensors").is_file()


def test_model_arch_of_original_layouts():
    flux = to_original(mf.build_model("flux_tiny").state_dict(), "flux")
    assert qn.model_arch(skeleton({k: v.shape for k, v in flux.items()})) == "flux"
    with pytest.raises(InvalidParameterError, match="SD1.x, SDXL"):
        qn.model_arch(torch.nn.Linear(2, 2))
