"""Absurd sizes are refused by every pipeline before memory is allocated (core/limits): height / width beyond
ComfyUI's MAX_RESOLUTION, batches beyond MAX_BATCH, latents beyond MAX_LATENT_ELEMENTS, and images whose header
says so. "Before" is checked by counting model calls (text encoder, UNet / transformer, VAE): none may run."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.limits import MAX_BATCH, MAX_SIDE, image_size  # noqa: E402
from nimblediff.errors import InvalidParameterError  # noqa: E402

torch.set_num_threads(1)
TINY = Path(__file__).resolve().parent.parent / "weights" / "tiny" / "nimblediff-tiny"


class Calls:
    """Counts forward calls of every named module (hooks, removed on exit)."""

    def __init__(self, **modules):
        self.modules, self.count, self.handles = modules, {k: 0 for k in modules}, []

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.count.__setitem__(
                n, self.count[n] + 1)))
        return self.count

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def pipes():
    from nimblediff.pipelines import EditPipeline, FewStepPipeline, RestorePipeline

    out = [cls.from_pretrained(TINY) for cls in (FewStepPipeline, EditPipeline, RestorePipeline)]
    for p in out:
        p.set_progress_bar_config(disable=True)
    return out


def _huge(height, width, batch=1):
    """An image tensor of that size that allocates one value (stride 0): only its header is real."""
    return torch.zeros(1, 1, 1, 1).expand(batch, 3, height, width)


@pytest.mark.parametrize("call, match", [
    (dict(height=MAX_SIDE + 8), "height="),
    (dict(width=2 ** 31), "width="),
    (dict(height=-64), "height="),
    (dict(num_images_per_prompt=MAX_BATCH + 1), "batch="),
    (dict(num_images_per_prompt=0), "num_images_per_prompt="),
    (dict(num_images_per_prompt=2.5), "num_images_per_prompt="),
    (dict(height=MAX_SIDE, width=MAX_SIDE, num_images_per_prompt=64), "GiB"),
    (dict(prompt=["a red circle"] * 3000, num_images_per_prompt=2), "batch="),
])
def test_fewstep_pipeline_refuses_absurd_sizes_before_any_model_call(pipes, call, match):
    pipe = pipes[0]
    kwargs = {"prompt": "a red circle", "num_inference_steps": 1, **call}
    with Calls(text=pipe.text_encoder, unet=pipe.unet, vae=pipe.vae.decoder) as count:
        with pytest.raises(InvalidParameterError, match=match):
            pipe(**kwargs)
    assert count == {"text": 0, "unet": 0, "vae": 0}
    out = pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 32, 32, 3)                   # the limits refuse nothing ordinary


@pytest.mark.parametrize("image, match", [
    (_huge(MAX_SIDE + 4, 64), "height="),
    (_huge(64, 10 ** 6), "width="),
    (_huge(4096, 4096, batch=MAX_BATCH + 1), "batch="),
    ([_huge(64, 64)] * (MAX_BATCH + 1), "batch="),
])
def test_edit_pipelines_refuse_absurd_images_from_their_header(pipes, image, match):
    _, edit, restore = pipes
    with Calls(text=edit.text_encoder, unet=edit.unet, vae=edit.vae.encoder) as count:
        with pytest.raises(InvalidParameterError, match=match):
            edit(image, "a blue circle", "a red circle", num_inference_steps=2)
        with pytest.raises(InvalidParameterError, match=match):
            restore("a red circle", image, task="deblur", num_inference_steps=2)
    assert count == {"text": 0, "unet": 0, "vae": 0}


@pytest.mark.parametrize("factor, match", [(10 ** 4, "super_resolution x10000"), (0, "factor="), (2.0, "factor=")])
def test_super_resolution_factor_is_checked_before_upsampling(pipes, factor, match):
    restore = pipes[2]
    with Calls(unet=restore.unet, vae=restore.vae.encoder) as count:
        with pytest.raises(InvalidParameterError, match=match):
            restore("a red circle", torch.zeros(1, 3, 32, 32), task="super_resolution", factor=factor)
    assert count == {"unet": 0, "vae": 0}


@pytest.mark.parametrize("call, match", [
    (dict(height=2 ** 20, width=32), "height="),
    (dict(num_images_per_prompt=MAX_BATCH * 2), "batch="),
    (dict(height=MAX_SIDE, width=MAX_SIDE, num_images_per_prompt=256), "GiB"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt="),
])
def test_dit_pipeline_refuses_absurd_sizes_before_any_model_call(call, match):
    import inspect

    from nimblediff.pipelines.dit import FewStepSD3Pipeline

    parts = factories.tiny_sd3_components(0)
    accepted = set(inspect.signature(FewStepSD3Pipeline.__init__).parameters)
    pipe = FewStepSD3Pipeline(**{k: v for k, v in parts.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    with Calls(transformer=pipe.transformer, text=pipe.text_encoder, vae=pipe.vae.decoder) as count:
        with pytest.raises(InvalidParameterError, match=match):
            pipe(prompt="a red circle", num_inference_steps=1, output_type="np", **{"height": 32, "width": 32,
                                                                                     **call})
    assert count == {"transformer": 0, "text": 0, "vae": 0}


def test_image_size_reads_every_form_the_image_processor_takes():
    import numpy as np
    from PIL import Image

    assert image_size(Image.new("RGB", (48, 16))) == (1, 16, 48)
    assert image_size(np.zeros((16, 48, 3))) == (1, 16, 48)
    assert image_size(np.zeros((2, 16, 48, 3))) == (2, 16, 48)
    assert image_size(torch.zeros(3, 16, 48)) == (1, 16, 48)
    assert image_size(torch.zeros(2, 3, 16, 48)) == (2, 16, 48)
    assert image_size([Image.new("RGB", (48, 16))] * 3) == (3, 16, 48)
    assert image_size("not an image") is None and image_size([]) is None
