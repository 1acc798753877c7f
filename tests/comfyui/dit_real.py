"""Run under ComfyUI's interpreter: tiny Flux / SD3 / PixArt MODELs built in ComfyUI's own classes
(comfy.supported_models -> comfy.model_base -> ModelPatcher), LoRA files in diffusers, BFL and kohya names, and our
LoRA loader (nodes/adapters.load_lora) against ComfyUI's LoraLoader (comfy.sd.load_lora_for_models). Both patched
MODELs are patched by ComfyUI itself (ModelPatcher.patch_model) and their weights compared; a Flux MODEL's flow
schedule from our node is compared with diffusers' Flux grid.

    python tests/comfyui/dit_real.py <comfyui checkout> <pack root> <scratch folder>   # prints one JSON line
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# ComfyUI's own sizes for tiny models: SD3's hidden size is 64 x depth; axes_dim sums to Flux's head width
CONFIGS = {
    "flux": {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 12,
             "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
             "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
             "guidance_embed": False},
    "sd3": {"in_channels": 4, "patch_size": 2, "out_channels": 4, "depth": 2, "input_size": None,
            "adm_in_channels": 24, "pos_embed_max_size": 8, "num_patches": 64, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 40,
                                                                                 "out_features": 128}},
            "x_block_self_attn_layers": []},
    "pixart": {"image_model": "pixart_alpha", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
               "depth": 2, "num_heads": 2, "caption_channels": 24, "model_max_length": 8, "micro_condition": True,
               "pred_sigma": True, "learn_sigma": True},
}


def build(arch: str):
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm

    cls = {"flux": sm.Flux, "sd3": sm.SD3, "pixart": sm.PixArtAlpha}[arch]
    config = cls(dict(CONFIGS[arch]))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(weights)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def lora_files(arch: str, patcher, folder: Path) -> dict:
    """{layout: path}: one LoRA per layout on every linear / conv weight, ranks and alphas varying."""
    import torch
    import comfy.utils
    from safetensors.torch import save_file

    sd = patcher.model.state_dict()
    weights = {k: v for k, v in sd.items() if k.startswith("diffusion_model.") and k.endswith(".weight")
               and v.ndim in (2, 4)}
    table = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers,
             "pixart": comfy.utils.pixart_to_diffusers}[arch](patcher.model.model_config.unet_config,
                                                                 output_prefix="diffusion_model.")
    out = {}
    for layout in ("diffusers", "bfl", "kohya"):
        modules = {}
        if layout == "diffusers":
            for name, target in table.items():
                if not name.endswith(".weight"):
                    continue
                key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
                if key in weights:
                    shape = weights[key].shape
                    modules["transformer." + name[:-len(".weight")]] = (offset[2] if offset else shape[0],
                                                                       *shape[1:])
        else:
            modules = {k[len("diffusion_model."):-len(".weight")]: tuple(v.shape) for k, v in weights.items()}
        gen = torch.Generator().manual_seed(len(layout))
        lora = {}
        for i, (name, shape) in enumerate(sorted(modules.items())):
            r, alpha = 1 + i % 2, [None, 1.0, 3.0][i % 3]   # alpha 3: not a power of 2, so rounding shows
            down = torch.randn(r, *shape[1:], generator=gen) * 0.3
            up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.3
            n, d, u = {"diffusers": (name, "lora_A.weight", "lora_B.weight"),
                       "bfl": (f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"),
                       "kohya": ("lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight")}[layout]
            lora[f"{n}.{d}"], lora[f"{n}.{u}"] = down.contiguous(), up.contiguous()
            if alpha is not None:
                lora[f"{n}.alpha"] = torch.tensor(alpha)
        path = folder / f"{arch}_{layout}.safetensors"
        save_file(lora, str(path))
        out[layout] = path
    return out


def patched(patcher) -> dict:
    """The weights ComfyUI computes for a patched MODEL (its own patch_model), then unpatched."""
    patcher.patch_model(force_patch_weights=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def compare(arch: str, folder: Path) -> dict:
    import comfy.sd
    import comfy.utils
    from nimblediff.nodes.adapters import load_lora

    base = build(arch)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    out = {}
    for layout, path in lora_files(arch, base, folder).items():
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        theirs, _ = comfy.sd.load_lora_for_models(base, None, lora, 0.7, 0.0)
        ours, _, report = load_lora(base, None, str(path), 0.7, 1.0)
        a, b = patched(theirs), patched(ours)
        changed = sum(not a[k].equal(before[k]) for k in a)
        ours_changed = sum(not b[k].equal(before[k]) for k in b)
        out[f"{arch}/{layout}"] = {"max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
                                   "weights_changed": changed, "ours_changed": ours_changed,
                                   "largest_change": max(float((a[k] - before[k]).abs().max()) for k in a),
                                   "unmatched": len(report.unmatched),
                                   "input_untouched": all(v.equal(before[k]) for k, v in base.model.state_dict()
                                                          .items()) and not base.patches}
    return out


def flux_schedule() -> dict:
    """Our Flow Schedule node on a Flux MODEL after ComfyUI's ModelSamplingFlux(width, height) vs diffusers."""
    import numpy as np
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from nimblediff.nodes.sampling import FlowSchedule

    model = ModelSamplingFlux().patch(build("flux"), 1.15, 0.5, 768, 512)[0]
    ours = FlowSchedule().build(model, "trailing", 4, "model", 1.0, 64, 64, 0.5, 1.15)[0]
    stock = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    stock.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(48 * 32, 256, 4096, 0.5, 1.15))
    return {"flux_schedule_max_abs_diff": float((ours - stock.sigmas).abs().max()),
            "model_sampling": type(model.get_model_object("model_sampling")).__mro__[1].__name__,
            "torch": torch.__version__}


def flux_sampling() -> dict:
    """SamplerCustom on a tiny Flux MODEL with our euler SAMPLER and our Flow Schedule SIGMAS vs ComfyUI's own euler
    sampler on the same sigmas (a deterministic ODE: the two must agree), with a LoRA of ours on the MODEL."""
    import torch
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from nimblediff.nodes.sampling import FlowSchedule, make_sampler

    model = ModelSamplingFlux().patch(build("flux"), 1.15, 0.5, 64, 64)[0]
    sigmas = FlowSchedule().build(model, "trailing", 4, "model", 1.0, 64, 64, 0.5, 1.15)[0]
    gen = torch.Generator().manual_seed(1)
    cfg = CONFIGS["flux"]
    cond = [[torch.randn(1, 5, cfg["context_in_dim"], generator=gen),
             {"pooled_output": torch.randn(1, cfg["vec_in_dim"], generator=gen)}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(1, 16, 8, 8, generator=gen)
    out = {}
    for name, sampler in (("ours", make_sampler("euler")), ("comfy", comfy.samplers.ksampler("euler"))):
        out[name] = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=0)
    return {"flux_euler_max_abs_diff": float((out["ours"] - out["comfy"]).abs().max()),
            "flux_euler_output_std": float(out["comfy"].std())}


def nodes_on_real_models(folder: Path) -> dict:
    """The Block Weights and Acceleration LoRA nodes through ComfyUI's folder_paths on real MODELs:
    1. Flux block weights (double 0.5, double.1 = 2, single 0) vs ComfyUI's LoraLoader on a file whose up factors
       were scaled per block by hand;
    2. Flash SD3 recipe: our LCM SAMPLER and SIGMAS on the patched SD3 MODEL vs ComfyUI's own lcm sampler."""
    import torch
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import folder_paths
    from nimblediff.nodes.adapter_ops import LoRABlockWeights
    from nimblediff.nodes.adapters import AccelerationLoRA

    folder_paths.add_model_folder_path("loras", str(folder))
    out = {}
    flux = build("flux")
    path = lora_files("flux", flux, folder)["bfl"]
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    scaled = {}
    for k, v in lora.items():
        w = 2.0 if ".double_blocks.1." in k else 0.5 if ".double_blocks." in k else 0.0 if ".single_blocks." in k \
            else 1.0
        scaled[k] = v * w if ".lora_up." in k else v
    theirs, _ = comfy.sd.load_lora_for_models(flux, None, scaled, 0.8, 0.0)
    ours, _, _ = LoRABlockWeights().apply(flux, None, path.name, 0.8, 1.0, dit_double=0.5, dit_single=0.0,
                                          blocks="double.1=2")
    a, b = patched(theirs), patched(ours)
    out["flux_block_weights_max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)

    sd3 = build("sd3")
    path = lora_files("sd3", sd3, folder)["diffusers"]
    model, _, sampler, sigmas, cfg, _ = AccelerationLoRA().load(sd3, None, path.name, "flash-sd3", 1.0, 1.0, 4)
    gen = torch.Generator().manual_seed(2)
    cond = [[torch.randn(1, 5, 40, generator=gen), {"pooled_output": torch.randn(1, 24, generator=gen)}]]
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    latent = torch.zeros(1, 4, 8, 8)
    runs = {name: comfy.sample.sample_custom(model, noise, cfg, s, sigmas, cond, cond, latent, seed=3)
            for name, s in (("ours", sampler), ("comfy", comfy.samplers.ksampler("lcm")))}
    out["sd3_flash_lcm_max_abs_diff"] = float((runs["ours"] - runs["comfy"]).abs().max())
    out["sd3_flash_sigmas"] = [round(float(x), 6) for x in sigmas]
    return out


def bad_input(folder: Path) -> dict:
    """A UNet (SD1.5) LoRA on a real Flux MODEL and a Flux LoRA on a real SD3 MODEL: the error text, and whether the
    input MODEL kept no patch."""
    import torch
    from safetensors.torch import save_file
    from nimblediff.errors import AdapterMismatchError
    from nimblediff.nodes.adapters import load_lora

    unet = folder / "sd15_unet.safetensors"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{k}.lora_down.weight": torch.randn(2, 768), f"{k}.lora_up.weight": torch.randn(640, 2)}, str(unet))
    flux_lora = lora_files("flux", build("flux"), folder)["bfl"]
    out = {}
    for name, model, path in (("unet_on_flux", build("flux"), unet), ("flux_on_sd3", build("sd3"), flux_lora)):
        try:
            load_lora(model, None, str(path), 1.0, 1.0)
            out[name] = {"error": None}
        except AdapterMismatchError as exc:
            out[name] = {"error": str(exc), "untouched": not model.patches}
    return out


def reference_tables(pack: str) -> dict:
    """The CI reference (tests/comfyui/comfy_lora_reference.py, ComfyUI's tables rewritten) against ComfyUI's own
    flux/mmdit/pixart_to_diffusers: entries it lacks or maps elsewhere (target key and rows)."""
    import comfy.utils

    sys.path.insert(0, str(Path(pack) / "tests" / "comfyui"))
    import comfy_lora_reference as ref

    out = {}
    for arch, config in (("flux", CONFIGS["flux"]), ("sd3", CONFIGS["sd3"]), ("pixart", CONFIGS["pixart"])):
        fn = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers,
              "pixart": comfy.utils.pixart_to_diffusers}[arch]
        theirs = {k[:-len(".weight")]: (v, None, None) if isinstance(v, str) else v
                  for k, v in fn(config, output_prefix="diffusion_model.").items() if k.endswith(".weight")}
        mine = ref.TABLES[arch](config)
        out[f"reference_{arch}"] = {"missing": sorted(set(mine) - set(theirs)),
                                    "different": sorted(k for k in mine if k in theirs and (
                                        mine[k][0], mine[k][1], mine[k][2] is None) != (
                                        theirs[k][0], theirs[k][1], len(theirs[k]) < 3 or theirs[k][2] is None)),
                                    "entries": len(mine)}
    return out


def main(comfy: str, pack: str, scratch: str) -> None:
    sys.path.insert(0, str(Path(pack) / "tests"))
    import comfy_harness

    comfy_harness._import_pack(comfy, pack)
    sys.path.insert(0, comfy)
    folder = Path(scratch)
    folder.mkdir(parents=True, exist_ok=True)
    result = {}
    for arch in ("flux", "sd3", "pixart"):
        result.update(compare(arch, folder))
    result.update(flux_schedule())
    result.update(flux_sampling())
    result.update(nodes_on_real_models(folder))
    result.update(bad_input(folder))
    result.update(reference_tables(pack))
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
