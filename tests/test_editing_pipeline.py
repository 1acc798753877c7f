"""EditPipeline / RestorePipeline on the shipped NimbleDiff-Tiny: round trip > 30 dB at 50 steps, agreement with
diffusers' DDIMInverseScheduler, strength 0, exact known region, clear errors; the custom_pipeline shims."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nimblediff.core import schedules
from nimblediff.core.editing import invert
from nimblediff.core.sampling import run
from nimblediff.errors import InvalidParameterError
from nimblediff.pipelines import EditPipeline, RestorePipeline, custom_pipeline_path
from nimblediff.tiny import data

torch.set_num_threads(1)
TINY = Path(__file__).resolve().parent.parent / "weights" / "tiny" / "nimblediff-tiny"


@pytest.fixture(scope="module")
def pipe():
    p = EditPipeline.from_pretrained(TINY)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def scenes():
    _, captions, _ = data.make_batch(77, 2, p_two=0.0)
    rng = np.random.default_rng(77)
    picked = [data.sample_scene(rng, p_two=0.0) for _ in range(2)]
    images = np.stack([data.render(s) for s in picked])            # (2, 64, 64, 3) uint8
    return images, [s.caption for s in picked]


def _pixels(images):
    return data.to_tensor(images) / 2 + 0.5                         # diffusers image-processor range [0, 1]


def test_inversion_round_trip_on_the_tiny_model_exceeds_30_db(pipe, scenes):
    images, captions = scenes
    inv = pipe.invert(_pixels(images), captions, num_inference_steps=50, report_psnr=True)
    assert len(inv.trajectory) == 51 and inv.latents.shape == (2, 4, 16, 16)
    assert inv.reconstruction_psnr > 30, inv.reconstruction_psnr


def test_diffusers_ddim_sampler_regenerates_our_inversion(pipe, scenes):
    """The peer: diffusers' DDIMScheduler (leading timesteps 901, ..., 1, set_alpha_to_one) sampling from our
    fixed-point inversion of the same timesteps gives the image latent back; its x_T is sqrt(abar) times our
    k-space noise. Plain DDIM inversion (no fixed point) comes back less exactly, as in diffusers' own."""
    from diffusers import DDIMScheduler

    from nimblediff.core.editing import latent_psnr

    images, captions = scenes
    x0 = pipe.encode_image(_pixels(images[:1]))
    cond, _ = pipe._embeds(captions[:1], 1, 1.0)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True, timestep_spacing="leading",
                                     steps_offset=1)
    ddim.set_timesteps(10)
    param = pipe.editing_param()
    sigmas = schedules.sigmas_from_timesteps(param, ddim.timesteps.tolist()).tolist()
    psnr = {}
    for fixed_point in (0, 6):
        with torch.no_grad():
            noise = run(invert, pipe.denoiser(param, cond), x0, sigmas, param=param, fixed_point=fixed_point)[-1]
            latents = noise * param.c_in(sigmas[0])
            for t in ddim.timesteps:
                eps = pipe.unet(latents, t, encoder_hidden_states=cond).sample
                latents = ddim.step(eps, t, latents).prev_sample
        psnr[fixed_point] = latent_psnr(latents, x0)
    assert psnr[6] > 50 and psnr[6] > psnr[0] + 10 and psnr[0] > 25, psnr


@pytest.mark.parametrize("method", ["swap", "pti"])
def test_edit_at_strength_zero_returns_the_input(pipe, scenes, method):
    images, captions = scenes
    x0 = pipe.encode_image(_pixels(images))
    out = pipe(latents=x0, source_prompt=captions, prompt=["a blue square at the top"] * 2, strength=0.0,
               method=method, output_type="latent")
    assert torch.equal(out.images, x0)


def test_pti_edit_runs_and_alpha_one_stays_near_the_source(pipe, scenes):
    images, captions = scenes
    x0 = pipe.encode_image(_pixels(images[:1]))
    kept = pipe(latents=x0, source_prompt=captions[0], prompt="a blue square at the top", strength=0.5,
                num_inference_steps=6, guidance_scale=3.0, method="pti", alpha=1.0, pti_iters=3,
                output_type="latent").images
    swapped = pipe(latents=x0, source_prompt=captions[0], prompt="a blue square at the top", strength=0.5,
                   num_inference_steps=6, guidance_scale=3.0, method="swap", output_type="latent").images
    assert (kept - x0).norm() < (swapped - x0).norm()


def test_edit_refuses_bad_input(pipe, scenes):
    images, captions = scenes
    with pytest.raises(InvalidParameterError, match="method='paint'"):
        pipe(_pixels(images), source_prompt=captions, prompt=captions, method="paint")
    big = torch.rand(1, 3, 256, 256)
    with pytest.raises(InvalidParameterError, match="image is 256x256 but this model supports up to 128x128"):
        pipe.invert(big, "a red circle")


@pytest.fixture(scope="module")
def restore(pipe):
    r = RestorePipeline(**pipe.components)
    r.set_progress_bar_config(disable=True)
    return r


def test_inpaint_blend_keeps_the_known_latent_exactly(restore, scenes):
    images, captions = scenes
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1.0                                           # repaint the right half
    known = restore.encode_image(_pixels(images[:1]))
    out = restore(captions[0], _pixels(images[:1]), mask, method="blend", num_inference_steps=8,
                  output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out[..., :8], known[..., :8])
    assert not torch.equal(out[..., 8:], known[..., 8:])


@pytest.mark.parametrize("task", ["inpaint", "super_resolution", "deblur"])
def test_dds_tasks_produce_images_of_the_right_size(restore, scenes, task):
    images, captions = scenes
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    image = _pixels(images[:1])
    if task == "super_resolution":
        image = torch.nn.functional.avg_pool2d(image, 2)
    out = restore(captions[0], image, mask if task == "inpaint" else None, task=task, num_inference_steps=6,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_restore_errors_name_what_is_wrong(restore, scenes):
    images, captions = scenes
    image = _pixels(images[:1])
    with pytest.raises(InvalidParameterError, match="mask_image is 32x32 but the image is 64x64"):
        restore(captions[0], image, torch.ones(1, 1, 32, 32).tril())
    with pytest.raises(InvalidParameterError, match="empty"):
        restore(captions[0], image, torch.zeros(1, 1, 64, 64))
    with pytest.raises(InvalidParameterError, match="full"):
        restore(captions[0], image, torch.ones(1, 1, 64, 64))
    with pytest.raises(InvalidParameterError, match="super_resolution: dds"):
        restore(captions[0], image, task="super_resolution", method="blend")


@pytest.mark.slow
def test_custom_pipeline_shims_load_our_classes(tmp_path):
    """One fresh interpreter loads both shims (each file holds exactly one DiffusionPipeline subclass)."""
    code = textwrap.dedent(f"""
        from diffusers import DiffusionPipeline
        import nimblediff.pipelines as nd
        for name, cls in (("edit", nd.EditPipeline), ("edit_restore", nd.RestorePipeline)):
            pipe = DiffusionPipeline.from_pretrained({str(TINY)!r}, custom_pipeline=nd.custom_pipeline_path(name),
                                                     trust_remote_code=True)
            assert isinstance(pipe, cls), (name, type(pipe))
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert Path(custom_pipeline_path("edit_restore")).name == "nimblediff_edit_restore.py"
