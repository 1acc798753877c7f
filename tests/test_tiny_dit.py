"""NimbleDiff-Tiny-DiT's recipe (tiny/dit.py) as a stock StableDiffusion3Pipeline folder, and the guided flow
denoiser that schedule search uses, checked against the stock pipeline's own sampling loop."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusion3Pipeline

from nimblediff.cli import _load_any_pipeline, main
from nimblediff.core.schedule_search import load_schedule
from nimblediff.pipelines.guided import guided_denoiser
from nimblediff.pipelines.loading import missing_text_encoders
from nimblediff.tiny import dit, vocab


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    tok = vocab.build_tokenizer()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=64)
    pipe = dit.make_pipeline(vae, dit.make_text_encoder(len(tok)), dit.make_text_encoder(len(tok)),
                             dit.make_transformer(num_layers=2), tok)
    path = tmp_path_factory.mktemp("dit") / "tiny-dit"
    pipe.save_pretrained(path)
    return path


def test_folder_is_a_stock_sd3_pipeline_without_t5(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert missing_text_encoders(folder) == {"text_encoder_3": None, "tokenizer_3": None}
    pipe = DiffusionPipeline.from_pretrained(folder, **missing_text_encoders(folder))
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.vae.config.shift_factor == 0.0
    assert isinstance(_load_any_pipeline(folder, torch.float32), StableDiffusion3Pipeline)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_guided_flow_denoiser_reproduces_the_stock_pipeline(folder, cfg):
    """Flow Euler with our denoiser, x <- x + (s' - s) (x - D(x, s)) / s, equals the pipeline's FlowMatchEuler loop."""
    pipe = _load_any_pipeline(folder, torch.float32)
    prompts = ["a red circle on the left", "a blue star at the top on a white background"]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompts, height=64, width=64, num_inference_steps=4, guidance_scale=cfg, latents=z.clone(),
               output_type="latent", max_sequence_length=pipe.tokenizer_max_length).images
    denoiser, param, shape = guided_denoiser(pipe, prompts, cfg)
    assert shape == (4, 16, 16) and param.kind == "flow"
    sigmas = pipe.scheduler.sigmas  # the schedule the pipeline just used, ending at 0
    x = z
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * (x - denoiser(x, s.expand(len(x)))) / s
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_boss_schedule_search_on_a_flow_transformer(folder, tmp_path):
    out = tmp_path / "boss.json"
    args = ["schedule", "search", "--model", str(folder), "--nfe", "3", "--batch", "2", "--size", "64",
            "--grid", "16", "--cfg", "3", "--out", str(out), "--threads", "1", "--quiet"]
    assert main(args) == 0
    data = load_schedule(out, model_type="flow")
    sig = [float(s) for s in data["sigmas"]]
    assert len(sig) == 4 and sig[0] == pytest.approx(1.0, abs=1e-3) and sig[-1] == 0.0
    assert all(a > b for a, b in zip(sig, sig[1:]))


@pytest.mark.parametrize("student", ["instaflow", "2rf"])
def test_shipped_student_fits_the_teacher_and_one_step_is_z1_minus_v(student):
    """A shipped student is a transformer-only folder of the teacher's size; the stock pipeline with it at one step
    and CFG 1 returns z1 - v(z1, 1), InstaFlow's one-step map, computed here by hand."""
    import nimblediff
    from diffusers import SD3Transformer2DModel

    path = {"instaflow": nimblediff.TINY_DIT_INSTAFLOW, "2rf": nimblediff.TINY_DIT_2RF}[student]
    pipe = StableDiffusion3Pipeline.from_pretrained(nimblediff.TINY_DIT, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    model = SD3Transformer2DModel.from_pretrained(path, dtype=torch.float32)
    sizes = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert sizes(model.config) == sizes(pipe.transformer.config)
    pipe.transformer = model
    z1 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe("a red circle on the left", height=64, width=64, num_inference_steps=1, guidance_scale=1.0,
               sigmas=[1.0], latents=z1.clone(), output_type="latent", max_sequence_length=24).images
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a red circle on the left", None, None,
                                                  do_classifier_free_guidance=False, max_sequence_length=24)
        v = model(z1, timestep=torch.tensor([1000.0]), encoder_hidden_states=embeds, pooled_projections=pooled).sample
    torch.testing.assert_close(out, z1 - v, atol=1e-4, rtol=1e-4)


def test_flash_teacher_target_is_the_stock_pipeline_from_sigma_s(folder):
    """Flash's target from x_s: the stock pipeline's flow Euler with CFG on sigmas s, ..., s/k (LoRA switched off
    while the teacher runs, on again after)."""
    from nimblediff.tiny import flash

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    lora = flash.add_lora(pipe.transformer, 4, flash.DIT_TARGET_MODULES)
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.5)  # a LoRA that changes the output, so forgetting to switch it off shows
    prompt, zs = "a red circle on the left", torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e, p = dit.encode(pipe, [prompt], 24)
        ne, np_ = dit.encode(pipe, [""], 24)
        got = flash.teacher_flow_x0(pipe.transformer, zs, 0.5, e, p, ne, np_, 3.0, 3)
        lora_out = pipe.transformer(zs, timestep=torch.tensor([500.0]), encoder_hidden_states=e,
                                    pooled_projections=p).sample
        base_out = ref.transformer(zs, timestep=torch.tensor([500.0]), encoder_hidden_states=e,
                                   pooled_projections=p).sample
    want = ref(prompt, negative_prompt="", height=64, width=64, guidance_scale=3.0, sigmas=[0.5, 1 / 3, 1 / 6],
               latents=zs.clone(), output_type="latent", max_sequence_length=24).images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (lora_out - base_out).abs().max() > 1e-3  # the adapter is on again after the teacher ran


def test_shipped_dit_flash_lora_recipe_matches_stock_lora_loading():
    """The shipped Flash LoRA through FewStepSD3Pipeline.load_acceleration_lora and its recipe (LCM re-noising on
    1, 0.75, 0.5, 0.25, CFG 1) gives the stock pipeline's load_lora_weights run on those sigmas with
    FlowMatchEuler's stochastic sampling (x0, then fresh noise to the next sigma); the stock SD3 pipeline passes no
    generator to step(), so its noise comes from the global RNG seeded alike. Ours draws from the call's generator:
    the same seed twice gives the same image, another seed another image."""
    import nimblediff
    from diffusers import FlowMatchEulerDiscreteScheduler
    from nimblediff.pipelines.dit import FewStepSD3Pipeline

    kw = dict(text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    stock = StableDiffusion3Pipeline.from_pretrained(nimblediff.TINY_DIT, **kw)
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config, stochastic_sampling=True)
    stock.load_lora_weights(os.path.dirname(nimblediff.TINY_DIT_FLASH_LORA),
                            weight_name=os.path.basename(nimblediff.TINY_DIT_FLASH_LORA))
    ours = FewStepSD3Pipeline.from_pretrained(nimblediff.TINY_DIT, **kw)
    ours.load_acceleration_lora(nimblediff.TINY_DIT_FLASH_LORA, recipe="nimblediff-tiny-dit-flash")
    prompt, z = "a blue square at the top", torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    common = dict(height=64, width=64, latents=z, output_type="latent", max_sequence_length=24)
    torch.manual_seed(7)
    want = stock(prompt, guidance_scale=1.0, sigmas=[1.0, 0.75, 0.5, 0.25], **common).images
    torch.manual_seed(123)    # ours must not read the global RNG
    got = ours(prompt, generator=torch.Generator().manual_seed(7), **common).images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    again = ours(prompt, generator=torch.Generator().manual_seed(7), **common).images
    other = ours(prompt, generator=torch.Generator().manual_seed(8), **common).images
    assert torch.equal(again, got) and (other - got).abs().max() > 1e-2


def test_couples_then_flash_stage_save_a_diffusers_sd3_lora(folder, tmp_path):
    """The flash stage trains after couples (its sigma-1 targets), resumes, and writes a LoRA the stock SD3
    pipeline loads onto every adapted layer."""
    import shutil

    from safetensors.torch import load_file

    from nimblediff.tiny import train_dit

    shutil.copytree(folder, tmp_path / "dit" / "pipeline")
    common = ["--out", str(tmp_path), "--no-progress", "--threads", "1"]
    train_dit.main(["--stage", "couples", "--max-steps", "1", "--batch", "2"] + common)
    train_dit.main(["--stage", "flash", "--max-steps", "2", "--batch", "3"] + common)
    assert torch.load(tmp_path / "flash" / "ckpt.pt", weights_only=True)["step"] == 2
    train_dit.main(["--stage", "flash", "--max-steps", "3", "--batch", "3"] + common)
    assert "resumed at step 2" in (tmp_path / "flash" / "train.log").read_text()
    path = tmp_path / "flash" / "lora" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(path))
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "dit" / "pipeline", text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    assert sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_A" in n) == len(keys) // 2
