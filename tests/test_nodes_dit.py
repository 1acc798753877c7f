"""Adapter nodes on DiT MODELs (Flux, SD3, PixArt) in ComfyUI's own key names, against ComfyUI's LoraLoader.

The MODEL is ComfyUI-shaped (state dict ``diffusion_model.double_blocks.0.img_attn.qkv.weight`` ..., ComfyUI's
unet_config) in the stub ModelPatcher of fake_comfy.py. The reference is ComfyUI's own LoRA path on the same state dict
(tests/comfyui/comfy_lora_reference.py: its key map, reader and weight arithmetic; with COMFYUI_PATH set, ComfyUI's own
diffusers tables). LoRA files come in the three layouts people ship: diffusers/PEFT (``transformer.<diffusers
module>``), original BFL / ComfyUI (``diffusion_model.<original module>``) and kohya (``lora_unet_<original>``).
"""

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "comfyui"))
import comfy_lora_reference as ref  # noqa: E402
import fake_comfy  # noqa: E402

from nimblediff.errors import AdapterMismatchError  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402

torch.set_num_threads(1)

# ComfyUI-shaped tiny DiTs. SD3 must have hidden = 64 x depth (ComfyUI sizes SD3's fused rows so), Flux an MLP ratio
# of 4 (ComfyUI sizes linear1's MLP rows so): real models satisfy both.
CONFIGS = {
    "flux": {"image_model": "flux", "in_channels": 16, "patch_size": 2, "hidden_size": 32, "mlp_ratio": 4.0,
             "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "context_in_dim": 24, "vec_in_dim": 12},
    "sd3": {"in_channels": 4, "patch_size": 2, "depth": 2, "adm_in_channels": 24},
    "pixart": {"image_model": "pixart_alpha", "in_channels": 4, "hidden_size": 32, "depth": 2},
}


def flux_shapes(c):
    h, s = c["hidden_size"], {}
    for i in range(c["depth"]):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            s.update({f"{p}_mod.lin": (6 * h, h), f"{p}_attn.qkv": (3 * h, h), f"{p}_attn.proj": (h, h),
                      f"{p}_mlp.0": (4 * h, h), f"{p}_mlp.2": (h, 4 * h)})
            s[f"{p}_attn.norm.query_norm.scale"] = (h // c["num_heads"],)
    for i in range(c["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        s.update({f"{p}.linear1": (7 * h, h), f"{p}.linear2": (h, 5 * h), f"{p}.modulation.lin": (3 * h, h)})
    s.update({"img_in": (h, 64), "txt_in": (h, c["context_in_dim"]), "time_in.in_layer": (h, 256),
              "time_in.out_layer": (h, h), "vector_in.in_layer": (h, c["vec_in_dim"]), "vector_in.out_layer": (h, h),
              "final_layer.linear": (64, h), "final_layer.adaLN_modulation.1": (2 * h, h)})
    return s


def sd3_shapes(c):
    h, s = 64 * c["depth"], {}
    for i in range(c["depth"]):
        s.update({f"joint_blocks.{i}.x_block.{k}": v for k, v in {
            "attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.fc1": (4 * h, h), "mlp.fc2": (h, 4 * h),
            "adaLN_modulation.1": (6 * h, h)}.items()})
        last = i == c["depth"] - 1      # the last context block is pre-only: qkv and a 2 x hidden adaLN
        s.update({f"joint_blocks.{i}.context_block.{k}": v for k, v in {
            "attn.qkv": (3 * h, h), "adaLN_modulation.1": (2 * h if last else 6 * h, h),
            **({} if last else {"attn.proj": (h, h), "mlp.fc1": (4 * h, h), "mlp.fc2": (h, 4 * h)})}.items()})
    s.update({"x_embedder.proj": (h, 4, 2, 2), "context_embedder": (h, 40), "t_embedder.mlp.0": (h, 256),
              "t_embedder.mlp.2": (h, h), "y_embedder.mlp.0": (h, c["adm_in_channels"]), "y_embedder.mlp.2": (h, h),
              "final_layer.linear": (16, h), "final_layer.adaLN_modulation.1": (2 * h, h)})
    return s


def pixart_shapes(c):
    h, s = c["hidden_size"], {}
    for i in range(c["depth"]):
        s.update({f"blocks.{i}.{k}": v for k, v in {
            "attn.qkv": (3 * h, h), "attn.proj": (h, h), "cross_attn.q_linear": (h, h),
            "cross_attn.kv_linear": (2 * h, h), "cross_attn.proj": (h, h), "mlp.fc1": (4 * h, h),
            "mlp.fc2": (h, 4 * h)}.items()})
    s.update({"x_embedder.proj": (h, 4, 2, 2), "t_embedder.mlp.0": (h, 256), "t_embedder.mlp.2": (h, h),
              "t_block.1": (6 * h, h), "y_embedder.y_proj.fc1": (h, 24), "y_embedder.y_proj.fc2": (h, h),
              "csize_embedder.mlp.0": (h, 256), "csize_embedder.mlp.2": (h, h), "ar_embedder.mlp.0": (h, 256),
              "ar_embedder.mlp.2": (h, h), "final_layer.linear": (32, h)})
    return s


SHAPES = {"flux": flux_shapes, "sd3": sd3_shapes, "pixart": pixart_shapes}


def comfy_state_dict(arch: str, seed: int = 0) -> dict:
    """ComfyUI's state dict of a tiny model: weights (and biases of the linear layers), random."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in SHAPES[arch](CONFIGS[arch]).items():
        key = f"diffusion_model.{name}" + ("" if name.endswith(".scale") else ".weight")
        sd[key] = torch.randn(*shape, generator=gen) * 0.1
        if len(shape) >= 2:
            sd[f"diffusion_model.{name}.bias"] = torch.randn(shape[0], generator=gen) * 0.1
    return sd


class Patcher(fake_comfy.FakeModelPatcher):
    def clone(self):
        c = Patcher(self.model, self.model_sampling)
        c.patches = {k: list(v) for k, v in self.patches.items()}
        return c


def comfy_model(arch: str, sd: dict, model_sampling=None):
    module = types.SimpleNamespace(state_dict=lambda: sd)
    return Patcher(module, model_sampling, dict(CONFIGS[arch]))


def lora_file(arch: str, layout: str, sd: dict, seed: int = 1, rank: int = 2) -> dict:
    """A LoRA on every linear / conv of the model, ranks and alphas varying: in diffusers layout on the diffusers
    modules (each its rows of the fused ComfyUI weight, as ComfyUI's table sizes them), else on the original ones."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if layout in ("diffusers", "onetrainer"):
        table, _ = ref.diffusers_table(arch, CONFIGS[arch])
        modules = {}
        for name, (key, offset, _) in table.items():
            if key not in sd:           # a module this model does not have (the pre-only context block's MLP)
                continue
            shape = sd[key].shape
            modules[f"transformer.{name}"] = (offset[2] if offset else shape[0], *shape[1:])
    else:
        modules = {k[len("diffusion_model."):-len(".weight")]: v.shape for k, v in sd.items()
                   if k.endswith(".weight") and v.ndim >= 2}
    for i, (name, shape) in enumerate(sorted(modules.items())):
        r = 1 + (i + seed) % rank
        alpha = [None, 1.0, 3.0][i % 3]
        down = torch.randn(r, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.3
        if layout == "diffusers":
            n, d, u = name, "lora_A.weight", "lora_B.weight"
        elif layout == "onetrainer":   # diffusers module names, kohya spelling (SD3 / Flux in ComfyUI's key map)
            n, d, u = "lora_transformer_" + name[len("transformer."):].replace(".", "_"), "lora_down.weight", \
                "lora_up.weight"
        elif layout == "bfl":
            n, d, u = f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"
        else:
            n, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        out[f"{n}.{d}"], out[f"{n}.{u}"] = down, up
        if alpha is not None:
            out[f"{n}.alpha"] = torch.tensor(alpha)
    return out


def comfyui_result(arch: str, sd: dict, lora: dict, strength=1.0) -> tuple[dict, int]:
    key_map = ref.lora_key_map(arch, CONFIGS[arch], sd)
    patches = ref.load_lora(lora, key_map)
    return ref.patched_weights(sd, patches, strength), len(patches)


@pytest.fixture
def comfy(tmp_path):
    files = {"(none)": ""}          # non-empty: fake_comfy.install keeps this very dict, so added files are found

    def add(name, sd):
        files[name] = str(save_state_dict(sd, tmp_path / name))
        return name

    fake_comfy.install(files)
    yield add
    fake_comfy.uninstall()


def max_diff(a: dict, b: dict, keys) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "kohya"])
@pytest.mark.parametrize("arch", ["flux", "sd3", "pixart"])
def test_lora_loader_equals_comfyui_loraloader(comfy, arch, layout):
    from nimblediff.nodes.adapters import LoRALoader

    sd = comfy_state_dict(arch)
    lora = lora_file(arch, layout, sd)
    name = comfy(f"{arch}_{layout}.safetensors", lora)
    model = comfy_model(arch, sd)
    new_model, clip, report = LoRALoader().load(model, None, name, 0.7, 1.0)
    expected, n = comfyui_result(arch, sd, lora, 0.7)
    assert model.patches == {} and clip is None                   # the input MODEL is never patched
    ours = new_model.patched_state_dict()
    changed = [k for k in sd if not torch.equal(expected[k], sd[k].float())]
    modules = {k.rsplit(".", 2)[0] for k in lora if not k.endswith(".alpha")}
    assert n == len(modules) and len(changed) > 10, (n, len(modules), len(changed))   # ComfyUI applies every module
    assert max_diff(ours, expected, sd) <= 1e-5
    assert "unmatched" not in report or layout == "diffusers", report


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_onetrainer_names_equal_comfyui(comfy, arch):
    from nimblediff.nodes.adapters import LoRALoader

    sd = comfy_state_dict(arch)
    lora = lora_file(arch, "onetrainer", sd)
    new_model, _, _ = LoRALoader().load(comfy_model(arch, sd), None, comfy("ot.safetensors", lora), 1.0, 1.0)
    expected, n = comfyui_result(arch, sd, lora)
    assert n == len({k.rsplit(".", 2)[0] for k in lora if not k.endswith(".alpha")})
    assert max_diff(new_model.patched_state_dict(), expected, sd) <= 1e-5


def test_stack_and_block_weights_on_flux_double_and_single(comfy):
    """Stack (two LoRAs) equals the two applied one after another; block weights scale ComfyUI's double_blocks /
    single_blocks weights (the reference: ComfyUI's patches with the strength of the block of their key)."""
    from nimblediff.nodes import adapter_ops as ops

    sd = comfy_state_dict("flux")
    a, b = lora_file("flux", "bfl", sd, seed=1), lora_file("flux", "diffusers", sd, seed=2)
    na, nb = comfy("a.safetensors", a), comfy("b.safetensors", b)
    model = comfy_model("flux", sd)
    slots = dict(lora_1=na, strength_model_1=1.0, strength_clip_1=1.0, lora_2="None", strength_model_2=1.0,
                 strength_clip_2=1.0, lora_3=nb, strength_model_3=0.5, strength_clip_3=1.0, lora_4="None",
                 strength_model_4=1.0, strength_clip_4=1.0)
    stacked, _, report = ops.LoRAStack().apply(model, None, **slots)
    key_map = ref.lora_key_map("flux", CONFIGS["flux"], sd)
    both = ref.patched_weights(ref.patched_weights(sd, ref.load_lora(a, key_map), 1.0), ref.load_lora(b, key_map), 0.5)
    assert max_diff(stacked.patched_state_dict(), both, sd) <= 1e-5

    blocked, _, report = ops.LoRABlockWeights().apply(model, None, na, 0.8, 1.0, dit_double=0.5, dit_single=0.0,
                                                      blocks="double.1=2")
    expected = {k: v.clone().float() for k, v in sd.items()}
    for patch in ref.load_lora(a, key_map):
        key = patch[0][0]
        w = 2.0 if ".double_blocks.1." in key else 0.5 if ".double_blocks." in key else \
            0.0 if ".single_blocks." in key else 1.0
        expected = ref.patched_weights(expected, [patch], 0.8 * w)
    assert max_diff(blocked.patched_state_dict(), expected, sd) <= 1e-5
    assert "double: " in report and "single: " in report


def test_acceleration_lora_flash_sd3_recipe(comfy):
    """The Flash SD3 recipe on an SD3 MODEL: the patched weights of ComfyUI's loader, and the recipe's LCM sampler on
    flow sigmas from the model's own shift (ComfyUI's ModelSamplingDiscreteFlow, shift 3)."""
    from nimblediff.core.schedules import flow_sigmas
    from nimblediff.nodes.adapters import AccelerationLoRA

    sd = comfy_state_dict("sd3")
    lora = lora_file("sd3", "diffusers", sd)
    name = comfy("flash.safetensors", lora)
    sampling = fake_comfy.CONST()
    sampling.shift = 3.0
    model = comfy_model("sd3", sd, sampling)
    new_model, _, sampler, sigmas, cfg, text = AccelerationLoRA().load(model, None, name, "flash-sd3", 1.0, 1.0, 4)
    expected, _ = comfyui_result("sd3", sd, lora)
    assert max_diff(new_model.patched_state_dict(), expected, sd) <= 1e-5
    torch.testing.assert_close(sigmas, flow_sigmas(4, 3.0))
    assert cfg == 1.0 and "flash-sd3" in text


def test_pixart_flash_recipe_keys_from_peft_script(comfy):
    """Flash PixArt ships PEFT keys with the old script's prefix (unet.base_model.model.<diffusers module>)."""
    from nimblediff.nodes.adapters import LoRALoader

    sd = comfy_state_dict("pixart")
    lora = lora_file("pixart", "diffusers", sd)
    ours_file = {k.replace("transformer.", "unet.base_model.model.", 1): v for k, v in lora.items()}
    name = comfy("flash_pixart.safetensors", ours_file)
    new_model, _, _ = LoRALoader().load(comfy_model("pixart", sd), None, name, 1.0, 1.0)
    expected, _ = comfyui_result("pixart", sd, lora)
    assert max_diff(new_model.patched_state_dict(), expected, sd) <= 1e-5


# -------------------------------------------------------------------------------------------------- bad input
def _unet_lora() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
            torch.randn(2, 768, generator=g),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
            torch.randn(640, 2, generator=g)}


@pytest.mark.parametrize("arch", ["flux", "sd3", "pixart"])
def test_unet_lora_on_dit_names_both_and_leaves_model(comfy, arch):
    from nimblediff.nodes.adapters import LoRALoader

    model = comfy_model(arch, comfy_state_dict(arch))
    name = comfy("unet.safetensors", _unet_lora())
    with pytest.raises(AdapterMismatchError, match=rf"(?s)sd15.*{arch}"):
        LoRALoader().load(model, None, name, 1.0, 1.0)
    assert model.patches == {}


def test_dit_lora_on_unet_names_both(comfy):
    from nimblediff.nodes.adapters import LoRALoader

    sys.path.insert(0, str(Path(__file__).parent))
    from test_adapter_nodes import UNET_CONFIG

    unet_sd = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 8)}
    model = Patcher(types.SimpleNamespace(state_dict=lambda: unet_sd), None, dict(UNET_CONFIG))
    name = comfy("flux.safetensors", lora_file("flux", "bfl", comfy_state_dict("flux")))
    with pytest.raises(AdapterMismatchError, match=r"(?s)flux.*sd15"):
        LoRALoader().load(model, None, name, 1.0, 1.0)
    assert model.patches == {}


@pytest.mark.parametrize("layout", ["bfl", "kohya", "diffusers"])
def test_flux_lora_on_sd3_names_both(comfy, layout):
    from nimblediff.nodes import adapter_ops as ops

    model = comfy_model("sd3", comfy_state_dict("sd3"))
    name = comfy("flux.safetensors", lora_file("flux", layout, comfy_state_dict("flux")))
    with pytest.raises(AdapterMismatchError, match=r"(?s)flux.*sd3"):
        ops.LoRAStack().apply(model, None, lora_1=name, strength_model_1=1.0, strength_clip_1=1.0)
    assert model.patches == {}


# ---------------------------------------------------------------------------------------------- flow sampling
class ModelSamplingFlux(fake_comfy.CONST):
    """ComfyUI's Flux model_sampling keeps mu in `shift` (ModelSamplingFlux + CONST)."""

    def __init__(self, mu):
        self.shift = mu


@pytest.fixture
def flux_sampling(comfy):
    sys.modules["comfy.model_sampling"].ModelSamplingFlux = ModelSamplingFlux
    return ModelSamplingFlux


def diffusers_flux_sigmas(steps, width, height):
    """diffusers' Flux grid: FluxPipeline's linspace, dynamically shifted by calculate_shift(image_seq_len)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift((width // 16) * (height // 16), 256, 4096, 0.5, 1.15)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return s.sigmas


@pytest.mark.parametrize("width,height", [(1024, 1024), (512, 768)])
def test_flow_schedule_flux_shift_equals_diffusers(flux_sampling, width, height):
    from nimblediff.nodes.sampling import FlowSchedule, flux_mu

    model = comfy_model("flux", comfy_state_dict("flux"), flux_sampling(0.0))
    ours, = FlowSchedule().build(model, "trailing", 4, "flux", 3.0, width, height, 0.5, 1.15)
    torch.testing.assert_close(ours, diffusers_flux_sigmas(4, width, height), rtol=0, atol=1e-6)
    # the same from the MODEL after ComfyUI's ModelSamplingFlux node set mu for that size
    model = comfy_model("flux", comfy_state_dict("flux"), flux_sampling(flux_mu(width, height)))
    from_model, = FlowSchedule().build(model, "trailing", 4, "model", 3.0, 64, 64, 0.5, 1.15)
    torch.testing.assert_close(from_model, ours, rtol=0, atol=1e-6)


def test_flow_schedule_sd3_shift_equals_flowmatch_euler(comfy):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nimblediff.nodes.sampling import FewStepSchedule, FlowSchedule

    sampling = fake_comfy.CONST()
    sampling.shift = 3.0
    model = comfy_model("sd3", comfy_state_dict("sd3"), sampling)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock.set_timesteps(5)
    for sigmas in (FlowSchedule().build(model, "flowmatch", 5, "sd3", 3.0, 1024, 1024, 0.5, 1.15)[0],
                   FlowSchedule().build(model, "flowmatch", 5, "model", 1.0, 1024, 1024, 0.5, 1.15)[0],
                   FewStepSchedule().build(model, "flowmatch", 5, 1.0)[0]):     # a DiT MODEL is not refused
        torch.testing.assert_close(sigmas, stock.sigmas, rtol=0, atol=1e-6)


def test_flux_sampling_with_our_sampler_matches_flowmatch_euler(flux_sampling):
    """Our euler SAMPLER (KSAMPLER function) on a Flux MODEL's flow parameterization, on the Flux SIGMAS, equals
    diffusers' FlowMatchEulerDiscreteScheduler stepping the same velocity model."""
    from nimblediff.nodes.sampling import FlowSchedule, flux_mu, make_sampler

    mu = flux_mu(512, 512)
    sampling = flux_sampling(mu)
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def velocity(x, sigma):            # a flow model whose data is `target`: v = (x - target) / sigma
        return (x - target) / sigma.reshape(-1, 1, 1, 1) - target

    denoiser = lambda x, sigma: x - sigma.reshape(-1, 1, 1, 1) * velocity(x, sigma)  # noqa: E731
    model = comfy_model("flux", comfy_state_dict("flux"), sampling)
    sigmas, = FlowSchedule().build(model, "trailing", 4, "model", 0.0, 512, 512, 0.5, 1.15)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ksampler = make_sampler("euler")
    ours = ksampler.sampler_function(fake_comfy.GuidedModel(denoiser, sampling), x0.clone(), sigmas)
    stock_sigmas = diffusers_flux_sigmas(4, 512, 512)
    x = x0.clone()
    for s, s_next in zip(stock_sigmas[:-1], stock_sigmas[1:]):
        x = x + (s_next - s) * velocity(x, s.reshape(1))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_flow_schedule_refuses_vp_model_and_unpatchifiable_size(comfy, flux_sampling):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FlowSchedule

    vp = comfy_model("flux", comfy_state_dict("flux"), fake_comfy.EPS(torch.linspace(0.03, 14.6, 1000)))
    with pytest.raises(InvalidParameterError, match="not a flow"):
        FlowSchedule().build(vp, "trailing", 4, "model", 3.0, 1024, 1024, 0.5, 1.15)
    flux = comfy_model("flux", comfy_state_dict("flux"), flux_sampling(1.15))
    with pytest.raises(InvalidParameterError, match=r"width=1000.*multiple of 16.*992 or 1008"):
        FlowSchedule().build(flux, "trailing", 4, "flux", 3.0, 1000, 1024, 0.5, 1.15)


def test_loha_on_fused_and_swapped_flux_weights_hand_math(comfy):
    """A LyCORIS LoHa on Flux's fused qkv and on the final adaLN (BFL names): read onto the diffusers modules (split,
    rows swapped), then one dense patch per ComfyUI weight, which must be the file's own difference on the original
    rows: W + s * alpha / r * (w1a w1b) * (w2a w2b), worked by hand."""
    from nimblediff.nodes.adapters import LoRALoader

    sd = comfy_state_dict("flux")
    g = torch.Generator().manual_seed(9)
    lora, expected = {}, {k: v.clone().float() for k, v in sd.items()}
    for name in ("double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1", "single_blocks.1.linear1"):
        w = sd[f"diffusion_model.{name}.weight"]
        parts = {"hada_w1_a": torch.randn(w.shape[0], 2, generator=g),
                 "hada_w1_b": torch.randn(2, w.shape[1], generator=g),
                 "hada_w2_a": torch.randn(w.shape[0], 2, generator=g),
                 "hada_w2_b": torch.randn(2, w.shape[1], generator=g)}
        lora.update({f"diffusion_model.{name}.{k}": v * 0.3 for k, v in parts.items()})
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(3.0)
        p = {k: v * 0.3 for k, v in parts.items()}
        dw = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 1.5
        expected[f"diffusion_model.{name}.weight"] += 0.6 * dw
    name = comfy("loha.safetensors", lora)
    new_model, _, report = LoRALoader().load(comfy_model("flux", sd), None, name, 0.6, 1.0)
    assert "LoHa" in report and max_diff(new_model.patched_state_dict(), expected, sd) <= 1e-5


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_extract_from_dit_models_round_trips_through_comfyui(comfy, tmp_path, arch):
    """LoRA Extract on two DiT MODELs (base, base + a LoRA of rank <= 2): the file it writes (diffusers names, peft
    layout), loaded by ComfyUI's LoraLoader (the reference) onto the base, gives the tuned weights back."""
    from safetensors.torch import load_file

    from nimblediff.nodes import adapter_ops as ops
    from nimblediff.nodes.adapters import LoRALoader

    class Extractable(Patcher):
        def clone(self):
            c = Extractable(self.model, self.model_sampling)
            c.patches = {k: list(v) for k, v in self.patches.items()}
            return c

        def model_state_dict(self, filter_prefix=None):
            return {k: v for k, v in self.patched_state_dict().items() if k.startswith(filter_prefix or "")}

    sd = comfy_state_dict(arch)
    lora = lora_file(arch, "bfl", sd)
    base = Extractable(types.SimpleNamespace(state_dict=lambda: sd), None, dict(CONFIGS[arch]))
    tuned, _, _ = LoRALoader().load(base, None, comfy("tuned.safetensors", lora), 1.0, 1.0)
    mm = sys.modules["comfy.model_management"]
    mm.load_models_gpu = lambda models, force_patch_weights=False: None
    sys.modules["folder_paths"].get_folder_paths = lambda kind: [str(tmp_path)]
    report, = ops.LoRAExtract().extract(tuned, base, 4, "none", 0.9, 1.0, 0.0, "extracted", "peft", "fp32", False)
    extracted = load_file(str(tmp_path / "extracted.safetensors"))
    assert all(k.startswith("transformer.") for k in extracted), list(extracted)[:3]
    want = tuned.patched_state_dict()
    got, _ = comfyui_result(arch, sd, extracted)
    assert max_diff(got, want, sd) <= 1e-4


def test_acceleration_recipe_for_another_family_is_refused(comfy):
    from nimblediff.nodes.adapters import AccelerationLoRA

    sd = comfy_state_dict("flux")
    model = comfy_model("flux", sd, fake_comfy.CONST())
    name = comfy("flux.safetensors", lora_file("flux", "bfl", sd))
    for recipe in ("flash-sd3", "flash-sd15"):
        with pytest.raises(AdapterMismatchError, match=rf"{recipe}.*flux"):
            AccelerationLoRA().load(model, None, name, recipe, 1.0, 1.0, 4)
    assert model.patches == {}
