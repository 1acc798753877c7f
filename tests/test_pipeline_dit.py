"""Few-step pipelines for SDXL, PixArt, SD3 and Flux (pipelines/dit.py) against the stock diffusers pipelines on the
tiny random models: LCMScheduler (SDXL, and PixArt-alpha, a VP model: the Flash PixArt recipe; the stock PixArt
pipeline cannot run FlowMatchEulerDiscreteScheduler, it reads init_noise_sigma) or FlowMatchEulerDiscreteScheduler
(SD3, Flux), with the same two LoRAs (acceleration + style, weights 1 and 0.7) loaded by diffusers'
load_lora_weights + set_adapters, or by PEFT's inject_adapter_in_model + set_peft_model_state_dict for PixArt (which
has no diffusers LoRA loader)."""

import copy
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError  # noqa: E402
from nimblediff.pipelines import dit  # noqa: E402
from nimblediff.weights.safetensors_io import save_state_dict  # noqa: E402

torch.set_num_threads(1)

FAMILIES = {  # family: (components factory, stock class, our class, denoiser)
    "sdxl": (factories.tiny_sdxl_components, "StableDiffusionXLPipeline", dit.FewStepSDXLPipeline, "unet"),
    "pixart": (factories.tiny_pixart_components, "PixArtAlphaPipeline", dit.FewStepPixArtPipeline, "transformer"),
    "sd3": (factories.tiny_sd3_components, "StableDiffusion3Pipeline", dit.FewStepSD3Pipeline, "transformer"),
    "flux": (factories.tiny_flux_components, "FluxPipeline", dit.FewStepFluxPipeline, "transformer"),
}
TARGETS = (r"attn\d?\.(to_|add_)", r"\.ff(_context)?\.net", r"proj_mlp", r"single_transformer_blocks\.\d+\.proj_out")
CALL = dict(prompt="a red circle", height=32, width=32, output_type="np")


def build(family, cls=None, scheduler=None):
    make, stock, ours, _ = FAMILIES[family]
    import diffusers

    cls = cls or getattr(diffusers, stock)
    parts = make(0)
    if scheduler is not None:
        parts["scheduler"] = scheduler(parts["scheduler"].config)
    accepted = set(inspect.signature(cls.__init__).parameters)
    pipe = cls(**{k: v for k, v in parts.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_peft_lora(module, component: str, seed: int, rank: int = 2) -> dict:
    """{component.module.lora_A/B.weight} for the attention / MLP linears of `module` (diffusers/PEFT layout,
    no alpha: PEFT's default lora_alpha = r, scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(re.search(t, name) for t in TARGETS):
            sd[f"{component}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.3
            sd[f"{component}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.3
    assert sd
    return sd


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit_loras")
    out = {}
    for family, (make, _, _, den) in FAMILIES.items():
        module = make(0)[den]
        out[family] = [save_state_dict(random_peft_lora(module, den, seed), folder / f"{family}_{i}.safetensors")
                       for i, seed in enumerate((1, 2))]
    return out


def stock_with_loras(pipe, family, files, weights):
    """The reference: diffusers' own LoRA loading (PEFT's for PixArt), unfused adapters at the given weights."""
    if family != "pixart":
        for i, path in enumerate(files):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.set_adapters([f"l{i}" for i in range(len(files))], adapter_weights=list(weights))
        return pipe
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    for i, (path, w) in enumerate(zip(files, weights)):
        sd = {k[len("transformer."):]: v for k, v in load_file(str(path)).items()}
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
        config = LoraConfig(r=2, lora_alpha=2 * w, target_modules=targets)      # scale alpha / r = w
        inject_adapter_in_model(config, pipe.transformer, adapter_name=f"l{i}")
        set_peft_model_state_dict(pipe.transformer, sd, adapter_name=f"l{i}")
    names = [f"l{i}" for i in range(len(files))]
    for m in pipe.transformer.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter(names)
    return pipe


def run(pipe, **kw):
    torch.manual_seed(0)            # SD3 / Flux do not pass their generator to step(): stock stochastic samplers use this
    return pipe(**CALL, generator=torch.Generator().manual_seed(7), **kw).images


STOCK_SCHEDULER = {"sdxl": "LCMScheduler", "pixart": "LCMScheduler", "sd3": None, "flux": None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_stock_pipeline_with_same_loras(family, loras):
    """Acceleration + style LoRA stacked through our LoRA path (weights/ + core/adapters) and our sampler (core
    sampling via NimbleScheduler) equal the stock pipeline + stock scheduler + diffusers/PEFT LoRAs: <= 1e-4."""
    import diffusers

    sched = STOCK_SCHEDULER[family]
    sched_cls = getattr(diffusers, sched).from_config if sched else None
    reference = stock_with_loras(build(family, scheduler=sched_cls), family, loras[family], (1.0, 0.7))
    ours = build(family, FAMILIES[family][2])
    ours.load_lora(loras[family][0])
    ours.load_lora(loras[family][1], weight=0.7)
    kw = dict(num_inference_steps=4, guidance_scale=1.0)
    if family == "pixart":
        kw["use_resolution_binning"] = False
    expected, got = run(reference, **kw), run(ours, **kw)
    assert np.abs(expected - got).max() <= 1e-4
    assert np.abs(expected - run(build(family, scheduler=sched_cls), **kw)).max() > 1e-3   # the LoRAs matter
    ours.unload_loras()
    np.testing.assert_allclose(run(ours, **kw), run(build(family, scheduler=sched_cls), **kw), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,recipe", [("sdxl", "flash-sdxl"), ("pixart", "flash-pixart")])
def test_acceleration_recipe_matches_stock_lcm(family, recipe, loras):
    """load_acceleration_lora adopts the recipe (LCM sampler and grid, 4 steps, CFG 1) with no call arguments."""
    from diffusers import LCMScheduler

    reference = stock_with_loras(build(family, scheduler=LCMScheduler.from_config), family, loras[family],
                                 (1.0, 0.5))
    ours = build(family, FAMILIES[family][2])
    ours.load_acceleration_lora(loras[family][0], recipe=recipe)
    ours.load_lora(loras[family][1], weight=0.5)
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    expected = run(reference, num_inference_steps=4, guidance_scale=1.0, **extra)
    assert np.abs(expected - run(ours, **extra)).max() <= 1e-4


def test_sd3_flow_lcm_matches_flowmatch_lcm_scheduler(loras):
    """The lcm sampler on a flow model (Flash SD3's kind of sampling) equals diffusers' FlowMatchLCMScheduler on
    the same grid."""
    from diffusers import FlowMatchLCMScheduler

    reference = stock_with_loras(build("sd3", scheduler=lambda c: FlowMatchLCMScheduler(shift=3.0)), "sd3",
                                 loras["sd3"][:1], (1.0,))
    ours = build("sd3", dit.FewStepSD3Pipeline)
    ours.load_lora(loras["sd3"][0])
    side = CALL["height"] // ours.vae_scale_factor
    z = torch.randn(1, ours.transformer.config.in_channels, side, side, generator=torch.Generator().manual_seed(3))
    kw = dict(CALL, num_inference_steps=4, guidance_scale=1.0, latents=z)
    # the stock SD3 pipeline passes no generator to step(): its re-noising draws from the global RNG. Ours draws
    # from the call's generator, which the given latents leave unused: the same stream when both are seeded alike.
    torch.manual_seed(11)
    expected = reference(**kw).images
    torch.manual_seed(0)
    got = ours(sampler="lcm", schedule="flowmatch", generator=torch.Generator().manual_seed(11), **kw).images
    assert np.abs(expected - got).max() <= 1e-4


def test_flux_schedule_goes_through_dynamic_shift():
    """A named schedule on Flux is made unshifted and shifted by the pipeline's mu: with the stock grid
    ('flowmatch' at shift 1 is the linspace FluxPipeline passes, up to its last point) it equals the stock run."""
    reference = build("flux")
    ours = build("flux", dit.FewStepFluxPipeline)
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    expected = run(reference, sigmas=np.linspace(1.0, 1 / 3, 3).tolist(), **kw)
    assert np.abs(expected - run(ours, schedule="trailing", **kw)).max() <= 1e-4


def test_custom_pipeline_shims(tmp_path):
    """custom_pipeline=<shim> + trust_remote_code loads a saved stock folder as our class (class identity kept)."""
    from diffusers import DiffusionPipeline

    from nimblediff.pipelines import custom_pipeline_path

    for family in ("sd3", "flux"):
        folder = tmp_path / family
        build(family).save_pretrained(folder)
        pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=custom_pipeline_path(f"dit_{family}"),
                                                 trust_remote_code=True)
        assert type(pipe) is FAMILIES[family][2]
    with pytest.raises(InvalidParameterError, match="dit_flux"):
        custom_pipeline_path("dit_nope")


# -------------------------------------------------------------------------------------------------- bad input
def _weights(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def test_unet_lora_on_dit_and_dit_lora_on_unet_name_both(loras):
    flux = build("flux", dit.FewStepFluxPipeline)
    before = _weights(flux)
    with pytest.raises(AdapterMismatchError, match=r"(?s)sdxl.*flux"):
        flux.load_lora(loras["sdxl"][0])
    assert all(torch.equal(v, before[k]) for k, v in flux.transformer.state_dict().items())
    sdxl = build("sdxl", dit.FewStepSDXLPipeline)
    unet = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"(?s)flux.*sdxl"):
        sdxl.load_lora(loras["flux"][0])
    assert all(torch.equal(v, unet[k]) for k, v in sdxl.unet.state_dict().items())


def test_flux_lora_on_sd3_names_both(loras):
    sd3 = build("sd3", dit.FewStepSD3Pipeline)
    before = _weights(sd3)
    with pytest.raises(AdapterMismatchError, match=r"(?s)flux.*sd3"):
        sd3.load_lora(loras["flux"][0])
    assert all(torch.equal(v, before[k]) for k, v in sd3.transformer.state_dict().items())


@pytest.mark.parametrize("family,size,multiple", [("sd3", 30, 4), ("flux", 34, 4), ("pixart", 30, 4)])
def test_unpatchifiable_resolution(family, size, multiple):
    pipe = build(family, FAMILIES[family][2])
    with pytest.raises(InvalidParameterError, match=rf"height={size}.*multiple of {multiple}"):
        pipe(prompt="a red circle", height=size, width=32, num_inference_steps=1)


def test_recipe_for_another_family_and_missing_component(tmp_path, loras):
    pipe = build("flux", dit.FewStepFluxPipeline)
    with pytest.raises(InvalidParameterError, match=r"(?s)flash-sd3.*sd3.*flux"):
        pipe.load_acceleration_lora(loras["flux"][0], recipe="flash-sd3")
    build("sd3").save_pretrained(tmp_path / "sd3")
    import shutil

    shutil.rmtree(tmp_path / "sd3" / "transformer")
    with pytest.raises(WeightsFormatError, match=r"(?s)StableDiffusion3Pipeline.*transformer"):
        dit.FewStepSD3Pipeline.from_pretrained(tmp_path / "sd3")


def test_defaults_are_the_stock_grid():
    """4 steps and the stock grid by default (no recipe): the scheduler the call used is the flow Euler one."""
    pipe = build("sd3", dit.FewStepSD3Pipeline)
    sched = pipe._nimble_scheduler(None, None)
    assert (sched.config.sampler, sched.config.schedule, sched.config.model_type) == ("euler", "flowmatch", "flow")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    copy.deepcopy(sched)


def test_tcd_recipe_gamma_reaches_the_sampler(loras):
    """tcd-sdxl: the recipe's gamma 0.3 replaces the stock call's eta=0 default; equals TCDScheduler at eta=0.3."""
    from diffusers import TCDScheduler

    reference = stock_with_loras(build("sdxl", scheduler=TCDScheduler.from_config), "sdxl", loras["sdxl"][:1], (1.0,))
    ours = build("sdxl", dit.FewStepSDXLPipeline)
    ours.load_acceleration_lora(loras["sdxl"][0], recipe="tcd-sdxl")
    expected = run(reference, num_inference_steps=4, guidance_scale=1.0, eta=0.3)
    assert np.abs(expected - run(ours)).max() <= 1e-4
    assert np.abs(run(reference, num_inference_steps=4, guidance_scale=1.0, eta=0.0) - expected).max() > 1e-3
