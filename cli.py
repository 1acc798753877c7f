"""The `nimblediff` command: demo on the embedded model, workflow tools, schedule search, block-plan search and LoRA
tools."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from pathlib import Path

from . import TINY_FLASH_LORA, TINY_MODEL

EMBEDDED_MODEL = Path(TINY_MODEL)
EMBEDDED_FLASH_LORA = Path(TINY_FLASH_LORA)

# Picked to show what the model does well: at the default --seed 0 each renders as written (image i uses seed i).
# What it gets wrong (README): top and bottom are often swapped, two-shape prompts leak attributes between shapes.
DEMO_PROMPTS = ["a red circle in the center", "a purple circle on the right on a white background",
                "a small red square on the left and a blue star on the right", "a yellow triangle on the right",
                "a yellow star at the bottom on a black background", "a red star at the top"]


def _quiet_libraries() -> None:
    """diffusers / transformers log import-time notices and loading bars on every run; the CLI shows only errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _free_cores() -> tuple[int, int, float]:
    """(cores this process may use, cores not busy by the 1-minute load average, that load)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = max(0, math.ceil(load - 0.3))        # a core busy a third of the time already preempts a spinning thread
    return cores, max(1, cores - busy), load


def _set_threads(requested) -> int:
    """torch intra-op threads: as asked, or with "auto" the cores not already busy.

    On a small model an OpenMP thread that loses its core to another process stalls every op: with one of two cores
    busy, two threads ran the demo 10-30x slower than one."""
    import torch

    if requested == "auto":
        cores, free, load = _free_cores()
        torch.set_num_threads(free)
        print(f"threads: {free} (auto: {cores} cores, 1-min load {load:.2f}; --threads N to choose)")
        return free
    torch.set_num_threads(requested)
    return requested


def _positive_int(text: str, what: str = "an integer >= 1") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give {what}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0")
    return value


def _threads_arg(text: str):
    return text if text == "auto" else _positive_int(text, "a number of threads >= 1, or auto")


def _load_pipeline(folder, dtype):
    """FewStepPipeline from a folder, without diffusers' per-component loading bar."""
    from diffusers.utils import logging as diffusers_logging

    from .pipelines import FewStepPipeline

    diffusers_logging.disable_progress_bar()
    pipe = FewStepPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_any_pipeline(folder, dtype):
    """FewStepPipeline for UNet folders; the stock pipeline class for DiT folders (model_index.json names it)."""
    import json

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from .pipelines.loading import missing_text_encoders

    if "unet" in json.loads((Path(folder) / "model_index.json").read_text()):
        return _load_pipeline(folder, dtype)
    diffusers_logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, **missing_text_encoders(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_folder(path) -> Path:
    """An existing diffusers pipeline folder (the CLI runs offline: no hub ids)."""
    from .pipelines.loading import check_pipeline_folder

    check_pipeline_folder(path, local_only=True, name="--model")
    return Path(path)


def _demo(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        print(f"error: the embedded model is missing: {EMBEDDED_MODEL / 'model_index.json'} "
              "(the repository checkout is incomplete)", file=sys.stderr)
        return 2
    prompts = args.prompt or DEMO_PROMPTS
    from .tiny.vocab import check_prompt

    for prompt in prompts:       # the tiny model knows only its caption grammar: name unknown words, never drop them
        check_prompt(prompt)
    import torch

    _set_threads(args.threads)
    t0 = time.perf_counter()
    pipe = _load_pipeline(EMBEDDED_MODEL, torch.float32)
    pipe.load_acceleration_lora(EMBEDDED_FLASH_LORA, recipe="nimblediff-tiny-flash")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # one generator per image: each picture depends on its own seed, not on its place in the batch
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=args.steps, generator=generators).images
    gen_s = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    _captioned_grid(images, prompts, scale=args.scale).save(out)
    print(f"{len(images)} images, {args.steps} steps, Flash LoRA on: "
          f"load {load_s:.2f} s, generate {gen_s:.2f} s ({gen_s / len(images):.3f} s/image) -> {out}")
    return 0


def _read_prompts(path) -> list[str]:
    """The non-empty lines of a prompt file, one prompt per line."""
    from .errors import InvalidParameterError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"--prompts {path}: cannot read it ({e}); give a UTF-8 text file with one prompt "
                                    "per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InvalidParameterError(f"--prompts {path}: no prompts in it; write one prompt per line")
    return prompts


def _generate(args) -> int:
    """Image i of the prompt file -> OUT_DIR/<i>.png, data-parallel over the processes `accelerate launch` starts.

    The batches are fixed by prompt index (0..B-1, B..2B-1, ...) and dealt whole to the processes, and image i uses
    its own generator seeded seed + i, so 1 or N processes compute the same batches and write the same files."""
    import torch
    from accelerate import PartialState

    from .core.limits import check_latent_size
    from .weights.lora_ops import checked_output

    prompts = _read_prompts(args.prompts)
    out_dir = Path(args.out_dir)
    paths = [out_dir / f"{i:05d}.png" for i in range(len(prompts))]
    for path in paths:                    # every refusal before a model is loaded or a process group is formed
        checked_output(path, overwrite=args.overwrite, inputs=[args.prompts])
    if args.size is not None:
        check_latent_size(args.batch_size, 4, args.size, args.size, 8, "generate --batch-size / --size")
    folder = _model_folder(args.model) if args.model else EMBEDDED_MODEL
    if args.model is None:
        from .tiny.vocab import check_prompt

        for prompt in prompts:            # the tiny model knows only its caption grammar: name unknown words
            check_prompt(prompt)
    accelerator = getattr(torch, "accelerator", None)
    # without a GPU the processes meet over gloo on the CPU (accelerate's MULTI_CPU); PartialState only picks it
    # when told the run is on the CPU
    state = PartialState(cpu=accelerator is None or accelerator.current_accelerator() is None)
    threads = args.threads
    if threads == "auto" and state.num_processes > 1:   # the free cores shared by the processes of this machine
        threads = max(1, _free_cores()[1] // state.num_processes)
    with contextlib.redirect_stdout(sys.stdout if state.is_main_process else io.StringIO()):
        _set_threads(threads)
    pipe = _load_pipeline(folder, torch.float32).to(state.device)
    if args.lora:
        pipe.load_lora(args.lora)
    elif args.model is None:
        pipe.load_acceleration_lora(EMBEDDED_FLASH_LORA, recipe="nimblediff-tiny-flash")
    batches = [list(range(i, min(i + args.batch_size, len(prompts)))) for i in range(0, len(prompts), args.batch_size)]
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, done = time.perf_counter(), 0
    with state.split_between_processes(batches) as mine:
        for batch in mine:
            generators = [torch.Generator().manual_seed(args.seed + i) for i in batch]
            images = pipe([prompts[i] for i in batch], num_inference_steps=args.steps, generator=generators,
                          height=args.size, width=args.size).images
            for i, image in zip(batch, images):
                image.save(paths[i])
            done += len(batch)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"{len(prompts)} images ({args.steps} steps, batches of {args.batch_size}, {state.num_processes} "
              f"process{'es' if state.num_processes > 1 else ''}; this one made {done} in "
              f"{time.perf_counter() - t0:.2f} s) -> {out_dir}")
    return 0


def _captioned_grid(images, captions, scale: int = 3):
    from PIL import Image, ImageDraw

    w, h = images[0].width * scale, images[0].height * scale
    band = 28
    grid = Image.new("RGB", (w * len(images), h + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        grid.paste(im.resize((w, h), Image.NEAREST), (i * w, 0))
        words, lines = cap.split(), [""]
        for word in words:      # wrap to the tile width
            if len(lines[-1]) + len(word) + 1 > w // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((i * w + 3, h + 2), "\n".join(lines[:2]), fill="black", spacing=1)
    return grid


def _workflow_validate(args) -> int:
    from .workflow_check import TEMPLATES, WORKFLOWS, validate_file

    paths = args.paths or sorted(TEMPLATES.glob("*.json")) + sorted((WORKFLOWS / "api").glob("*.json"))
    failures = 0
    for path in paths:
        errors = validate_file(path)
        failures += bool(errors)
        print(f"{'FAIL' if errors else 'ok  '} {path}")
        for e in errors:
            print(f"     {e}")
    return 1 if failures else 0


def _workflow_to_ui(args) -> int:
    import json

    from .weights.lora_ops import checked_output
    from .workflow_check import api_to_ui, read_workflow

    out = checked_output(args.out, overwrite=args.overwrite, inputs=[args.api])   # never over the input workflow
    api = read_workflow(args.api, want="api")
    try:
        ui = api_to_ui(api)
    except KeyError as e:
        from .errors import InvalidParameterError

        raise InvalidParameterError(f"{args.api}: refers to node or node type {e} that the workflow or the "
                                    "NimbleDiff/ComfyUI schemas do not define") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ui, indent=1))
    print(f"wrote {out}")
    return 0


def _schedule_search(args) -> int:
    import torch
    from tqdm import tqdm

    from .core.schedule_search import save_schedule, search_schedule
    from .pipelines.guided import guided_denoiser

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    from .core.limits import check_latent_size

    # absurd sizes before anything is loaded (SD's 4 channels at /8), the exact latent shape once the model is known
    check_latent_size(args.batch, 4, args.size, args.size, 8, "schedule search --batch / --size")
    folder = _model_folder(args.model or EMBEDDED_MODEL)
    _set_threads(args.threads)
    pipe = _load_any_pipeline(folder, _dtype(args.dtype))
    if args.lora:
        if not hasattr(pipe, "load_lora"):
            print(f"error: --lora applies to UNet pipelines; {folder.name} is a {type(pipe).__name__}", file=sys.stderr)
            return 2
        pipe.load_lora(args.lora)
    prompts = args.prompt or [""]
    denoiser, param, (channels, _, _) = guided_denoiser(pipe, prompts, args.cfg)
    size = args.size // pipe.vae_scale_factor
    check_latent_size(args.batch, channels, args.size, args.size, pipe.vae_scale_factor, "schedule search")
    print(f"{args.method} on {folder.name} ({args.dtype}, batch {args.batch}, "
          + (f"grid {args.grid}" if args.method == "boss" else f"NFE {args.nfe}")
          + "): the bar estimates the time left; Ctrl-C stops without writing")
    bar = tqdm(desc=f"{args.method} search", bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    extra = {"boss": {"grid_size": args.grid},
             "fit": {"iterations": args.iterations, "prior_shift": args.prior_shift, "time_shift": args.time_shift,
                     "fit_start": args.fit_start, "tail": args.tail}}.get(args.method, {})
    with torch.set_grad_enabled(args.method == "fit"):     # only the fit differentiates through the model
        result = search_schedule(args.method, denoiser, param, args.nfe, batch=args.batch, seed=args.seed,
                                 shape=(channels, size, size), sampler=args.sampler,
                                 progress=progress, **extra)
    bar.close()
    save_schedule(out, {**result, "model": str(args.model or "nimblediff-tiny"), "prompts": prompts,
                        "cfg": args.cfg})
    sigmas = [round(s, 4) for s in result["sigmas"]]
    print(f"{args.method} {result['sampler']} NFE {args.nfe}: sigmas {sigmas} -> {out}")
    return 0


# prompts for `cache plan-search` when none are given: the tiny DiT's caption language, not the held-out set
PLAN_PROMPTS = ["a red circle on the left", "a blue square in the center", "a small green triangle at the top",
                "a yellow star on the right on a black background"]


def _cache_plan_search(args) -> int:
    import torch
    from tqdm import tqdm

    from . import TINY_DIT
    from .pipelines.caching import search_block_plan

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    folder = _model_folder(args.model or TINY_DIT)
    _set_threads(args.threads)
    pipe = _load_any_pipeline(folder, torch.float32)
    if getattr(pipe, "transformer", None) is None:
        print(f"error: --model {folder} is a {type(pipe).__name__}; block plans are for DiT (SD3-style) folders",
              file=sys.stderr)
        return 2
    init = []
    if args.init_schedule:
        from .core.caching import search as dit_search

        init = [dit_search.load_schedule(args.init_schedule, pipe.transformer)]
    prompts = args.prompt or PLAN_PROMPTS
    print(f"block-plan search on {folder.name}: {args.steps} steps, budget {args.budget:g} of the block evaluations, "
          f"{len(prompts)} calibration prompt(s), population {args.population}, {args.generations} generations"
          + (", sigmas too" if args.sigmas else "") + "; Ctrl-C stops without writing")
    bar = tqdm(desc="plan search", total=args.generations,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def progress(done, total):
        bar.n = done
        bar.refresh()

    call = {"num_inference_steps": args.steps, "guidance_scale": args.cfg, "height": args.size, "width": args.size}
    if args.max_sequence_length:
        call["max_sequence_length"] = args.max_sequence_length
    result = search_block_plan(pipe, prompts, args.budget, path=out, seed=args.seed, search_sigmas=args.sigmas,
                               reference_steps=args.reference_steps, init=init, warmup=args.warmup,
                               population=args.population,
                               generations=args.generations, search_seed=args.search_seed, progress=progress, **call)
    bar.close()
    plan = result["plan"]
    print(f"plan: {plan.evaluations()} of {plan.steps} x {plan.n_blocks} block evaluations, latent MSE to uncached "
          f"{result['error']:.3e} ({result['evaluations']} plans evaluated) -> {out}")
    for j in range(plan.n_blocks):
        print(f"  block {j}: " + "".join("X" if row[j] else "." for row in plan.blocks))
    return 0


def _lora_inspect(args) -> int:
    from .weights.lora_formats import read_lora

    deltas, report = read_lora(args.path)
    print(report.summary())
    ranks = {}
    for delta in deltas.values():
        ranks[getattr(delta, "rank", "diff")] = ranks.get(getattr(delta, "rank", "diff"), 0) + 1
    print(f"{len(deltas)} modules; ranks: {dict(sorted(ranks.items(), key=str))}")
    return 0


# --- lora convert / resize / prune / merge / extract ----------------------------------------------------------------
_DTYPES = ("fp16", "bf16", "fp32")
_WRITE_LAYOUT = {"peft": "peft", "diffusers": "peft", "kohya": "kohya", "comfyui": "comfyui"}


def _dtype(name):
    import torch

    return None if name is None else {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _read_complete(path, target=None):
    """read_lora, refusing a file some of whose keys would be lost."""
    from .weights.lora_ops import require_complete
    from .weights.lora_formats import read_lora

    deltas, report = read_lora(path, target)
    print(report.summary())
    require_complete(report)
    return deltas, report


class _Progress:
    """A tqdm bar driven by (done, total) callbacks; silent when stderr is not a terminal."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="layer", disable=None)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _write(deltas, out, args, layout, metadata, target, verb="wrote") -> None:
    from .weights.lora_ops import describe_file, save_deltas

    path = save_deltas(deltas, out, layout, dtype=_dtype(args.dtype), overwrite=args.overwrite, metadata=metadata,
                       target=target)
    print(describe_file(path) + f" ({layout} layout, {len(deltas)} layers)")


def _read_source(args, layout=None):
    """A LoRA file, the layout to write and the target its names are written for.

    ComfyUI's LDM block numbers follow the UNet's config: read and write through --model's own map; without a
    model, the preset of the detected base, only when the LoRA's block widths agree with it (one per level)."""
    from .weights.lora_formats import Target
    from .weights.lora_write import check_unet_fit, model_target

    model = args.model
    deltas, report = _read_complete(args.path, None if model is None else model_target(model))
    layout = layout or args.layout or _WRITE_LAYOUT.get(report.layout, "kohya")
    target = str(model) if model is not None else Target.for_arch(report.arch)
    if model is None and (layout == "comfyui" or "comfyui" in report.layout or _ldm_named(args.path)):
        check_unet_fit(deltas, target, widths="relative",
                       layout=layout if layout == "comfyui" else f"{args.path} (LDM block names)")
    return deltas, report, layout, target


def _lora_convert(args) -> int:
    from .weights.lora_ops import carried_metadata, checked_output

    out = checked_output(args.out, overwrite=args.overwrite, inputs=[args.path])
    deltas, report, layout, target = _read_source(args, args.layout)
    meta = carried_metadata([report.metadata], "convert", dict(source=Path(args.path).name, layout=layout))
    _write(deltas, out, args, layout, meta, target)
    return 0


def _ldm_named(path) -> bool:
    from .weights.safetensors_io import read_header

    return any(b in k for k in read_header(path)[0] for b in ("input_blocks", "middle_block", "output_blocks"))


def _rank_options(args) -> dict:
    thresholds = {k: getattr(args, k) for k in ("sv_ratio", "sv_fro", "sv_cumulative", "energy")}
    return {"rank": args.rank, **{k: v for k, v in thresholds.items() if v is not None}}


def _lora_resize(args) -> int:
    from .core.adapters.rank import resize_lora
    from .weights.lora_ops import carried_metadata, checked_output

    out = checked_output(args.out, overwrite=args.overwrite, inputs=[args.path])
    deltas, report, layout, target = _read_source(args)
    options = _rank_options(args)
    small, rank_report = resize_lora(deltas, **options)
    print(rank_report.summary())
    meta = carried_metadata([report.metadata], "resize", dict(source=Path(args.path).name, **options))
    _write(small, out, args, layout, meta, target)
    return 0


def _lora_prune(args) -> int:
    import torch

    from .core.adapters.rank import prune_to_budget
    from .weights.lora_ops import carried_metadata, checked_output

    out = checked_output(args.out, overwrite=args.overwrite, inputs=[args.path])
    deltas, report, layout, target = _read_source(args)
    budget = {k: v for k, v in dict(fraction=args.fraction, params=args.params, max_bytes=args.max_bytes).items()
              if v is not None}
    dtype = _dtype(args.dtype) or next((d.up.dtype for d in deltas.values() if hasattr(d, "up")), torch.float16)
    small, rank_report = prune_to_budget(deltas, dtype=dtype, score=args.score, min_rank=args.min_rank, **budget)
    print(rank_report.summary())
    meta = carried_metadata([report.metadata], "prune", dict(source=Path(args.path).name, score=args.score,
                                                             min_rank=args.min_rank, **budget))
    _write(small, out, args, layout, meta, target)
    return 0


def _lora_merge(args) -> int:
    from .errors import InvalidParameterError
    from .weights.lora_ops import (check_merge_keys, checked_output, merge_metadata, merge_with_progress,
                                   read_same_base, require_complete)
    from .weights.lora_formats import Target

    if args.weights is not None and len(args.weights) != len(args.loras):
        raise InvalidParameterError(f"--weights has {len(args.weights)} values for {len(args.loras)} LoRAs; give one "
                                    "weight per LoRA")
    if args.rank is None and args.layout == "peft" and args.method != "cat":
        raise InvalidParameterError("without --rank the merge keeps full differences, which the peft layout cannot "
                                    "hold; pass --rank N or --layout kohya / comfyui")
    out = checked_output(args.out, overwrite=args.overwrite, inputs=args.loras)
    adapters, reports = read_same_base(args.loras)
    for report in reports:
        print(report.summary())
        require_complete(report)
    check_merge_keys(adapters, reports)
    weights = args.weights or [1.0] * len(args.loras)
    progress = _Progress(f"merge ({args.method})")
    try:
        merged, report = merge_with_progress(adapters, weights, args.method, density=args.density, seed=args.seed,
                                       rank=args.rank, progress=progress)
    finally:
        progress.close()
    print(f"{args.method} merge of {len(adapters)} LoRAs: {len(merged)} layers"
          + (f"; {report.rank.summary()}" if report.rank is not None else " (full differences)"))
    meta = merge_metadata(reports, " + ".join(f"{w:g} x {Path(p).name}" for p, w in zip(args.loras, weights)),
                          merged, method=args.method, density=args.density, seed=args.seed, rank=args.rank)
    _write(merged, out, args, args.layout, meta, Target.for_arch(reports[0].arch))
    return 0


def _component_state_dict(folder: Path, component: str) -> dict:
    """A diffusers folder component's weights: one safetensors file, an fp16 variant, or a sharded index."""
    import json

    from .errors import WeightsFormatError
    from .weights.safetensors_io import load_state_dict

    base = folder / component
    for name in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            single = base / f"{name}{variant}.safetensors"
            if single.is_file():
                return load_state_dict(single)
            index = base / f"{name}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                sd = {}
                for shard in shards:
                    sd.update(load_state_dict(base / shard))
                return sd
    raise WeightsFormatError(f"{base}: no diffusion_pytorch_model.safetensors / model.safetensors (or .fp16 variant, "
                             f"or sharded .index.json); is {folder} a diffusers pipeline folder with a {component}/?")


def _extract_weights(sd: dict, component: str) -> dict:
    """Linear / Conv weights under canonical module paths (text encoders: no ``text_model.``, no embeddings)."""
    if component.startswith("text_encoder"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items() if "embeddings." not in k}
    return {k: v for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)}


def _lora_extract(args) -> int:
    import json

    from .errors import InvalidParameterError
    from .weights.lora_ops import carried_metadata, checked_output, extract_chunked
    from .weights import arch as arch_mod
    from .weights.keymaps import UNetLayout
    from .weights.lora_formats import Target

    base_dir, tuned_dir = Path(args.base), Path(args.tuned)
    out = checked_output(args.out, overwrite=args.overwrite)
    denoiser = "unet" if (base_dir / "unet").is_dir() else "transformer"
    components = args.components.split(",") if args.components else [denoiser]
    valid = ("unet", "transformer", "text_encoder", "text_encoder_2")
    bad = [c for c in components if c not in valid]
    if bad:
        raise InvalidParameterError(f"--components {bad}; valid: {', '.join(valid)} (comma-separated)")
    deltas, reports = {}, []
    for comp in components:
        base = _extract_weights(_component_state_dict(base_dir, comp), comp)
        tuned = _extract_weights(_component_state_dict(tuned_dir, comp), comp)
        progress = _Progress(f"extract {comp}")
        try:
            part, report = extract_chunked(
                base, tuned, component=comp, progress=progress, clamp_quantile=args.clamp_quantile,
                min_diff=args.min_diff, **_rank_options(args))
        finally:
            progress.close()
        print(f"{comp}: {report.summary()}")
        deltas.update(part)
        reports.append(report)
    if not deltas:
        raise InvalidParameterError(f"{tuned_dir} and {base_dir} do not differ in {', '.join(components)} (by more "
                                    f"than --min-diff {args.min_diff}); nothing to extract")
    target = None
    config_path = base_dir / denoiser / "config.json"
    if denoiser == "unet" and config_path.is_file():
        config = json.loads(config_path.read_text())
        target = Target.from_layout(UNetLayout.from_diffusers_config(config), None,
                                    arch_mod.detect_model_arch(config))
    meta = carried_metadata([], "extract", dict(base=base_dir.name, tuned=tuned_dir.name, **_rank_options(args)))
    _write(deltas, out, args, args.layout, meta, target)
    return 0


_QUANT_BITS = {"8": "int8", "4": "int4k_g32"}   # 4: Q4_K-style group-32 int4 with 6-bit scales, 4.4 bits per weight


def _quantize(args) -> int:
    import torch
    from tqdm import tqdm

    from .pipelines.quantized import mixed_precision_plan, quantize_denoiser, save_quantized_denoiser

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    folder = _model_folder(args.model or EMBEDDED_MODEL)
    _set_threads(args.threads)
    pipe = _load_pipeline(folder, torch.float32)
    prompts = args.prompt or DEMO_PROMPTS
    prompts = [prompts[i % len(prompts)] for i in range(args.calibrate)]
    per_layer, scheme = None, args.scheme or _QUANT_BITS.get(args.bits)
    if args.bits == "mixed":
        if not prompts:
            from .errors import InvalidParameterError

            raise InvalidParameterError("--bits mixed needs --calibrate N >= 1 (its sensitivities use sampled images)")
        print(f"HAWQ-V2 sensitivities on {len(prompts)} prompts, budget {args.bpw} bits per weight ...")
        per_layer = mixed_precision_plan(pipe, ["int4k_g32", "int8", None], args.bpw, prompts=prompts,
                                         steps=args.steps, seed=args.seed)
        scheme = "int8"
    bar = tqdm(desc="calibrate + quantize" if prompts else "quantize", unit="layer")

    def progress(done, total, name):
        bar.total = total
        bar.update(done - bar.n)

    report = quantize_denoiser(pipe, scheme, prompts=prompts, steps=args.steps, calibrate=bool(prompts),
                               per_layer=per_layer, adaround_iters=args.adaround, w8a8=args.w8a8, seed=args.seed,
                               progress=progress)
    bar.close()
    save_quantized_denoiser(pipe, out, overwrite=args.overwrite)
    layers = [r for k, r in report.items() if not k.startswith("_")]
    errs = [r["calibrated"] for r in layers if "calibrated" in r]
    note = f", mean layer output error {sum(errs) / len(errs):.4f}" if errs else ""
    print(f"{len(layers)} layers quantized ({scheme if per_layer is None else 'mixed'}{note}) -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _add_lora_commands(lora) -> None:
    layouts = ("peft", "kohya", "comfyui")

    def output(p, layout_help="default: the input's layout", layout_default=None, required=False):
        p.add_argument("--layout", choices=layouts, default=layout_default, required=required, help=layout_help)
        p.add_argument("--dtype", choices=_DTYPES, help="dtype of the written tensors (default: as computed)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    def model_option(p):
        p.add_argument("--model", help="diffusers folder (or unet/config.json) of the model the LoRA is for: "
                       "ComfyUI block numbers follow its UNet config (default: the detected base's)")

    def rank_selection(p, rank_default=None):
        p.add_argument("--rank", type=_positive_int, default=rank_default,
                       help="new rank; the maximum with a threshold")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--sv-ratio", type=float, help="keep sigma_i >= sigma_0 / SV_RATIO")
        g.add_argument("--sv-fro", type=float, help="keep this share (0-1] of the Frobenius norm")
        g.add_argument("--sv-cumulative", type=float, help="keep this share (0-1] of the sum of singular values")
        g.add_argument("--energy", type=float, help="keep this share (0-1] of the squared norm")

    convert = lora.add_parser("convert", help="rewrite a LoRA in another layout (peft / kohya / comfyui)")
    convert.add_argument("path", metavar="IN")
    convert.add_argument("out", metavar="OUT")
    output(convert, "the layout to write", required=True)
    model_option(convert)
    convert.set_defaults(run=_lora_convert)

    resize = lora.add_parser("resize", help="resize every layer (fixed rank or spectrum threshold), kohya-style")
    resize.add_argument("path", metavar="IN")
    resize.add_argument("out", metavar="OUT")
    rank_selection(resize)
    output(resize)
    model_option(resize)
    resize.set_defaults(run=_lora_resize)

    prune = lora.add_parser("prune", help="keep the best rank-1 components of all layers under one budget")
    prune.add_argument("path", metavar="IN")
    prune.add_argument("out", metavar="OUT")
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--fraction", type=float, help="share (0-1] of the LoRA's parameters to keep")
    budget.add_argument("--params", type=int, help="number of factor elements to keep")
    budget.add_argument("--max-bytes", type=int, help="factor bytes in --dtype (default: the input's dtype)")
    prune.add_argument("--score", choices=("relative", "energy", "sv"), default="relative")
    prune.add_argument("--min-rank", type=int, default=0, help="components every layer keeps")
    output(prune)
    model_option(prune)
    prune.set_defaults(run=_lora_prune)

    from .core.adapters.merge import MERGE_METHODS

    merge = lora.add_parser("merge", help="merge LoRAs into a new file (linear, ties, dare_*, magnitude_prune, cat)")
    merge.add_argument("out", metavar="OUT")
    merge.add_argument("loras", metavar="LORA", nargs="+")
    merge.add_argument("--weights", type=float, nargs="+", help="one per LoRA (default 1 each)")
    merge.add_argument("--method", choices=[m for m in MERGE_METHODS if m != "darex_q"], default="linear")
    merge.add_argument("--density", type=float, default=1.0, help="share kept by ties / dare / magnitude_prune")
    merge.add_argument("--seed", type=int, default=0, help="DARE's random masks")
    merge.add_argument("--rank", type=_positive_int,
                       help="SVD the merged update to this rank (default: full differences)")
    output(merge, "default: kohya", "kohya")
    merge.set_defaults(run=_lora_merge)

    extract = lora.add_parser("extract", help="LoRA = fine-tuned diffusers folder minus its base folder (SVD)")
    extract.add_argument("base", metavar="BASE_DIR")
    extract.add_argument("tuned", metavar="TUNED_DIR")
    extract.add_argument("out", metavar="OUT")
    rank_selection(extract, rank_default=32)
    extract.add_argument("--components", help="comma-separated, e.g. unet,text_encoder (default: the denoiser)")
    extract.add_argument("--clamp-quantile", type=float, help="clamp factors at this quantile (kohya: 0.99)")
    extract.add_argument("--min-diff", type=float, default=0.0, help="skip layers whose max |difference| <= this")
    output(extract, "default: kohya", "kohya")
    extract.set_defaults(run=_lora_extract)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblediff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a captioned grid with the embedded model (Flash LoRA, 4 steps)")
    demo.add_argument("--out", default="out/demo.png")
    demo.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    demo.add_argument("--steps", type=_positive_int, default=4)
    demo.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    demo.add_argument("--scale", type=_positive_int, default=3, help="upscale factor of the 64x64 tiles in the grid")
    demo.add_argument("--threads", type=_threads_arg, default="auto",
                      help="torch threads, or auto: the cores not busy by the 1-minute load average (default)")
    demo.add_argument("--prompt", action="append",
                      help=f"a prompt (repeatable); default: {len(DEMO_PROMPTS)} demo prompts")
    demo.set_defaults(run=_demo)

    generate = sub.add_parser("generate", help="one image per line of a prompt file; data-parallel under "
                              "`accelerate launch` (same images for any number of processes)")
    generate.add_argument("--prompts", required=True, help="text file, one prompt per line")
    generate.add_argument("--out-dir", default="out/generate", help="image i is written to OUT_DIR/<i>.png")
    generate.add_argument("--model", help="diffusers SD folder (default: the embedded NimbleDiff-Tiny with its Flash "
                          "LoRA)")
    generate.add_argument("--lora", help="a LoRA to fuse first")
    generate.add_argument("--steps", type=_positive_int, default=4)
    generate.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    generate.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per forward pass")
    generate.add_argument("--size", type=_positive_int, help="image size in pixels (default: the model's)")
    generate.add_argument("--threads", type=_threads_arg, default="auto",
                          help="torch threads per process, or auto: the free cores shared by the processes")
    generate.add_argument("--overwrite", action="store_true", help="replace existing images in OUT_DIR")
    generate.set_defaults(run=_generate)

    workflow = sub.add_parser("workflow", help="workflow tools").add_subparsers(dest="action", required=True)
    validate = workflow.add_parser("validate", help="check workflow JSON against the node schemas")
    validate.add_argument("paths", nargs="*", help="files (default: the shipped workflows)")
    validate.set_defaults(run=_workflow_validate)

    to_ui = workflow.add_parser("to-ui", help="convert an API-format workflow to the UI (drag-and-drop) format")
    to_ui.add_argument("api")
    to_ui.add_argument("out")
    to_ui.add_argument("--overwrite", action="store_true")
    to_ui.set_defaults(run=_workflow_to_ui)

    schedule = sub.add_parser("schedule", help="schedule tools").add_subparsers(dest="action", required=True)
    search = schedule.add_parser("search", help="search an NFE-step schedule (BOSS or AutoDiffusion) or fit a "
                                 "solver (step sizes + coefficients) for a model")
    search.add_argument("--model", help="diffusers SD folder, or an SD3-style flow DiT folder such as "
                        "weights/tiny/nimblediff-tiny-dit (default: the embedded NimbleDiff-Tiny)")
    search.add_argument("--lora", help="LoRA to fuse first (e.g. an acceleration LoRA; UNet folders)")
    search.add_argument("--method", choices=("boss", "autodiffusion", "fit"), default="boss",
                        help="fit: the 'fitted' sampler's sigmas and mixing weights by gradient through the model")
    search.add_argument("--sampler", default="euler", help="boss / autodiffusion: the sampler to search for")
    search.add_argument("--iterations", type=int, default=200, help="fit: Adam iterations")
    search.add_argument("--prior-shift", action="store_true",
                        help="fit: start from x + D(x), the true prior mean of SD-type (nonzero terminal SNR) models")
    search.add_argument("--time-shift", action="store_true",
                        help="fit: also fit, per step, the noise level the model is asked at (bench/sampler_accuracy.py "
                             "chooses it on most problems at NFE 4)")
    search.add_argument("--fit-start", action="store_true",
                        help="fit: also fit the first sigma (at or below the model's top; the noise is scaled to it)")
    search.add_argument("--tail", type=_nonnegative_float, default=1.0,
                        help="fit: weight of the mean of the worst 10%% of calibration errors beside the mean (3 "
                             "trades mean error for lighter tails)")
    search.add_argument("--nfe", type=_positive_int, default=4)
    search.add_argument("--prompt", action="append", help="calibration prompt (repeat for several; default: empty)")
    search.add_argument("--cfg", type=float, default=1.0, help="search for the CFG-guided denoiser at this scale")
    search.add_argument("--size", type=_positive_int, default=64,
                        help="image size the calibration latents stand for")
    search.add_argument("--batch", type=_positive_int, default=8, help="calibration noises")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--grid", type=_positive_int, default=40,
                        help="BOSS: fine sigma grid size (cost grows with its square; the paper uses 100-200)")
    search.add_argument("--dtype", choices=_DTYPES, default="fp32",
                        help="load every model component in this dtype (default fp32: fp16 is slow on CPU)")
    search.add_argument("--threads", type=_threads_arg, default="auto",
                        help="torch threads, or auto: the cores not busy by the 1-minute load average")
    search.add_argument("--out", default="schedule.json")
    search.add_argument("--overwrite", action="store_true")
    search.set_defaults(run=_schedule_search)

    cache = sub.add_parser("cache", help="cache tools").add_subparsers(dest="action", required=True)
    plan = cache.add_parser("plan-search", help="search which DiT blocks compute at each step under a compute "
                            "budget (AutoDiffusion's block search; optionally the sigmas too) and write the plan "
                            "JSON that enable_nimble_cache(pipe, 'block_plan') and NimbleDiff Block Plan (DiT) read")
    plan.add_argument("--model", help="diffusers SD3-style DiT folder (default: the embedded NimbleDiff-Tiny-DiT)")
    plan.add_argument("--budget", type=float, default=0.5,
                      help="share (0-1] of the steps x blocks evaluations a plan may use (0.5: 2x fewer)")
    plan.add_argument("--steps", type=_positive_int, default=25, help="sampler steps the plan is for")
    plan.add_argument("--cfg", type=float, default=5.0)
    plan.add_argument("--prompt", action="append", help="calibration prompt (repeatable; default: 4 shape prompts)")
    plan.add_argument("--size", type=_positive_int, default=64, help="image size in pixels")
    plan.add_argument("--max-sequence-length", type=int, default=24,
                      help="SD3's T5 length (the embedded tiny DiT's tokenizer: 24; 0 = the pipeline's default)")
    plan.add_argument("--sigmas", action="store_true",
                      help="search the steps' sigmas jointly (AutoDiffusion's time-step half); pass them to the "
                      "pipeline with pipelines.caching.plan_sigmas, or use the node's SIGMAS output")
    plan.add_argument("--reference-steps", type=_positive_int,
                      help="steps of the uncached reference (default: --steps; more with --sigmas)")
    plan.add_argument("--init-schedule", help="a per-step DiT cache schedule JSON for the first population "
                      "(pipelines.caching.search_dit_schedule)")
    plan.add_argument("--warmup", type=_positive_int, default=1,
                      help="first steps in which every block computes in the profile-allocated starting plan")
    plan.add_argument("--population", type=_positive_int, default=12)
    plan.add_argument("--generations", type=int, default=8)
    plan.add_argument("--seed", type=int, default=7000, help="noise seed of calibration prompt i: SEED + i")
    plan.add_argument("--search-seed", type=int, default=0)
    plan.add_argument("--threads", type=_threads_arg, default="auto",
                      help="torch threads, or auto: the cores not busy by the 1-minute load average")
    plan.add_argument("--out", default="block-plan.json")
    plan.add_argument("--overwrite", action="store_true")
    plan.set_defaults(run=_cache_plan_search)

    lora = sub.add_parser("lora", help="LoRA tools").add_subparsers(dest="action", required=True)
    inspect = lora.add_parser("inspect", help="detect a LoRA file's layout and architecture")
    inspect.add_argument("path")
    inspect.set_defaults(run=_lora_inspect)
    _add_lora_commands(lora)

    quant = sub.add_parser("quantize", help="quantize a model's UNet (Q-Diffusion calibration on its own sampling "
                           "trajectory) into a NimbleDiff quantized .safetensors")
    quant.add_argument("out", metavar="OUT")
    quant.add_argument("--model", help="diffusers SD folder (default: the embedded NimbleDiff-Tiny)")
    quant.add_argument("--bits", choices=("8", "4", "mixed"), default="8",
                       help="8: per-channel int8; 4: group-32 int4 with 6-bit scales; mixed: HAWQ-V2 per layer")
    quant.add_argument("--scheme", help="a core.quant scheme name instead of --bits (e.g. int4_g64, nf4, bfp8)")
    quant.add_argument("--bpw", type=float, default=6.0, help="--bits mixed: average bits per weight budget")
    quant.add_argument("--calibrate", type=int, default=4,
                       help="calibration prompts sampled with the float model (0: round to nearest)")
    quant.add_argument("--prompt", action="append", help="calibration prompt (repeatable; default: the demo prompts)")
    quant.add_argument("--steps", type=_positive_int, default=4, help="sampling steps per calibration prompt")
    quant.add_argument("--adaround", type=int, default=0, help="AdaRound iterations per layer (0: off)")
    quant.add_argument("--w8a8", action="store_true", help="also quantize activations of int8 layers (static scales)")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--threads", type=_threads_arg, default="auto",
                       help="torch threads, or auto: the cores not busy by the 1-minute load average")
    quant.add_argument("--overwrite", action="store_true")
    quant.set_defaults(run=_quantize)

    for leaf in _leaf_parsers(parser):     # given after the command name, where users type it
        leaf.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from .errors import NimbleDiffError

    stdout, tqdm_disable = sys.stdout, os.environ.get("TQDM_DISABLE")
    if args.quiet:            # errors still reach stderr; progress bars (tqdm) read TQDM_DISABLE
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")
    try:
        return args.run(args)
    except NimbleDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if args.quiet:        # an in-process caller (a test, a script) keeps its own progress bars
            if tqdm_disable is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = tqdm_disable


def _leaf_parsers(parser):
    """Every parser that runs a command (walks the subcommand tree)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)
