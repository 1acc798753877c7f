"""Train NimbleDiff-Tiny-DiT on CPU: `python -m nimblediff.tiny.train_dit --stage dit [--out runs/tiny-dit]`.

Stage dit: rectified flow (x_t = (1 - s) x0 + s eps, the transformer predicts eps - x0, s logit-normal as in SD3),
the two CLIP encoders trained jointly, 10% empty captions for CFG, EMA 0.999 shipped. Same resumable loop, wall budget
and data seeds scheme as tiny/train.py (data seeds k = 4, 5, 6 for dit / reflow / distill, disjoint from the
held-out set's k = 100, see tiny/heldout.py).
"""

import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from . import data, dit, vocab
from .train import EmaLoop, build_parser

STAGE_K = {"dit": 4, "reflow": 5, "distill": 6}
DEFAULTS = {"dit": (48, 5e-4, 90.0)}
SHIPPED_VAE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "tiny", "nimblediff-tiny", "vae")


def batch_seed(args, stage, step):
    return (args.seed * 1000 + STAGE_K[stage]) * 10**7 + step


def train_dit(args):
    vae = AutoencoderKL.from_pretrained(args.vae or SHIPPED_VAE, dtype=torch.float32).eval().requires_grad_(False)
    tok = vocab.build_tokenizer()
    te1, te2 = dit.make_text_encoder(len(tok)), dit.make_text_encoder(len(tok))
    transformer = dit.make_transformer(args.layers)
    pipe = dit.make_pipeline(vae, te1, te2, transformer, tok)
    params = [p for m in (transformer, te1, te2) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.01)
    loop = EmaLoop(args, "dit", {"transformer": transformer, "text_encoder": te1, "text_encoder_2": te2}, opt,
                   params, ema, defaults=DEFAULTS)
    p_two = data.P_TWO_SHAPES if args.p_two is None else args.p_two
    gen = torch.Generator()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def step_fn(step):
        seed = batch_seed(args, "dit", step)
        x, captions, _ = data.make_batch(seed, loop.batch, p_two)
        gen.manual_seed(seed)
        drop = torch.rand(len(captions), generator=gen) < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop)]
        rows = int(np.random.default_rng(seed).choice(dit.ZERO_ROWS, p=dit.ZERO_ROWS_P))
        with torch.no_grad():
            z0 = (vae.encode(x).latent_dist.sample(gen) - shift) * scale  # (B, 4, 16, 16)
        s = dit.logit_normal(len(x), gen).view(-1, 1, 1, 1)
        eps = torch.randn(z0.shape, generator=gen)
        zt = (1 - s) * z0 + s * eps
        embeds, pooled = dit.encode(pipe, captions, rows)
        v = transformer(hidden_states=zt, timestep=s.flatten() * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
        return (v - (eps - z0)).pow(2).mean()

    loop.run(step_fn)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    pipe.save_pretrained(os.path.join(loop.dir, "pipeline"))
    n = sum(p.numel() for p in transformer.parameters())
    loop.log(f"final: layers {args.layers} p_two {p_two} params transformer {n} "
             f"text encoders {sum(p.numel() for p in te1.parameters()) * 2}")


STAGES = {"dit": train_dit}


def parse_args(argv=None):
    p = build_parser(stages=STAGES, out="runs/tiny-dit", doc=__doc__)
    p.add_argument("--layers", type=int, default=8, help="joint transformer blocks")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.arch != "v1":
        raise SystemExit("--arch is for tiny/train.py's UNet; the DiT's size is --layers")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    STAGES[args.stage](args)
    print(f"stage {args.stage} finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
