"""Train NimbleDiff-Tiny on CPU: `python -m nimblediff.tiny.train --stage vae|unet|flash|all`.

Each stage writes runs/tiny/<stage>/: ckpt.pt (resumable, saved every few minutes), train.log (loss lines) and its
final product (vae/final, unet/pipeline, flash/lora). Each stage is bounded by steps and by wall minutes; a stage whose
product exists is skipped, so `--stage all` can simply be re-run after an interruption.
"""

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data, flash, model, vocab

PRODUCTS = {"vae": "final", "unet": "pipeline", "flash": "lora"}
DEFAULTS = {  # stage: (batch, lr, minutes)
    "vae": (16, 1e-3, 15.0),
    "unet": (48, 5e-4, 90.0),    # ~1.1 s/step on two free cores: ~4,900 steps (the shipped model has 3,121)
    "flash": (16, 1e-3, 25.0),  # 5e-4 left the 4-step student level with plain 4-step LCM after 455 steps
}


def build_parser(stages=("vae", "unet", "flash", "all"), out="runs/tiny", doc=__doc__):
    """The options every training script shares (tiny/train_dit.py adds its own)."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--stage", choices=list(stages), required=True)
    p.add_argument("--out", default=out)
    p.add_argument("--threads", type=int, default=1, help="torch threads; the other core belongs to other work")
    p.add_argument("--minutes", type=float, default=None, help="wall budget per stage (default: per stage)")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--save-minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="Min-SNR-gamma loss weight for the UNet (Hang et al. 2023); 0 turns it off")
    p.add_argument("--arch", choices=sorted(model.ARCHS), default="v1", help="UNet + text encoder size (tiny/model.py)")
    p.add_argument("--p-two", type=float, default=None,
                   help="share of two-shape scenes in UNet batches (default: the data's own, 0.2)")
    p.add_argument("--vae", default=None, help="trained VAE folder for the unet stage (default: <out>/vae/final)")
    p.add_argument("--eval-n", type=int, default=512, help="held-out images for the VAE's final scale and L1")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", action="store_true",
                   help="no training: write the checkpoint's (EMA) weights to <out>/<stage>/snapshot for evaluation")
    return p


def parse_args(argv=None):
    p = build_parser()                  # UNet-stage options of this script (train_dit.py has its own --init)
    p.add_argument("--init", default=None,
                   help="unet stage: start from this pipeline folder's UNet and text encoder (continued training of a "
                        "shipped model; its arch must match --arch) instead of random weights")
    p.add_argument("--split-words", nargs=2, metavar=("A", "B"), default=None,
                   help="unet stage: before training, set the two words' token embeddings to their mean +- "
                        "--split-scale along a random direction (breaks a learned symmetry: the shipped v1 teacher "
                        "drew 'top' and 'bottom' alike, see bench/position_check.py)")
    p.add_argument("--split-scale", type=float, default=0.6)
    return p.parse_args(argv)


class Loop:
    """Step loop with resume, wall budget, periodic atomic checkpoints, tqdm and a loss log."""

    def __init__(self, args, stage, modules, optimizer, extra=None, defaults=DEFAULTS):
        self.args, self.stage, self.modules, self.opt, self.extra = args, stage, modules, optimizer, extra or {}
        self.dir = os.path.join(args.out, stage)
        os.makedirs(self.dir, exist_ok=True)
        batch, lr, minutes = defaults[stage]
        self.batch, self.lr = args.batch or batch, args.lr or lr
        self.budget = 60 * (args.minutes if args.minutes is not None else minutes)
        self.step, self.elapsed, self.losses = 0, 0.0, []
        self._resume()

    @property
    def ckpt(self):
        return os.path.join(self.dir, "ckpt.pt")

    def _resume(self):
        if not os.path.exists(self.ckpt):
            return
        state = torch.load(self.ckpt, weights_only=True)
        for name, m in self.modules.items():
            m.load_state_dict(state["modules"][name])
        self.opt.load_state_dict(state["optimizer"])
        for name, t in self.extra.items():  # e.g. EMA parameter lists
            for dst, src in zip(t, state["extra"][name]):
                dst.copy_(src)
        self.step, self.elapsed = state["step"], state["elapsed"]
        if not self.args.export:  # an export reads the checkpoint of a run that may still be logging here
            self.log(f"resumed at step {self.step}, {self.elapsed / 60:.1f} min elapsed")

    def save(self):
        state = {"modules": {n: m.state_dict() for n, m in self.modules.items()}, "optimizer": self.opt.state_dict(),
                 "extra": {n: [t.detach().clone() for t in ts] for n, ts in self.extra.items()},
                 "step": self.step, "elapsed": self.elapsed}
        torch.save(state, self.ckpt + ".tmp")
        os.replace(self.ckpt + ".tmp", self.ckpt)  # a kill mid-save never leaves a truncated checkpoint

    def log(self, line):
        with open(os.path.join(self.dir, "train.log"), "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    @property
    def progress(self):
        return max(self.step / self.args.max_steps, self.elapsed / self.budget)

    def run(self, step_fn):
        """step_fn(step) -> loss tensor (already backpropagated is not required: we do it here)."""
        if self.args.export:  # read-only: the checkpoint may belong to a run still in progress
            return
        bar = tqdm(total=int(self.budget), initial=int(self.elapsed), unit="s", desc=self.stage,
                   disable=self.args.no_progress, mininterval=5)
        last_save = time.time()
        while self.progress < 1:
            t0 = time.time()
            for g in self.opt.param_groups:  # linear warm-up, then constant (EMA does the annealing)
                g["lr"] = self.lr * min(1.0, (self.step + 1) / 100)
            loss = step_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
            self.opt.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{self.stage}: loss is {loss.item()} at step {self.step}")
            self.after_step()
            self.step += 1
            dt = time.time() - t0
            self.elapsed += dt
            self.losses.append(loss.item())
            bar.update(int(self.elapsed) - bar.n)
            bar.set_postfix(step=self.step, loss=f"{loss.item():.4f}")
            if self.step % self.args.log_every == 0:
                recent = self.losses[-self.args.log_every:]
                self.log(f"step {self.step} loss {sum(recent) / len(recent):.5f} "
                         f"s/step {dt:.2f} elapsed {self.elapsed / 60:.1f} min")
            if time.time() - last_save > 60 * self.args.save_minutes:
                self.save()
                last_save = time.time()
        bar.close()
        self.save()
        self.log(f"done: {self.step} steps, {self.elapsed / 60:.1f} min")

    def after_step(self):
        pass


def batch_seed(args, stage, step):
    """Data seed per (stage, step): a resumed run sees exactly the batches it would have seen."""
    return (args.seed * 1000 + {"vae": 1, "unet": 2, "flash": 3}[stage]) * 10**7 + step


# ---------------------------------------------------------------- stage vae


def train_vae(args):
    vae = model.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    loop = Loop(args, "vae", {"vae": vae}, opt)

    def step_fn(step):
        x, _, _ = data.make_batch(batch_seed(args, "vae", step), loop.batch)  # (B, 3, 64, 64)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps edges sharp, L2 punishes colour shifts; the KL weight only keeps latents bounded (SD uses 1e-6).
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    loop.run(step_fn)
    vae.eval()
    with torch.no_grad():
        x, _, _ = data.make_batch(10**9 + 1, args.eval_n)  # held-out seed
        z = vae.encode(x).latent_dist.sample()
        rec_l1 = F.l1_loss(vae.decode(z).sample.clamp(-1, 1), x).item()
    scale = 1.0 / z.std().item()  # SD's convention: unit-variance latents for the UNet
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(os.path.join(loop.dir, PRODUCTS["vae"]))
    loop.log(f"final: scaling_factor {scale:.5f} held-out recon L1 {rec_l1:.5f} params {model.n_params(vae)}")


# ---------------------------------------------------------------- stage unet


def product_dir(args, loop, product):
    """Where a stage writes its result: the product, or <stage>/snapshot when only exporting a checkpoint."""
    return os.path.join(loop.dir, "snapshot" if args.export else product)


def tokenize(tokenizer, captions):
    # Same call as StableDiffusionPipeline.encode_prompt: pad to model_max_length, no attention mask.
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class EmaLoop(Loop):
    def __init__(self, args, stage, modules, optimizer, params, ema, defaults=DEFAULTS):
        self.params, self.ema = params, ema
        super().__init__(args, stage, modules, optimizer, extra={"ema": ema}, defaults=defaults)

    def after_step(self):
        decay = min(0.999, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)


def snr_weight(alpha_bar, gamma):
    """Min-SNR-gamma weights for an epsilon loss: min(SNR, gamma) / SNR.

    Low-noise steps (high SNR) are where the eps loss is largest and teaches fine texture; capping them leaves the
    gradient to the high-noise steps that decide shape, colour and position. gamma <= 0: plain unweighted loss.
    """
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def load_parts(folder, parts, fits: str):
    """Load a saved pipeline folder's weights into fresh modules, strictly: parts = ((subfolder, module, class), ...).
    `fits` names the option the shapes follow (e.g. "--arch v1"), for the error when they do not. A checkpoint in
    <out>/<stage>, if any, is loaded after this and wins: the folder only sets where step 0 starts."""
    for sub, module, cls in parts:
        path = os.path.join(folder, sub)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--init {folder}: no {sub}/ folder; pass a saved pipeline folder")
        trained = cls.from_pretrained(path, dtype=torch.float32).state_dict()
        try:
            module.load_state_dict(trained)
        except RuntimeError as e:               # missing / unexpected keys or other shapes: another arch
            first = str(e).strip().splitlines()[:2]
            raise ValueError(f"--init {path}: its weights do not fit {fits}: {' '.join(first)}") from None


def init_from(folder, unet, text_encoder, arch="v1"):
    """A trained StableDiffusionPipeline folder's UNet and text encoder into the fresh v1/v2 modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    load_parts(folder, (("unet", unet, UNet2DConditionModel), ("text_encoder", text_encoder, CLIPTextModel)),
               f"--arch {arch}")


def split_words(text_encoder, tokenizer, words, scale, seed=0):
    """Move two words' token embeddings apart: mean +- scale * u, u a unit vector drawn from `seed`.

    Why: training can settle where two words are embedded alike and the UNet ignores their difference, a saddle it
    leaves very slowly, since each side waits for the other. The shipped v1 teacher sits there for 'top' / 'bottom'
    (at chance on them, against 0.95 on left / right); splitting the embeddings gives the UNet a difference to use.
    """
    ids = [tokenizer.convert_tokens_to_ids(w + "</w>") for w in words]
    if len(set(ids)) != 2 or tokenizer.unk_token_id in ids:
        raise ValueError(f"--split-words {' '.join(words)}: need two different words of the vocabulary")
    emb = text_encoder.get_input_embeddings().weight
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(seed))
    u /= u.norm()
    with torch.no_grad():
        mean = (emb[ids[0]] + emb[ids[1]]) / 2
        emb[ids[0]] = mean + scale * u
        emb[ids[1]] = mean - scale * u


def train_unet(args):
    from diffusers import AutoencoderKL

    vae_dir = args.vae or os.path.join(args.out, "vae", PRODUCTS["vae"])
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = vocab.build_tokenizer()
    text_encoder, unet = model.make_text_encoder(len(tokenizer), args.arch), model.make_unet(args.arch)
    if args.init:
        init_from(args.init, unet, text_encoder, args.arch)
    if args.split_words:
        split_words(text_encoder, tokenizer, args.split_words, args.split_scale)
    p_two = data.P_TWO_SHAPES if args.p_two is None else args.p_two
    # Text encoder trained jointly: a random frozen encoder would have to be decoded by the UNet instead.
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.01)
    loop = EmaLoop(args, "unet", {"unet": unet, "text_encoder": text_encoder}, opt, params, ema)
    alphas = model.make_scheduler().alphas_cumprod  # (1000,)
    gen = torch.Generator().manual_seed(args.seed)

    def step_fn(step):
        x, captions, _ = data.make_batch(batch_seed(args, "unet", step), loop.batch, p_two)
        gen.manual_seed(batch_seed(args, "unet", step))
        drop = torch.rand(len(captions), generator=gen) < 0.1  # CFG: learn the unconditional model too
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample(gen) * vae.config.scaling_factor  # (B, 4, 16, 16)
        t = torch.randint(0, 1000, (len(x),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        h = text_encoder(tokenize(tokenizer, captions))[0]  # (B, 24, 64)
        err = (unet(zt, t, h).sample - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
        return (err * snr_weight(alphas[t], args.min_snr)).mean()

    loop.run(step_fn)
    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    pipe = model.make_pipeline(vae, text_encoder, unet, tokenizer)
    pipe.save_pretrained(product_dir(args, loop, PRODUCTS["unet"]))
    if args.export:
        return
    loop.log(f"final: arch {args.arch} p_two {p_two} params unet {model.n_params(unet)} "
             f"text_encoder {model.n_params(text_encoder)}")


# ---------------------------------------------------------------- stage flash


def train_flash(args):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(args.out, "unet", PRODUCTS["unet"]))
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    lora_params = flash.add_lora(pipe.unet)
    opt = torch.optim.AdamW(lora_params, lr=5e-4, weight_decay=0.0)
    loop = Loop(args, "flash", {"lora": flash.LoraParams(pipe.unet)}, opt)
    alphas = pipe.scheduler.alphas_cumprod
    gen = torch.Generator()
    with torch.no_grad():
        uncond = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]  # (1, 24, 64)

    def step_fn(step):
        x, captions, _ = data.make_batch(batch_seed(args, "flash", step), loop.batch)
        gen.manual_seed(batch_seed(args, "flash", step))
        with torch.no_grad():
            z0 = pipe.vae.encode(x).latent_dist.sample(gen) * pipe.vae.config.scaling_factor
            cond = pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]
        return flash.distill_loss(pipe.unet, z0, cond, uncond, alphas, loop.progress, gen)

    loop.run(step_fn)
    flash.save_lora(pipe, product_dir(args, loop, PRODUCTS["flash"]))
    loop.log(f"final: lora params {sum(p.numel() for p in lora_params)}")


STAGES = {"vae": train_vae, "unet": train_unet, "flash": train_flash}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for stage in (["vae", "unet", "flash"] if args.stage == "all" else [args.stage]):
        if args.stage == "all" and os.path.exists(os.path.join(args.out, stage, PRODUCTS[stage])):
            continue  # finished earlier
        torch.manual_seed(args.seed)
        t0 = time.time()
        STAGES[stage](args)
        print(f"stage {stage} finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
