"""Diffusers surface: NimbleScheduler and FewStepPipeline against diffusers' own LCM path."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
from analytic import GaussianData  # noqa: E402

from nimblediff.core.parameterization import VP  # noqa: E402
from nimblediff.pipelines import FewStepPipeline, NimbleScheduler, custom_pipeline_path  # noqa: E402

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _run_scheduler(scheduler, model, steps, dtype, seed=1, shape=(1, 4, 8, 8)):
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    return x


def _eps_model(param, denoise):
    """A UNet stand-in: the eps an exact k-space denoiser implies at VP input x_t and timestep t."""

    def model(x_t, t):
        sigma = param.t_to_sigma(t).float()
        x_k = x_t * (1 + sigma**2) ** 0.5
        return (x_k - denoise(x_k, sigma.reshape(1))) / sigma

    return model


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_scheduler_matches_lcm_scheduler_on_tiny_unet(steps):
    from diffusers import LCMScheduler

    unet = factories.tiny_sd15_unet(0).eval()
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    for dtype, check in ((torch.float64, "abs"), (torch.float32, "rel")):
        net = unet.to(dtype)

        def model(x, t):
            with torch.no_grad():
                return net(x, t, ctx.to(dtype)).sample

        ref = _run_scheduler(LCMScheduler(timestep_spacing="trailing", **SD_SCHEDULE), model, steps, dtype)
        ours = _run_scheduler(NimbleScheduler(**SD_SCHEDULE), model, steps, dtype)
        diff = (ref - ours).abs().max().item()
        # The random tiny UNet predicts x0 of magnitude ~50: in float32 that is 4e-6 per ulp, so float32 is judged
        # relative to the magnitude; float64 (limited by diffusers' float32 alpha tables) absolutely.
        bound = 1e-5 if check == "abs" else 1e-6 * ref.abs().max().item()
        assert diff <= bound, (dtype, diff, bound)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_scheduler_matches_lcm_scheduler_on_exact_denoiser(steps):
    """float32, realistic magnitudes: the eps an exact denoiser of Gaussian data predicts."""
    from diffusers import LCMScheduler

    param, data = VP(), GaussianData()
    denoise = data.denoiser(param)

    model = _eps_model(param, denoise)

    ref = _run_scheduler(LCMScheduler(timestep_spacing="trailing", **SD_SCHEDULE), model, steps, torch.float32)
    ours = _run_scheduler(NimbleScheduler(**SD_SCHEDULE), model, steps, torch.float32)
    assert (ref - ours).abs().max().item() <= 1e-5


def test_scheduler_saves_reloads_and_drops_into_stock_pipeline(tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    sched = NimbleScheduler(sampler="tcd", gamma=0.5, **SD_SCHEDULE)
    sched.save_pretrained(tmp_path / "scheduler")
    again = NimbleScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert again.config.sampler == "tcd" and again.config.gamma == 0.5

    pipe = StableDiffusionPipeline(**factories.tiny_sd15_components(0))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np", height=32, width=32)
    pipe.scheduler = NimbleScheduler.from_config(pipe.scheduler.config, sampler="lcm", schedule="lcm")
    ours = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    ref = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ours - ref).max() <= 1e-4


def test_fewstep_pipeline_matches_diffusers_lcm_path():
    from diffusers import LCMScheduler, StableDiffusionPipeline

    components = factories.tiny_sd15_components(0)
    ref = StableDiffusionPipeline(**components)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    ours = FewStepPipeline(**components)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4, 8):
        kw = dict(num_inference_steps=steps, guidance_scale=1.0, output_type="np", height=32, width=32)
        a = ref("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
        b = ours("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
        assert abs(a - b).max() <= 1e-4, steps


def test_clip_skip_works_on_transformers5_clip():
    """diffusers' own clip_skip raises on transformers>=5.6 (#14124); ours uses the penultimate layer + final LN."""
    pipe = FewStepPipeline(**factories.tiny_sd15_components(0))
    te = pipe.text_encoder
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(te, "text_model", te).final_layer_norm(hidden)
        embeds, _ = pipe.encode_prompt("a cat", clip_skip=1)
    torch.testing.assert_close(embeds, expected)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", clip_skip=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_custom_pipeline_in_fresh_process(tmp_path):
    """DiffusionPipeline.from_pretrained(folder, custom_pipeline=<shim>, trust_remote_code=True) gives our class,
    generates, and a saved pipeline reloads. A fresh interpreter with its own HF modules cache."""
    folder = tmp_path / "tiny"
    factories.save_tiny_sd15(folder)
    code = textwrap.dedent(f"""
        import torch
        from diffusers import DiffusionPipeline
        import nimblediff.pipelines as nd
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, custom_pipeline=nd.custom_pipeline_path("fewstep"),
                                                 trust_remote_code=True)
        assert isinstance(pipe, nd.FewStepPipeline), type(pipe)
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 32, 32, 3)
        pipe.scheduler = nd.NimbleScheduler.from_config(pipe.scheduler.config)
        pipe.save_pretrained({str(tmp_path / "saved")!r})
        again = nd.FewStepPipeline.from_pretrained({str(tmp_path / "saved")!r})
        assert isinstance(again.scheduler, nd.NimbleScheduler)
        again.set_progress_bar_config(disable=True)
        img2 = again("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert abs(img - img2).max() < 1e-5
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_custom_pipeline_path_unknown_name():
    from nimblediff.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="fewstep"):
        custom_pipeline_path("nope")


def test_fewstep_pipeline_with_lora_matches_diffusers_load_lora_weights(tmp_path):
    """Acceleration LoRA + style LoRA in our pipeline vs diffusers' PEFT path (unfused adapters) + LCMScheduler."""
    import lora_files
    from diffusers import LCMScheduler, StableDiffusionPipeline

    components = factories.tiny_sd15_components(0)
    accel = lora_files.write_peft_lora(StableDiffusionPipeline(**components), tmp_path, seed=1, name="accel.safetensors")
    style = lora_files.write_peft_lora(StableDiffusionPipeline(**components), tmp_path, seed=2, name="style.safetensors")

    ref = StableDiffusionPipeline(**factories.tiny_sd15_components(0))
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    ref.load_lora_weights(accel, adapter_name="accel")
    ref.load_lora_weights(style, adapter_name="style")
    ref.set_adapters(["accel", "style"], adapter_weights=[1.0, 0.6])
    ours = FewStepPipeline(**factories.tiny_sd15_components(0))
    ours.load_acceleration_lora(accel, recipe="lcm-lora-sd15")
    ours.load_lora(style, weight=0.6)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np", height=32, width=32)
    a = ref("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    b = ours("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() <= 1e-4

    base = FewStepPipeline(**factories.tiny_sd15_components(0))
    ours.unload_loras()
    for k, v in base.unet.state_dict().items():
        torch.testing.assert_close(ours.unet.state_dict()[k], v, rtol=0, atol=1e-6)


def test_recipe_contradiction_warns():
    pipe = FewStepPipeline(**factories.tiny_sd15_components(0))
    from nimblediff.core.recipes import RECIPES

    pipe.recipe = RECIPES["flash-sd15"]
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match="CFG 7.0 is outside"):
        pipe("a cat", guidance_scale=7.0, height=32, width=32, output_type="np")


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_tcd_matches_diffusers_tcd_scheduler(steps, gamma):
    """TCD step for step against diffusers' TCDScheduler (gamma passed as eta), exact denoiser, float32."""
    from diffusers import TCDScheduler

    param, data = VP(), GaussianData()
    denoise = data.denoiser(param)

    model = _eps_model(param, denoise)

    def drive(scheduler):
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(1)
        x = torch.randn((2, 4, 8, 8), generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, generator=g, eta=gamma).prev_sample
        return x

    ref = drive(TCDScheduler(timestep_spacing="trailing", **SD_SCHEDULE))
    ours = drive(NimbleScheduler(sampler="tcd", **SD_SCHEDULE))
    assert (ref - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3", "flux"])
def test_scheduler_in_stock_pipelines_of_every_family(family):
    """NimbleScheduler drops into diffusers' own SDXL / PixArt / SD3 / Flux pipelines (the bases Flash Diffusion
    ships LoRAs for) and matches LCMScheduler (VP) or FlowMatchEulerDiscreteScheduler (flow, incl. Flux's mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    pipe = getattr(factories, f"tiny_{family}_pipeline")(0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=1.0, output_type="np", height=32, width=32)
    if family == "pixart":
        kw["use_resolution_binning"] = False
    if family in ("pixart", "sd3", "flux"):
        kw["max_sequence_length"] = 32
    if family in ("sd3", "flux"):
        reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ours = NimbleScheduler.from_config(pipe.scheduler.config, model_type="flow", sampler="euler",
                                           schedule="flowmatch")
    else:
        reference = LCMScheduler.from_config(pipe.scheduler.config)
        ours = NimbleScheduler.from_config(pipe.scheduler.config, sampler="lcm", schedule="lcm")
    pipe.scheduler = reference
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = ours
    b = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() <= 1e-4


def test_unfused_lora_mode_matches_fused(tmp_path):
    import lora_files

    components = factories.tiny_sd15_components(0)
    from diffusers import StableDiffusionPipeline

    path = lora_files.write_peft_lora(StableDiffusionPipeline(**components), tmp_path, seed=3)
    kw = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    images = []
    for fuse in (True, False):
        pipe = FewStepPipeline(**factories.tiny_sd15_components(0))
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora(path, weight=0.8, fuse=fuse)
        images.append(pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images)
        pipe.unload_loras()
        base = FewStepPipeline(**factories.tiny_sd15_components(0))
        base.set_progress_bar_config(disable=True)
        again = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        ref = base("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        assert abs(again - ref).max() <= 1e-5
    assert abs(images[0] - images[1]).max() <= 1e-4


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_scheduler_from_a_fitted_schedule_file(tmp_path, shifted):
    """A fitted solver's file drives the scheduler: the same sample as the library loop on the same noise (scaled
    to the file's first sigma, which a fitted start may put below the schedule's top), with the model asked at the
    fitted time shifts, and num_inference_steps must be the file's step count."""
    from diffusers import StableDiffusionPipeline

    from nimblediff.core.sampling import SAMPLERS, run
    from nimblediff.core.schedule_search import fit_solver, save_schedule
    from nimblediff.errors import InvalidParameterError

    param, data = VP(), GaussianData()
    denoise = data.denoiser(param)
    cal = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * param.sigma_max
    fit = fit_solver(denoise, param, 3, x=cal, iterations=5, prior_shift=True, time_shift=shifted,
                     fit_start=shifted)
    if shifted:         # a start below the top and a first call below it: the scheduler must rescale its input
        fit["sigmas"][0], fit["options"]["shifts"] = 9.0, [-0.3, 0.2, 0.1]
    save_schedule(tmp_path / "fit.json", fit)
    sched = NimbleScheduler.from_schedule_file(tmp_path / "fit.json", **SD_SCHEDULE)
    assert sched.config.sampler == "fitted" and sched.config.sampler_options["prior_shift"] is True

    model = _eps_model(param, denoise)

    ours = _run_scheduler(sched, model, 3, torch.float32)
    s0 = fit["sigmas"][0]
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * (1 + s0**2) ** 0.5
    ref = run(SAMPLERS["fitted"], denoise, x, torch.tensor(fit["sigmas"]).float(), param=param, **fit["options"])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="fixed 3-step"):
        sched.set_timesteps(4)
    with pytest.raises(InvalidParameterError, match="model_type='vp'"):
        NimbleScheduler.from_schedule_file(tmp_path / "fit.json", model_type="flow")

    pipe = StableDiffusionPipeline(**factories.tiny_sd15_components(0))     # in a stock pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = NimbleScheduler.from_schedule_file(tmp_path / "fit.json", **pipe.scheduler.config)
    image = pipe("a cat", num_inference_steps=3, guidance_scale=1.0, output_type="np", height=32, width=32).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0


def test_closed_vocabulary_prompts_are_checked():
    """NimbleDiff-Tiny's tokenizer is a closed word list: a word outside it (prompt or negative prompt) is named,
    not spelled out in byte tokens."""
    from nimblediff.cli import EMBEDDED_MODEL
    from nimblediff.errors import InvalidParameterError

    pipe = FewStepPipeline.from_pretrained(EMBEDDED_MODEL, torch_dtype=torch.float32)
    with pytest.raises(InvalidParameterError, match=r"\['cat'\]"):
        pipe.encode_prompt("a red cat on the left", "cpu")
    with pytest.raises(InvalidParameterError, match=r"\['blurry'\]"):
        pipe.encode_prompt("a red circle", "cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    embeds, _ = pipe.encode_prompt(["a red circle on the left", "a small blue star"], "cpu")
    assert embeds.shape[0] == 2
