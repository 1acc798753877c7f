"""NimbleDiff-Tiny-DiT's layout in a real ComfyUI through NimbleDiff Diffusers DiT Loader, against the stock diffusers
StableDiffusion3Pipeline on the same folder (random weights; 3 joint blocks of width 128 = ComfyUI depth 2 and 4 heads
of 32, as the trained model's 8 blocks):

- the CLIP's conditioning equals pipe.encode_prompt(max_sequence_length=24) and the MODEL's denoised prediction
  equals x - sigma * v of the pipeline's transformer (fp32, <= 1e-4);
- ComfyUI's own mmdit_to_diffusers table maps the loaded MODEL's weights back onto the folder's exactly, except the
  pre-only adaLN swap, which that table puts on block depth - 1 while ComfyUI's MMDiT makes block num_blocks - 1
  pre-only (they differ when num_blocks != depth, as in NimbleDiff-Tiny-DiT: 8 blocks, depth 2);
- KSampler's path (comfy.sample.sample: euler, "normal" schedule) gives the pipeline's FlowMatchEuler latents at CFG 1
  and 5 (<= 1e-3), and the decoded images agree;
- the shipped workflow runs end to end in a ComfyUI server; bad inputs fail with messages naming both sides.

    COMFYUI_PATH=/tmp/ComfyUI COMFYUI_PYTHON=/tmp/comfyvenv/bin/python \
        python -m pytest tests/comfyui/test_tiny_dit_real.py

The comparisons run in one process under COMFYUI_PYTHON (this file as a script: `python <this file> parity <comfyui>
<pack> <folder>`), the server as in tests/test_comfyui_real.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
import comfy_harness  # noqa: E402
from comfy_harness import max_diff  # noqa: E402

PROMPT = "a red circle on the left"
STEPS, SIZE, ZERO_ROWS = 25, 64, 24


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _build(folder: str, layers: int = 3) -> dict:
    """A random NimbleDiff-Tiny-DiT-shaped folder (tiny/dit.py's recipe with `layers` joint blocks), every weight
    perturbed so that no zero-initialised layer makes a comparison vacuous."""
    import torch
    from diffusers import AutoencoderKL
    from nimblediff.tiny import dit, vocab

    torch.manual_seed(0)
    tok = vocab.build_tokenizer()
    vae = AutoencoderKL(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=64, mid_block_add_attention=False, scaling_factor=0.9)
    pipe = dit.make_pipeline(vae, dit.make_text_encoder(len(tok)), dit.make_text_encoder(len(tok)),
                             dit.make_transformer(num_layers=layers), tok)
    with torch.no_grad():
        for module in (pipe.transformer, pipe.vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe.save_pretrained(folder)
    return {"folder": folder}


def _parity(comfy: str, pack: str, folder: str) -> dict:
    import torch

    comfy_harness._import_pack(comfy, pack)
    import comfy.model_detection
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    from diffusers import StableDiffusion3Pipeline
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes import dit_loaders

    torch.set_num_threads(1)
    model, clip, vae = dit_loaders.load_dit_folder(folder, clip_options={"dtype": torch.float32})
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    out, gen = {}, torch.Generator().manual_seed(0)

    # 1. conditioning: our CLIP vs the pipeline's prompt embeddings without T5 (24 zero rows)
    def ours(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return cond.float(), pooled.float()

    def theirs(text):
        with torch.no_grad():
            e, _, p, _ = pipe.encode_prompt(text, text, None, do_classifier_free_guidance=False,
                                            max_sequence_length=ZERO_ROWS)
        return e, p

    (cond, pooled), (ref_cond, ref_pooled) = ours(PROMPT), theirs(PROMPT)
    out["cond_shape"] = [list(cond.shape), list(ref_cond.shape)]
    out["cond"], out["pooled"] = max_diff(cond, ref_cond), max_diff(pooled, ref_pooled)
    out["cond_empty"] = max(max_diff(a, b) for a, b in zip(ours(""), theirs("")))

    # 2. denoiser: ComfyUI's x0 at (x, sigma) vs x - sigma * v of the pipeline's transformer at t = 1000 sigma
    mm = model.model
    worst, scale = 0.0, 0.0
    for sigma in (1.0, 0.55, 0.08):
        x = torch.randn(2, 4, 16, 16, generator=gen)
        s = torch.full((2,), sigma)
        with torch.no_grad():
            got = mm.apply_model(x, s, c_crossattn=ref_cond.expand(2, -1, -1), y=ref_pooled.expand(2, -1)).float()
            v = pipe.transformer(x, timestep=s * 1000, encoder_hidden_states=ref_cond.expand(2, -1, -1),
                                 pooled_projections=ref_pooled.expand(2, -1)).sample
        worst, scale = max(worst, max_diff(got, x - sigma * v)), max(scale, float((x - sigma * v).abs().max()))
    out["denoised"], out["denoised_scale"] = worst, scale

    # 2b. a student's transformer (same size, other weights) in place of the folder's: the MODEL follows it
    import tempfile

    from diffusers import SD3Transformer2DModel

    student = SD3Transformer2DModel.from_config(pipe.transformer.config)
    student.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in pipe.transformer.state_dict().items()})
    with tempfile.TemporaryDirectory() as tdir:
        student.save_pretrained(tdir)
        s_model = dit_loaders.load_dit_folder(folder, clip_options={"dtype": torch.float32}, transformer=tdir)[0]
    x, s = torch.randn(2, 4, 16, 16, generator=gen), torch.full((2,), 0.7)
    with torch.no_grad():
        got = s_model.model.apply_model(x, s, c_crossattn=ref_cond.expand(2, -1, -1), y=ref_pooled.expand(2, -1))
        kw = dict(timestep=s * 1000, encoder_hidden_states=ref_cond.expand(2, -1, -1),
                  pooled_projections=ref_pooled.expand(2, -1))
        want, teacher = x - 0.7 * student(x, **kw).sample, x - 0.7 * pipe.transformer(x, **kw).sample
    out["student_denoised"], out["student_vs_teacher"] = max_diff(got.float(), want), max_diff(want, teacher)

    # 3. ComfyUI's own key table (comfy.utils.mmdit_to_diffusers) maps the MODEL's weights back onto the folder's
    ref_sd = pipe.transformer.state_dict()
    comfy_sd = mm.diffusion_model.state_dict()
    table = comfy.utils.mmdit_to_diffusers(mm.model_config.unet_config)
    back, used = {}, set()
    for name, target in table.items():
        key, offset, fn = (target, None, None) if isinstance(target, str) else (target + (None,))[:3]
        if key not in comfy_sd:
            continue
        t = comfy_sd[key]
        if offset is not None:
            t = t.narrow(offset[0], offset[1], offset[2])
        back[name] = fn(t) if fn is not None else t
        used.add(key)
    out["keys_not_reached"] = sorted(set(ref_sd) - set(back))[:8]
    out["comfy_keys_unmapped"] = sorted(set(comfy_sd) - used)[:8]
    differ = sorted(k for k in ref_sd if k in back and max_diff(back[k], ref_sd[k]) > 0)
    out["weights_back_differ"] = differ
    out["weights_back"] = max(max_diff(back[k], ref_sd[k]) for k in ref_sd if k in back and k not in differ)
    out["depth_blocks"] = [mm.model_config.unet_config["depth"], mm.model_config.unet_config["num_blocks"]]
    detected = comfy.model_detection.detect_unet_config(comfy_sd, "")
    ours_cfg = mm.model_config.unet_config
    out["config_mismatch"] = {k: [ours_cfg.get(k), v] for k, v in detected.items() if ours_cfg.get(k) != v}

    # 4. the schedule: KSampler's "normal" sigmas vs FlowMatchEulerDiscreteScheduler's for STEPS steps
    sigmas = comfy.samplers.calculate_sigmas(mm.model_sampling, "normal", STEPS)
    pipe.scheduler.set_timesteps(STEPS)
    out["sigmas"] = max_diff(sigmas, pipe.scheduler.sigmas)

    # 5. sampling: comfy.sample.sample (KSampler's path) vs the pipeline at CFG 1 and 5, same starting noise
    negative = ours("")
    for cfg in (1.0, 5.0):
        z = torch.randn(1, 4, 16, 16, generator=gen)
        samples = comfy.sample.sample(model, z, STEPS, cfg, "euler", "normal", [[cond, {"pooled_output": pooled}]],
                                      [[negative[0], {"pooled_output": negative[1]}]], torch.zeros_like(z),
                                      seed=0, disable_pbar=True)
        with torch.no_grad():
            ref = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=cfg,
                       latents=z.clone(), output_type="latent", max_sequence_length=ZERO_ROWS).images
            img = vae.decode(samples).float()           # (1, H, W, 3) in [0, 1]
            ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
        ref_img = (ref_img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        out[f"latents_cfg{cfg:g}"] = max_diff(mm.process_latent_in(samples), ref)
        out[f"latents_scale_cfg{cfg:g}"] = float(ref.abs().max())
        out[f"image_cfg{cfg:g}"] = max_diff(img.reshape(ref_img.shape), ref_img)

    # 6. latents the DiT cannot patchify: odd side, larger than the position table
    out["bad_sizes"] = {}
    for shape in ((1, 4, 17, 16), (1, 4, 40, 40)):
        try:
            mm.apply_model(torch.zeros(shape), torch.ones(1), c_crossattn=ref_cond, y=ref_pooled)
            out["bad_sizes"][str(shape[2:])] = "no error"
        except InvalidParameterError as exc:
            out["bad_sizes"][str(shape[2:])] = str(exc)
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["build"] and len(argv) in (3, 4):
        comfy_harness._import_pack(argv[1], str(comfy_harness.PACK_DIR))
        print(json.dumps(_build(argv[2], *(int(a) for a in argv[3:]))))
    elif argv[:1] == ["parity"] and len(argv) == 4:
        print(json.dumps(_parity(*argv[1:])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
else:  # ------------------------------------------------------------------------------------- pytest side
    import pytest

    pytestmark = pytest.mark.comfyui
    COMFY = comfy_harness.skip_without_comfyui()
    from nimblediff.nodes.dit_loaders import EMBEDDED_CHOICE, EMBEDDED_DIR, EMBEDDED_NAME

    def _script(*args: str, timeout: float = 900) -> dict:
        proc = subprocess.run([comfy_harness.comfyui_python(), str(HERE), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=str(comfy_harness.PACK_DIR), check=False)
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    @pytest.fixture(scope="module")
    def base(tmp_path_factory) -> Path:
        """models/diffusers with: the tiny DiT (the shipped folder when present, else a random one under the name
        the embedded entry falls back to), a DiT folder without text_encoder_2 weights, a UNet folder."""
        base = tmp_path_factory.mktemp("comfy_dit_base")
        root = base / "models" / "diffusers"
        root.mkdir(parents=True)
        random = root / "random-tiny-dit"
        _script("build", str(COMFY), str(random))
        if not (EMBEDDED_DIR / "model_index.json").is_file():
            shutil.copytree(random, root / EMBEDDED_NAME)
        broken = shutil.copytree(random, root / "dit-without-text-encoder-2")
        (broken / "text_encoder_2" / "model.safetensors").unlink()
        comfy_harness.build_model_folder(root / "unet-sd", "spec")
        return base

    @pytest.fixture(scope="module", params=["random", "shipped"])
    def parity(request, base) -> dict:
        """The random 3-block folder, and the trained NimbleDiff-Tiny-DiT (8 blocks, fp16 on disk) once it ships."""
        if request.param == "shipped" and not (EMBEDDED_DIR / "model_index.json").is_file():
            pytest.skip(f"{EMBEDDED_DIR} is not in the pack yet")
        folder = base / "models" / "diffusers" / "random-tiny-dit" if request.param == "random" else EMBEDDED_DIR
        return _script("parity", str(COMFY), str(comfy_harness.PACK_DIR), str(folder))

    def test_clip_gives_the_pipelines_prompt_embeddings(parity):
        assert parity["cond_shape"] == [[1, 48, 128], [1, 48, 128]]
        assert parity["cond"] <= 1e-4 and parity["pooled"] <= 1e-4 and parity["cond_empty"] <= 1e-4, parity

    def test_denoised_equals_x_minus_sigma_v_of_the_pipelines_transformer(parity):
        assert parity["denoised"] <= 1e-4 and parity["denoised_scale"] > 1.0, parity

    def test_a_students_transformer_replaces_the_folders(parity):
        assert parity["student_denoised"] <= 1e-4 and parity["student_vs_teacher"] > 1e-2, parity

    def test_comfyuis_own_key_table_maps_the_model_back_onto_the_folder(parity):
        assert parity["keys_not_reached"] == [] and parity["comfy_keys_unmapped"] == [], parity
        depth, blocks = parity["depth_blocks"]
        assert parity["weights_back"] == 0.0 and depth == 2 and blocks in (3, 8)
        # ComfyUI's table swaps block depth - 1 = 1 (not pre-only) and not the last block (pre-only): only those differ
        assert parity["weights_back_differ"] == [f"transformer_blocks.{b}.norm1_context.linear.{e}"
                                                 for b in (1, blocks - 1) for e in ("bias", "weight")], parity
        # ComfyUI's detection reads everything but the block and head counts from shapes (hidden = 64 x depth)
        assert parity["config_mismatch"] == {}, parity

    @pytest.mark.parametrize("cfg", ["1", "5"])
    def test_ksampler_matches_the_pipelines_flow_match_euler_run(parity, cfg):
        assert parity["sigmas"] <= 1e-6
        assert parity[f"latents_cfg{cfg}"] <= 1e-3 and parity[f"latents_scale_cfg{cfg}"] > 0.5, parity
        assert parity[f"image_cfg{cfg}"] <= 1e-3, parity

    def test_a_latent_the_dit_cannot_patchify_is_refused(parity):
        odd, big = parity["bad_sizes"]["(17, 16)"], parity["bad_sizes"]["(40, 40)"]
        assert "patch_size 2" in odd and "16x17" in odd, odd
        assert "pos_embed_max_size 16" in big and "32x32" in big, big

    # ---- the server: the shipped workflow end to end, bad folders in workflows
    @pytest.fixture(scope="module")
    def server(base):
        srv = comfy_harness.ComfyServer(COMFY, base)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()

    def _workflow() -> dict:
        return json.loads((comfy_harness.PACK_DIR / "workflows" / "api" / "nimblediff_tiny_dit_t2i.json").read_text())

    def test_shipped_workflow_runs_end_to_end(server, base):
        from PIL import Image

        info = server.get("/object_info/NimbleDiffusersDiTLoader")["NimbleDiffusersDiTLoader"]
        choices = info["input"]["required"]["model"][0]
        assert choices[0] == EMBEDDED_CHOICE and "random-tiny-dit" in choices and "unet-sd" not in choices
        entry = server.run_prompt(_workflow())
        images = comfy_harness.output_images(entry)
        assert len(images) == 4
        with Image.open(base / "output" / images[0].get("subfolder", "") / images[0]["filename"]) as img:
            assert img.size == (SIZE, SIZE)

    @pytest.mark.parametrize("case, model, size, expected", [
        ("unet folder", "unet-sd", SIZE, ["StableDiffusionPipeline", "NimbleDiff Diffusers Checkpoint Loader",
                                          "StableDiffusion3Pipeline"]),
        ("missing component", "dit-without-text-encoder-2", SIZE, ["text_encoder_2", "missing"]),
        ("size", EMBEDDED_CHOICE, 68, ["cannot be patchified", "patch_size 2", "68x68"]),
        ("unknown word", EMBEDDED_CHOICE, SIZE, ["outside this model's vocabulary", "dragon", "valid words"]),
    ])
    def test_bad_input_fails_with_a_message_naming_both_sides(server, case, model, size, expected):
        wf = _workflow()
        loader = next(k for k, n in wf.items() if n["class_type"] == "NimbleDiffusersDiTLoader")
        latent = next(k for k, n in wf.items() if n["class_type"] == "NimbleEmptyLatent")
        wf[loader]["inputs"]["model"] = model
        wf[latent]["inputs"].update(width=size, height=size)
        if case == "unknown word":  # the closed vocabulary: a word the encoders never saw is refused, not spelled out
            text = next(k for k, n in wf.items() if n["class_type"] == "CLIPTextEncode" and n["inputs"]["text"])
            wf[text]["inputs"]["text"] = "a red dragon on the left"
        if case == "unet folder":  # not in the dropdown (no transformer/): ComfyUI's validation refuses it first
            with pytest.raises(RuntimeError, match="unet-sd"):
                server.run_prompt(wf)
            from nimblediff.errors import InvalidParameterError
            from nimblediff.nodes.dit_loaders import check_dit_folder

            with pytest.raises(InvalidParameterError) as exc:
                check_dit_folder(server.base / "models" / "diffusers" / model)
            message = str(exc.value)
        else:
            with pytest.raises(RuntimeError) as exc:
                server.run_prompt(wf)
            message = str(exc.value)
        assert all(e in message for e in expected), message
