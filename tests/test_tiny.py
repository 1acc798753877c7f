"""NimbleDiff-Tiny: data, vocabulary, evaluator and a smoke run of every training stage (all fast, CPU)."""

import os

import numpy as np
import pytest
import torch

from nimblediff.errors import InvalidParameterError
from nimblediff.tiny import data, evaluate, vocab

# ---------------------------------------------------------------- data


def test_batches_are_deterministic_per_seed():
    x1, c1, s1 = data.make_batch(7, 16)
    x2, c2, s2 = data.make_batch(7, 16)
    x3, c3, _ = data.make_batch(8, 16)
    assert torch.equal(x1, x2) and c1 == c2 and s1 == s2
    assert c1 != c3
    assert x1.shape == (16, 3, 64, 64) and x1.min() >= -1 and x1.max() <= 1


def test_captions_state_the_labels():
    _, captions, scenes = data.make_batch(3, 200)
    for caption, scene in zip(captions, scenes):
        for label in scene.shapes:  # hand-built phrase: colour, shape and position always present
            phrase = f"{label.colour} {label.shape} {data.POSITION_PHRASES[label.position]}"
            assert phrase in caption, (phrase, caption)
        assert caption.count(" and ") == len(scene.shapes) - 1
        if "background" in caption:
            assert caption.endswith(f"on a {scene.background} background")


def test_rendered_pixels_match_labels():
    # Independent of the evaluator: the pixel at each shape's anchor has the labelled colour (within jitter).
    images, _, scenes = data.make_batch(5, 50)
    u8 = ((images.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
    for img, scene in zip(u8, scenes):
        for label in scene.shapes:
            x, y = data.POSITIONS[label.position]
            if label.shape != "star":  # a star's centre is inside it, but keep the check to solid shapes
                assert np.abs(img[y, x] - data.COLOURS[label.colour]).max() <= 13


# ---------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return vocab.build_tokenizer()


@pytest.mark.parametrize("word", vocab.WORDS)
def test_every_grammar_word_is_one_token(tokenizer, word):
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_captions_fit_the_context(tokenizer):
    _, captions, _ = data.make_batch(11, 300)
    for c in captions:
        ids = tokenizer(vocab.check_prompt(c)).input_ids
        assert len(ids) == len(c.split()) + 2 <= vocab.MAX_LENGTH


def test_out_of_vocabulary_words_are_named():
    with pytest.raises(InvalidParameterError, match=r"\['an', 'dog', 'orange'\]"):
        vocab.check_prompt("an orange dog on the left")
    assert vocab.check_prompt("A red circle, on the left") == "A red circle, on the left"


# ---------------------------------------------------------------- evaluator


def test_evaluator_is_right_on_real_images():
    if not os.path.exists(evaluate.DEFAULT_PATH):
        pytest.skip("weights/tiny/evaluator.safetensors not trained yet (python -m nimblediff.tiny.evaluate)")
    images, _, scenes = data.make_batch(99, 150)
    u8 = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    acc, feats = evaluate.evaluate(u8, scenes, evaluate.load_evaluator())
    assert acc["shape"] >= 0.98 and acc["colour"] == 1 and acc["position"] == 1 and acc["count"] == 1
    assert evaluate.frechet(feats, feats) < 1e-3


def test_evaluator_notices_wrong_colour():
    if not os.path.exists(evaluate.DEFAULT_PATH):
        pytest.skip("evaluator not trained yet")
    images, _, scenes = data.make_batch(99, 20)
    u8 = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    acc, _ = evaluate.evaluate(u8[:, :, :, ::-1].copy(), scenes, evaluate.load_evaluator())  # RGB -> BGR
    assert acc["colour"] < 0.7


# ---------------------------------------------------------------- training smoke run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from nimblediff.tiny import train

    out = tmp_path_factory.mktemp("tiny")
    torch.set_num_threads(1)
    train.main(["--stage", "all", "--out", str(out), "--max-steps", "1", "--batch", "2", "--eval-n", "8",
                "--no-progress"])
    return out


def test_vae_stage_stores_latent_scale(trained):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(trained / "vae" / "final")
    assert vae.config.scaling_factor != 0.18215 and np.isfinite(vae.config.scaling_factor)
    assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)


def test_unet_stage_saves_a_loadable_sd_pipeline(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained / "unet" / "pipeline")
    img = pipe("a red circle on the left", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert (trained / "unet" / "ckpt.pt").exists()


def test_flash_stage_saves_diffusers_lora(trained):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    path = trained / "flash" / "lora" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(path))
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(trained / "unet" / "pipeline")
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    assert sum(1 for n, _ in pipe.unet.named_parameters() if "lora_A" in n) == len(keys) // 2


def test_training_resumes_from_checkpoint(trained):
    from nimblediff.tiny import train

    state = torch.load(trained / "vae" / "ckpt.pt", weights_only=True)
    assert state["step"] == 1
    train.main(["--stage", "vae", "--out", str(trained), "--max-steps", "2", "--batch", "2", "--eval-n", "8",
                "--no-progress"])
    assert torch.load(trained / "vae" / "ckpt.pt", weights_only=True)["step"] == 2
    assert "resumed at step 1" in (trained / "vae" / "train.log").read_text()


def test_unet_stage_continues_from_init_folder(trained, tmp_path):
    """--init starts the UNet stage from a trained pipeline's weights: at a negligible learning rate the product is
    that pipeline's UNet and text encoder again, not fresh random weights."""
    from diffusers import StableDiffusionPipeline

    from nimblediff.tiny import train

    # the smoke run's weights are one tiny step from the seed-0 random init a new run also draws: move them away
    before = StableDiffusionPipeline.from_pretrained(trained / "unet" / "pipeline")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in [*before.unet.parameters(), *before.text_encoder.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    before.save_pretrained(tmp_path / "init")
    train.main(["--stage", "unet", "--init", str(tmp_path / "init"), "--vae", str(trained / "vae" / "final"),
                "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch", "2", "--lr", "1e-12",
                "--no-progress"])
    after = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "unet" / "pipeline")
    for name in ("unet", "text_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_init_folder_of_another_arch_is_refused(trained, tmp_path):
    from nimblediff.tiny import train

    with pytest.raises(ValueError, match=r"--init .*unet: its weights do not fit --arch v2"):
        train.main(["--stage", "unet", "--arch", "v2", "--init", str(trained / "unet" / "pipeline"), "--vae",
                    str(trained / "vae" / "final"), "--out", str(tmp_path), "--max-steps", "1", "--batch", "2",
                    "--no-progress"])


def test_split_words_moves_two_embeddings_apart_about_their_mean():
    from nimblediff.tiny import model, train, vocab

    tokenizer = vocab.build_tokenizer()
    encoder = model.make_text_encoder(len(tokenizer))
    before = encoder.get_input_embeddings().weight.detach().clone()
    train.split_words(encoder, tokenizer, ["top", "bottom"], 0.6)
    after = encoder.get_input_embeddings().weight.detach()
    i, j = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("top", "bottom"))
    assert torch.allclose((after[i] + after[j]) / 2, (before[i] + before[j]) / 2, atol=1e-6)
    assert (after[i] - after[j]).norm().item() == pytest.approx(1.2, rel=1e-5)
    others = [k for k in range(len(after)) if k not in (i, j)]
    assert torch.equal(after[others], before[others])
    with pytest.raises(ValueError, match="--split-words top zebra"):
        train.split_words(encoder, tokenizer, ["top", "zebra"], 0.6)
