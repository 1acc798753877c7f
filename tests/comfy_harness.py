"""A real ComfyUI for the tests: start a server on a temporary base directory, post API workflows, and run
checks that need comfy and diffusers in one process (the parity checks run under COMFYUI_PYTHON).

As a library (imported by tests/test_comfyui_real.py): `ComfyServer`, `build_model_folder`, `run_parity`.
As a script, under the ComfyUI interpreter:

    python tests/comfy_harness.py build <layout> <folder>            # tiny random SD folder: spec, tiny, tiny-fp16
    python tests/comfy_harness.py parity <comfyui> <pack> <folder>   # prints one JSON line of max abs differences

Nothing here writes into the ComfyUI checkout: the server gets --base-directory (models, custom_nodes, input,
output, temp, user) and an in-memory database.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
EMBEDDED_NAME = "nimblediff-tiny"


# --------------------------------------------------------------------------------------------------- environment
def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    return Path(value) if value else None


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def skip_without_comfyui() -> Path:
    """At a test module's top: skip the module unless COMFYUI_PATH is a ComfyUI checkout (main.py and comfy/)."""
    import pytest

    comfy = comfyui_path()
    if comfy is None or not (comfy / "main.py").is_file() or not (comfy / "comfy").is_dir():
        pytest.skip("real-ComfyUI tests need COMFYUI_PATH pointing at a ComfyUI checkout (main.py and comfy/); "
                    f"got {comfy}", allow_module_level=True)
    return comfy


def skip_without_embedded_dit() -> None:
    """At a test module's top: skip the module unless the pack ships NimbleDiff-Tiny-DiT."""
    import pytest

    from nimblediff.nodes.dit_loaders import EMBEDDED_DIR

    if not (EMBEDDED_DIR / "model_index.json").is_file():
        pytest.skip(f"{EMBEDDED_DIR} is not in the pack", allow_module_level=True)


def script_main(argv: list[str], parity, doc: str) -> None:
    """The script side of a two-sided test module: `python <module> parity <comfyui> <pack>` prints parity()'s
    JSON (run under the ComfyUI interpreter by `script_parity`)."""
    if argv[:1] == ["parity"] and len(argv) == 3:
        print(json.dumps(parity(*argv[1:])))
    else:
        raise SystemExit(doc)


def script_parity(script: Path, comfy: Path) -> dict:
    """Run a test module's script side under COMFYUI_PYTHON and return the JSON it printed last."""
    proc = subprocess.run([comfyui_python(), str(script), "parity", str(comfy), str(PACK_DIR)], capture_output=True,
                          text=True, timeout=1800, cwd=str(PACK_DIR), check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dit_parity_fixture(script: Path):
    """At a two-sided DiT module's pytest side: skip the module without a ComfyUI checkout or the embedded DiT, and
    return its module-scoped `parity` fixture (the script side's JSON, run once under COMFYUI_PYTHON). Assign it to
    the name `parity` in the module."""
    import pytest

    comfy = skip_without_comfyui()
    skip_without_embedded_dit()

    @pytest.fixture(scope="module")
    def parity() -> dict:
        return script_parity(script, comfy)
    return parity


class DiTRig:
    """For a two-sided module's script side (after `_import_pack`): the embedded DiT twice -- ComfyUI's MODEL / CLIP
    from NimbleDiff Diffusers DiT Loader and the stock SD3 pipeline -- with one sampling call on each side (euler,
    `steps`, `cfg`; both return latents in the pipeline's space)."""

    def __init__(self, steps: int, cfg: float, zero_rows: int = 24):
        import torch
        from diffusers import StableDiffusion3Pipeline

        from nimblediff.nodes.dit_loaders import EMBEDDED_CHOICE, NimbleDiffusersDiTLoader, resolve_dit_model

        torch.set_num_threads(1)
        self.steps, self.cfg, self.zero_rows = steps, cfg, zero_rows
        self.model, self.clip, _ = NimbleDiffusersDiTLoader().load(EMBEDDED_CHOICE)
        self.folder = resolve_dit_model(EMBEDDED_CHOICE)
        self.pipe = StableDiffusion3Pipeline.from_pretrained(self.folder, text_encoder_3=None, tokenizer_3=None,
                                                             torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.mm = self.model.model
        self.negative = self.encode("")

    def encode(self, text):
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def comfy_samples(self, m, positive, z, sigmas=None):
        """ComfyUI's euler from noise z: the LATENT samples, in ComfyUI's latent space."""
        import comfy.sample
        import comfy.samplers
        import torch

        if sigmas is None:
            return comfy.sample.sample(m, z, self.steps, self.cfg, "euler", "normal", positive, self.negative,
                                       torch.zeros_like(z), seed=0, disable_pbar=True)
        return comfy.sample.sample_custom(m, z, self.cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                          self.negative, torch.zeros_like(z), disable_pbar=True, seed=0)

    def comfy_run(self, m, positive, z, sigmas=None):
        return self.mm.process_latent_in(self.comfy_samples(m, positive, z, sigmas))   # the pipeline's latent space

    def edit_pipeline(self):
        """DiTEditPipeline on the pipeline's components, and its trailing flow sigmas of `steps` (both hosts edit
        along these)."""
        import torch

        from nimblediff.pipelines.dit_edit import DiTEditPipeline

        pipe = DiTEditPipeline(**self.pipe.components)
        pipe.set_progress_bar_config(disable=True)
        return pipe, torch.tensor(pipe._sigmas(pipe.editing_param(), self.steps, 1.0))

    def pipe_run(self, prompt, z, **kw):
        import torch

        with torch.no_grad():
            return self.pipe(prompt, height=64, width=64, guidance_scale=self.cfg, latents=z.clone(),
                             output_type="latent", max_sequence_length=self.zero_rows,
                             **({"num_inference_steps": self.steps} | kw)).images


def max_diff(a, b) -> float:
    """Largest absolute difference of two tensors; inf when their shapes differ."""
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(*args: str, timeout: float = 600) -> dict:
    """Run this file under COMFYUI_PYTHON; its last stdout line is JSON."""
    proc = subprocess.run([comfyui_python(), str(HERE), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(PACK_DIR), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_model_folder(folder: Path, layout: str) -> Path:
    run_script("build", layout, str(folder))
    return folder


def run_parity(comfy: Path, folder: Path) -> dict:
    return run_script("parity", str(comfy), str(PACK_DIR), str(folder))


# ---------------------------------------------------------------------------------------------------- the server
class ComfyServer:
    """`python main.py` on 127.0.0.1:<free port> with a temporary base directory holding this pack."""

    def __init__(self, comfy: Path, base: Path, python: str | None = None):
        self.comfy, self.base, self.python = Path(comfy), Path(base), python or comfyui_python()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None

    def prepare(self) -> None:
        """custom_nodes/nimblediff -> this pack; empty model folders the workflows look in."""
        for sub in ("custom_nodes", "models/diffusers", "models/loras", "input", "output", "temp", "user", "frontend"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "nimblediff"
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)

    def command(self) -> list[str]:
        flags = (self.comfy / "comfy" / "cli_args.py").read_text(encoding="utf-8")
        cmd = [self.python, str(self.comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base)]
        optional = [("--disable-auto-launch", []), ("--database-url", ["sqlite:///:memory:"]),
                    # the API needs no web frontend; an empty root avoids requiring comfyui-frontend-package
                    ("--front-end-root", [str(self.base / "frontend")]), ("--disable-api-nodes", [])]
        for flag, values in optional:
            if f'"{flag}"' in flags:
                cmd += [flag, *values]
        if '"--base-directory"' not in flags:  # older ComfyUI: no base directory, so no custom_nodes there either
            raise RuntimeError(f"{self.comfy} has no --base-directory option; these tests need ComfyUI >= 0.3.30")
        return cmd

    def start(self, timeout: float = 240) -> None:
        self.prepare()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # /prompt answers 400 with the validation errors as JSON
            raise RuntimeError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from exc

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """POST /prompt and poll /history until it finishes; returns the history entry. Raises on error."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "nimblediff-tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt {prompt_id} failed: {json.dumps(errors)[:4000]}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log()[-6000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")


def output_images(entry: dict) -> list[dict]:
    return [img for node in entry.get("outputs", {}).values() for img in node.get("images", [])]


# ------------------------------------------------------------------------------- script side (COMFYUI_PYTHON)
def _tokenizer(max_length: int):
    """A CLIP BPE tokenizer built in memory: specials, byte characters (plain and word-final), a few words."""
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for word in ("photo", "cat", "red", "square"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append((prefix, piece))
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def _build(layout: str, folder: str) -> dict:
    """layout "spec": the loader brief's folder (UNet 32/64 GroupNorm 8, VAE 32/64, CLIP hidden 32, 77 tokens);
    "tiny": NimbleDiff-Tiny's shape (UNet 64/128/128 GroupNorm 16 with 4 heads, VAE /4 GroupNorm 8 without
    mid attention, 24-token CLIP of width 64), random weights, its own VAE scaling factor; "tiny-fp16" saves it in
    fp16 as the shipped model is."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    if layout == "spec":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=8, sample_size=16)
        vae = AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1))
        tokenizer = _tokenizer(77)
    elif layout in ("tiny", "tiny-fp16"):
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=16,
                                    cross_attention_dim=64, attention_head_dim=4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
                            mid_block_add_attention=False, scaling_factor=0.9)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=24, projection_dim=64,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        tokenizer = _tokenizer(24)
    else:
        raise SystemExit(f"layout {layout!r}: use 'spec', 'tiny' or 'tiny-fp16'")
    # random init leaves the UNet's output convolution at zero; perturb every weight so parity is not vacuous
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=ddim,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if layout == "tiny-fp16":  # as NimbleDiff-Tiny ships (tiny/package.py)
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return {"folder": folder}


def _import_pack(comfy: str, pack: str):
    """comfy from the checkout (as main.py sees it) and this pack as package `nimblediff`, the way ComfyUI loads it."""
    import importlib.util

    sys.argv = sys.argv[:1]  # comfy.cli_args parses argv only when enabled; keep it clean anyway
    sys.path.insert(0, comfy)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: fp32 on the CPU, read when model_management is imported
    spec = importlib.util.spec_from_file_location("nimblediff", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nimblediff"] = module
    spec.loader.exec_module(module)
    from nimblediff.nodes import loaders

    return loaders


def _parity(comfy: str, pack: str, folder: str) -> dict:
    """Max abs differences between ComfyUI objects built by our loader and diffusers on the same folder."""
    import torch

    loaders = _import_pack(comfy, pack)
    from diffusers import StableDiffusionPipeline

    model, clip, vae = loaders.load_sd15_folder(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    out = {}

    # 1. noise schedule: sigma_t = sqrt((1 - abar_t) / abar_t) from the diffusers scheduler's betas
    ms = model.model.model_sampling
    abar = pipe.scheduler.alphas_cumprod.double()
    ref_sigmas = ((1 - abar) / abar).sqrt()
    out["sigmas_rel"] = float(((ms.sigmas.double() - ref_sigmas).abs() / ref_sigmas).max())

    # 2. denoiser: ComfyUI's x0 prediction at (x, sigma) vs x - sigma * eps from diffusers' UNet at c_in * x
    unet = pipe.unet
    ch, size = unet.config.in_channels, 8
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    worst = 0.0
    for t in (999, 500, 20):
        sigma = ms.sigmas[t].float()
        x = torch.randn(2, ch, size, size, generator=gen) * (1 + sigma**2).sqrt()
        with torch.no_grad():
            ours = model.model.apply_model(x, sigma.expand(2), c_crossattn=ctx).float()
            eps = unet(x / (1 + sigma**2).sqrt(), torch.tensor([t, t]), encoder_hidden_states=ctx).sample
        if pipe.scheduler.config.prediction_type == "v_prediction":
            a = 1 / (1 + sigma**2).sqrt()
            ref = a * x * a - (sigma * a) * eps  # x0 = alpha * x_t - sigma_vp * v with x_t = a * x
        else:
            ref = x - sigma * eps
        worst = max(worst, float((ours - ref).abs().max()))
        out["denoised_scale"] = max(out.get("denoised_scale", 0.0), float(ref.abs().max()))
    out["unet"] = worst

    # 3. text encoder: ComfyUI's CLIPTextEncode conditioning vs the pipeline's prompt embeddings
    prompt = "a red square"  # in the toy test vocabulary and in NimbleDiff-Tiny's grammar (both closed)
    cond = clip.encode_from_tokens(clip.tokenize(prompt)).float()
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0]
    out["clip_shape"] = [list(cond.shape), list(ref.shape)]
    out["clip"] = float((cond - ref).abs().max()) if cond.shape == ref.shape else float("inf")
    clip32 = loaders.build_clip(Path(folder), model_options={"dtype": torch.float32})  # ComfyUI's default is fp16
    cond32 = clip32.encode_from_tokens(clip32.tokenize(prompt)).float()
    out["clip_fp32"] = float((cond32 - ref).abs().max()) if cond32.shape == ref.shape else float("inf")

    # 4. VAE decode (ComfyUI returns NHWC in [0, 1]) and encode (ComfyUI returns the posterior mean)
    z = torch.randn(1, vae.latent_channels, 8, 8, generator=gen)
    with torch.no_grad():
        img = vae.decode(z).float()
        ref_img = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    out["vae_decode"] = float((img.reshape(ref_img.shape) - ref_img).abs().max())
    pixels = torch.rand(1, 32, 32, 3, generator=gen)
    with torch.no_grad():
        lat = vae.encode(pixels).float()
        ref_lat = pipe.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    out["vae_encode"] = float((lat - ref_lat).abs().max())
    out["scale_factor"] = [model.model.latent_format.scale_factor, pipe.vae.config.scaling_factor]

    # 5. our unet_config vs ComfyUI's own shape-based detection on the converted weights (heads aside: shapes
    #    cannot tell them, and GroupNorm groups are not in ComfyUI's config at all)
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(model.model.diffusion_model.state_dict(), "")
    keys = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks", "transformer_depth",
            "transformer_depth_output", "transformer_depth_middle", "context_dim", "use_linear_in_transformer")
    ours = model.model.model_config.unet_config
    out["config_mismatch"] = {k: [ours.get(k), detected.get(k)] for k in keys if ours.get(k) != detected.get(k)}
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["build"] and len(argv) == 3:
        print(json.dumps(_build(argv[1], argv[2])))
    elif argv[:1] == ["parity"] and len(argv) == 4:
        print(json.dumps(_parity(*argv[1:])))
    else:
        raise SystemExit(__doc__)


def copy_loras(dest: Path) -> list[str]:
    """The pack's shipped LoRA files (weights/tiny/*.safetensors) into a models/loras folder."""
    names = []
    for path in sorted((PACK_DIR / "weights" / "tiny").glob("*.safetensors")):
        shutil.copy2(path, dest / path.name)
        names.append(path.name)
    return names


if __name__ == "__main__":
    main(sys.argv[1:])
