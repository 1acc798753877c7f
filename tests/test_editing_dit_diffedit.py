"""DiffEdit on MM-DiTs: DiTEditPipeline(method="diffedit") and edit_mask on the shipped NimbleDiff-Tiny-DiT, against
independent references.

- a full automatic mask (threshold 0) is a plain regeneration: diffusers' own StableDiffusion3Pipeline sampling our
  inverted noise under the target prompt;
- a mask_image keeps the latent outside it to the bit and changes it inside;
- a colour edit's automatic mask lies on the object, whose place the rendered scene gives;
- the same prompt twice finds nothing and returns the source, with a warning; bad input names the parameter.
"""

import numpy as np
import pytest
import torch

import nimblediff
from nimblediff.errors import InvalidParameterError
from nimblediff.tiny import data

torch.set_num_threads(1)
STEPS, CFG, ROWS = 6, 3.0, 24


@pytest.fixture(scope="module")
def rig():
    from diffusers import StableDiffusion3Pipeline

    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    pipe = DiTEditPipeline.from_pretrained(nimblediff.TINY_DIT, dtype=torch.float32)
    stock = StableDiffusion3Pipeline(**pipe.components)          # scheduler shift 1: given sigmas are used as given
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    scene = data.sample_scene(np.random.default_rng(3), p_two=0.0)
    pixels = data.to_tensor(data.render(scene)[None]) / 2 + 0.5          # (1, 3, 64, 64) in [0, 1]
    return pipe, stock, pipe.encode_image(pixels), scene


def _recoloured(scene):
    label = scene.shapes[0]
    new = next(c for c in data.COLOURS if c != label.colour)
    return scene.caption.replace(f"{label.colour} {label.shape}", f"{new} {label.shape}")


def _kw(scene, **kw):
    return dict(prompt=_recoloured(scene), source_prompt=scene.caption, method="diffedit",
                num_inference_steps=STEPS, guidance_scale=CFG, max_sequence_length=ROWS, output_type="latent", **kw)


def test_a_full_automatic_mask_is_diffusers_regeneration_under_the_target(rig):
    pipe, stock, x0, scene = rig
    out = pipe(latents=x0, mask_threshold=0.0, mask_noises=2, **_kw(scene))
    assert bool(out.mask.all())
    inv = pipe.invert(latents=x0, prompt=scene.caption, num_inference_steps=STEPS, max_sequence_length=ROWS)
    with torch.no_grad():
        reference = stock(prompt=_recoloured(scene), latents=inv.latents, sigmas=inv.sigmas[:-1],
                          num_inference_steps=STEPS, guidance_scale=CFG, max_sequence_length=ROWS,
                          output_type="latent").images
    torch.testing.assert_close(out.images, reference, rtol=0, atol=2e-5)


def test_a_mask_image_keeps_the_rest_to_the_bit(rig):
    pipe, _, x0, scene = rig
    factor = pipe.vae_scale_factor
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1.0
    out = pipe(latents=x0, mask_image=mask, **_kw(scene))
    half = x0.shape[-2] // 2
    assert out.mask.shape == (1, 1, 64 // factor, 64 // factor)
    assert torch.equal(out.images[..., half:, :], x0[..., half:, :])
    assert not torch.equal(out.images[..., :half, :], x0[..., :half, :])


def test_a_colour_edits_mask_lies_on_the_object(rig):
    """The rendered scene says where the shape is: its box (centre + jitter, half-extent + size jitter) in latent
    cells. A recolouring's mask should be mostly inside that box (one cell of margin) and cover part of it."""
    pipe, _, x0, scene = rig
    mask = pipe.edit_mask(latents=x0, prompt=_recoloured(scene), source_prompt=scene.caption,
                          num_inference_steps=STEPS, guidance_scale=CFG, max_sequence_length=ROWS,
                          mask_strength=0.8, mask_blur=1.0)[0, 0]
    label, (dx, dy, dr, _) = scene.shapes[0], scene.jitter[0]
    factor = 64 / mask.shape[-1]
    (x, y), r = data.POSITIONS[label.position], data.SIZES[label.size] + dr
    rows = torch.arange(mask.shape[0])[:, None] + 0.5
    cols = torch.arange(mask.shape[1])[None, :] + 0.5
    inside = ((cols * factor - x - dx).abs() <= r + factor) & ((rows * factor - y - dy).abs() <= r + factor)
    on = mask > 0
    assert int(on.sum()) > 0
    assert float((on & inside).sum() / on.sum()) >= 0.8, (int(on.sum()), int((on & inside).sum()))
    assert float((on & inside).sum() / inside.sum()) >= 0.4


def test_the_same_prompt_twice_returns_the_source_and_says_so(rig):
    pipe, _, x0, scene = rig
    kw = {**_kw(scene), "prompt": scene.caption}
    with pytest.warns(UserWarning, match="DiffEdit mask is empty"):
        out = pipe(latents=x0, mask_noises=2, **kw)
    assert torch.equal(out.images, x0) and not out.mask.any()


@pytest.mark.parametrize("kw, match", [
    ({"mask_image": torch.ones(1, 1, 32, 32)}, "mask_image is 32x32 but the image is 64x64"),
    ({"mask_image": torch.zeros(1, 1, 64, 64)}, "mask_image is empty"),
    ({"mask_noises": 0}, "mask_noises=0"),
    ({"mask_strength": 1.5}, "mask_strength=1.5"),
    ({"hsds_steps": 3}, "hsds_steps=3"),
    ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators for 1 images"),
])
def test_bad_input_names_the_parameter(rig, kw, match):
    pipe, _, x0, scene = rig
    with pytest.raises(InvalidParameterError, match=match):
        pipe(latents=x0, **{**_kw(scene), **kw})
