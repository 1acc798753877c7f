"""Train NimbleDiff-Tiny-DiT and its InstaFlow student on CPU:
`python -m nimblediff.tiny.train_dit --stage dit|couples|reflow|distill|flash [--out runs/tiny-dit]`.

Stage dit: rectified flow (x_t = (1 - s) x0 + s eps, the transformer predicts eps - x0, s logit-normal as in SD3),
the two CLIP encoders trained jointly, 10% empty captions for CFG, EMA 0.999 shipped. Same resumable loop, wall budget
and data seeds scheme as tiny/train.py (data seeds k = 4, 5, 6 for dit / reflow / distill, disjoint from the
held-out set's k = 100, see tiny/heldout.py).

InstaFlow (Liu et al. 2024), in three more stages, each resumable:
- couples: noise z1 paired with the teacher's own ODE sample z0 from it (flow Euler, CFG), in shards;
- reflow: 2-rectified flow: the teacher's transformer retrained on straight lines between each couple, which
  straightens the paths so few steps follow them (text encoders frozen: the student keeps the teacher's);
- distill: from the 2-RF model, one step: z1 - v(z1, 1) regressed onto z0.
The students bake CFG in (couples are guided), so they run at guidance 1.

Stage flash: Flash Diffusion (tiny/flash.py) into a LoRA on the teacher for 4 flow-Euler steps at guidance 1; its
sigma-1 targets are the couples, so it runs after the couples stage.

Stage clear: CLEAR (tiny/clear.py): local-window attention (--radius) with a LoRA on the attention projections,
distilled from the full-attention teacher (--teacher, default <out>/dit/pipeline) on the couples' samples.
"""

import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from . import clear, data, dit, flash, vocab
from .train import EmaLoop, Loop, build_parser, load_parts, product_dir

STAGE_K = {"dit": 4, "reflow": 5, "distill": 6, "flash": 7, "clear": 8}
DEFAULTS = {"dit": (48, 5e-4, 90.0), "couples": (48, 0.0, 30.0), "reflow": (48, 2e-4, 45.0),
            "distill": (48, 1e-4, 30.0), "flash": (24, 1e-3, 50.0), "clear": (16, 1e-3, 28.0)}
COUPLE_STEPS, COUPLE_CFG = 16, dit.CFG
SHIPPED_VAE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "tiny", "nimblediff-tiny", "vae")


def batch_seed(args, stage, step):
    return (args.seed * 1000 + STAGE_K[stage]) * 10**7 + step


def warm_start(folder, transformer, te1, te2):
    """Start from a shipped folder's weights (checkpoints do not outlive a session; the shipped EMA weights do).
    The optimizer starts fresh, so the warm-up applies again."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    load_parts(folder, (("transformer", transformer, SD3Transformer2DModel),
                        ("text_encoder", te1, CLIPTextModelWithProjection),
                        ("text_encoder_2", te2, CLIPTextModelWithProjection)), "--layers")


def train_dit(args):
    vae = AutoencoderKL.from_pretrained(args.vae or SHIPPED_VAE, dtype=torch.float32).eval().requires_grad_(False)
    tok = vocab.build_tokenizer()
    te1, te2 = dit.make_text_encoder(len(tok)), dit.make_text_encoder(len(tok))
    transformer = dit.make_transformer(args.layers)
    if args.init:
        warm_start(args.init, transformer, te1, te2)
    pipe = dit.make_pipeline(vae, te1, te2, transformer, tok)
    params = [p for m in (transformer, te1, te2) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.01)
    loop = EmaLoop(args, "dit", {"transformer": transformer, "text_encoder": te1, "text_encoder_2": te2}, opt,
                   params, ema, defaults=DEFAULTS)
    if args.init and loop.step == 0:  # data seeds go on where the shipped run stopped: no batch is seen twice
        loop.step = args.init_steps
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
    pipe.save_pretrained(product_dir(args, loop, "pipeline"))
    if args.export:
        return
    n = sum(p.numel() for p in transformer.parameters())
    loop.log(f"final: layers {args.layers} p_two {p_two} params transformer {n} "
             f"text encoders {sum(p.numel() for p in te1.parameters()) * 2}")


def load_teacher(args):
    from diffusers import StableDiffusion3Pipeline

    folder = getattr(args, "teacher", None) or os.path.join(args.out, "dit", "pipeline")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval().requires_grad_(False)
    return pipe


def make_couples(args):
    """Shards runs/tiny-dit/couples/shard_XXXX.pt of {z1, z0, captions}; a restart continues at the next shard."""
    pipe = load_teacher(args)
    out = os.path.join(args.out, "couples")
    os.makedirs(out, exist_ok=True)
    batch, _, minutes = DEFAULTS["couples"]
    batch, budget, t_start = args.batch or batch, 60 * (args.minutes or minutes), time.time()
    p_two = data.P_TWO_SHAPES if args.p_two is None else args.p_two
    step = len([f for f in os.listdir(out) if f.startswith("shard_")])
    while time.time() - t_start < budget and step < args.max_steps:
        seed = batch_seed(args, "reflow", step)
        _, captions, _ = data.make_batch(seed, batch, p_two)
        gen = torch.Generator().manual_seed(seed)
        z1 = torch.randn(batch, 4, 16, 16, generator=gen)
        with torch.no_grad():
            e, p = dit.encode(pipe, captions, 24)
            ne, np_ = dit.encode(pipe, [""] * batch, 24)
        z0 = dit.flow_euler_cfg(pipe.transformer, z1, 1.0, e, p, ne, np_, COUPLE_CFG, COUPLE_STEPS)
        torch.save({"z1": z1, "z0": z0, "captions": captions}, os.path.join(out, f"shard_{step:05d}.pt.tmp"))
        os.replace(os.path.join(out, f"shard_{step:05d}.pt.tmp"), os.path.join(out, f"shard_{step:05d}.pt"))
        step += 1
        print(f"couples shard {step} ({step * batch} couples) {(time.time() - t_start) / 60:.1f} min", flush=True)


def load_couples(args):
    out = os.path.join(args.out, "couples")
    shards = [torch.load(os.path.join(out, f), weights_only=True) for f in sorted(os.listdir(out))
              if f.endswith(".pt")]
    if not shards:
        raise SystemExit(f"no couples in {out}: run --stage couples first")
    return (torch.cat([s["z1"] for s in shards]), torch.cat([s["z0"] for s in shards]),
            [c for s in shards for c in s["captions"]])


def train_student(args, stage, init_dir):
    """reflow: straight-line flow matching on the couples; distill: one-step regression z1 - v(z1, 1) -> z0."""
    from diffusers import SD3Transformer2DModel

    pipe = load_teacher(args)
    student = SD3Transformer2DModel.from_pretrained(init_dir, dtype=torch.float32).train()
    z1_all, z0_all, caps_all = load_couples(args)
    params = list(student.parameters())
    ema = [p.detach().clone() for p in params]
    _, lr, _ = DEFAULTS[stage]
    opt = torch.optim.AdamW(params, lr=args.lr or lr, betas=(0.9, 0.99), weight_decay=0.0)
    loop = EmaLoop(args, stage, {"transformer": student}, opt, params, ema, defaults=DEFAULTS)
    gen = torch.Generator()

    def step_fn(step):
        seed = batch_seed(args, stage, step)
        gen.manual_seed(seed)
        idx = torch.randint(0, len(z1_all), (loop.batch,), generator=gen)
        z1, z0 = z1_all[idx], z0_all[idx]
        rows = int(np.random.default_rng(seed).choice(dit.ZERO_ROWS, p=dit.ZERO_ROWS_P))
        with torch.no_grad():
            e, p = dit.encode(pipe, [caps_all[i] for i in idx], rows)
        if stage == "reflow":
            s = torch.rand(loop.batch, generator=gen).view(-1, 1, 1, 1)
        else:
            s = torch.ones(loop.batch, 1, 1, 1)
        v = student(hidden_states=(1 - s) * z0 + s * z1, timestep=s.flatten() * 1000, encoder_hidden_states=e,
                    pooled_projections=p).sample
        return (v - (z1 - z0)).pow(2).mean()  # distill: the same target, read at s = 1 only

    loop.run(step_fn)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    student.save_pretrained(product_dir(args, loop, "transformer"))
    if not args.export:
        loop.log(f"final: {stage} from {init_dir}, {len(z1_all)} couples")


def train_flash(args):
    """The teacher (LoRA off, CFG) teaches its LoRA'd self (no CFG) to land each 4-step flow-Euler mode in one step."""
    pipe = load_teacher(args)
    transformer = pipe.transformer
    lora = flash.add_lora(transformer, flash.DIT_RANK, flash.DIT_TARGET_MODULES)
    _, lr, _ = DEFAULTS["flash"]
    opt = torch.optim.AdamW(lora, lr=args.lr or lr, weight_decay=0.0)
    loop = Loop(args, "flash", {"lora": flash.LoraParams(transformer)}, opt, defaults=DEFAULTS)
    z1_all, z0_all, caps_all = load_couples(args)
    p_two = data.P_TWO_SHAPES if args.p_two is None else args.p_two
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    gen = torch.Generator()

    def step_fn(step):
        seed = batch_seed(args, "flash", step)
        gen.manual_seed(seed)
        rows = int(np.random.default_rng(seed).choice(dit.ZERO_ROWS, p=dit.ZERO_ROWS_P))
        modes = flash.sample_flow_modes(loop.batch, loop.progress, gen)
        idx = torch.randint(0, len(z1_all), (int((modes == 0).sum()),), generator=gen)  # sigma 1: couples
        modes = modes[modes > 0]
        x, captions, _ = data.make_batch(seed, max(len(modes), 1), p_two)
        x, captions = x[:len(modes)], captions[:len(modes)]
        with torch.no_grad():
            z0 = (pipe.vae.encode(x).latent_dist.sample(gen) - shift) * scale if len(modes) else z0_all[:0]
            e, p = dit.encode(pipe, [caps_all[i] for i in idx] + captions, rows)
            ne, np_ = dit.encode(pipe, [""], rows)
        s = flash.FLOW_SIGMAS[modes].view(-1, 1, 1, 1)
        zs = (1 - s) * z0 + s * torch.randn(z0.shape, generator=gen)
        target = torch.empty_like(zs)
        for m in modes.unique():
            sel, sig = modes == m, float(flash.FLOW_SIGMAS[m])
            target[sel] = flash.teacher_flow_x0(transformer, zs[sel], sig, e[len(idx):][sel], p[len(idx):][sel], ne,
                                                np_, dit.CFG, round(flash.FLOW_TEACHER_STEPS * sig))
        return flash.flow_distill_loss(transformer, torch.cat([z1_all[idx], zs]),
                                       torch.cat([torch.ones(len(idx)), s.flatten()]),
                                       torch.cat([z0_all[idx], target]), e, p)

    loop.run(step_fn)
    flash.save_lora(pipe, product_dir(args, loop, "lora"))
    if not args.export:
        loop.log(f"final: flash lora rank {flash.DIT_RANK}, params {sum(p.numel() for p in lora)}")


def train_clear(args):
    """CLEAR: the windowed student (teacher + attention LoRA) matches the full-attention teacher's velocity on the
    couples' samples noised to sigma ~ U(0, 1), with and without their captions."""
    import copy

    pipe = load_teacher(args)
    teacher = pipe.transformer                                   # full attention, no LoRA, frozen
    student = copy.deepcopy(teacher)
    lora, local = clear.make_student(student, args.radius)
    _, lr, _ = DEFAULTS["clear"]
    opt = torch.optim.AdamW(lora, lr=args.lr or lr, weight_decay=0.0)
    loop = Loop(args, "clear", {"lora": flash.LoraParams(student)}, opt, defaults=DEFAULTS)
    _, z0_all, caps_all = load_couples(args)
    gen = torch.Generator()

    def step_fn(step):
        seed = batch_seed(args, "clear", step)
        gen.manual_seed(seed)
        idx = torch.randint(0, len(z0_all), (loop.batch,), generator=gen)
        zs, s = clear.noised(z0_all[idx], gen)
        with torch.no_grad():   # T5 stand-in rows: the card's recommended max_sequence_length (text keeps full attention)
            e, p = dit.encode(pipe, [caps_all[i] for i in idx] + [""] * len(idx), clear.ZERO_ROWS)
        return clear.distill_loss(student, teacher, torch.cat([zs, zs]), torch.cat([s, s]), e, p)

    loop.run(step_fn)
    path = clear.save_adapter(student, product_dir(args, loop, "lora"), radius=args.radius, steps=loop.step,
                              teacher=getattr(args, "teacher", None) or "")
    if not args.export:
        loop.log(f"final: clear radius {args.radius:g} lora rank {clear.RANK}, params {sum(p.numel() for p in lora)}, "
                 f"attention FLOPs kept {local.flops_kept:.3f}, {path}")


STAGES = {"dit": train_dit, "flash": train_flash, "couples": make_couples, "clear": train_clear,
          "reflow": lambda args: train_student(args, "reflow", os.path.join(args.out, "dit", "pipeline",
                                                                            "transformer")),
          "distill": lambda args: train_student(args, "distill", os.path.join(args.out, "reflow", "transformer"))}


def parse_args(argv=None):
    p = build_parser(stages=STAGES, out="runs/tiny-dit", doc=__doc__)
    p.add_argument("--layers", type=int, default=8, help="joint transformer blocks")
    p.add_argument("--init", help="stage dit: start from this pipeline folder's weights (e.g. the shipped one)")
    p.add_argument("--teacher", help="stages couples / flash / clear: the teacher pipeline folder "
                   "(default <out>/dit/pipeline)")
    p.add_argument("--radius", type=float, default=clear.RADIUS, help="stage clear: window radius in image tokens")
    p.add_argument("--init-steps", type=int, default=0,
                   help="with --init: the steps those weights already had (the model card says), so data seeds go on")
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
