"""The `nimblediff` command: demo, workflow validation, LoRA tools, tiny-model training."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EMBEDDED = Path(__file__).parent / "weights" / "tiny"
EMBEDDED_MODEL = EMBEDDED / "nimblediff-tiny"
EMBEDDED_FLASH_LORA = EMBEDDED / "nimblediff-tiny-flash-lora.safetensors"

DEMO_PROMPTS = ["a red circle", "a blue square on the left", "a large green triangle at the top",
                "a yellow star on a black background"]


def _demo(args) -> int:
    import torch

    from .pipelines import FewStepPipeline

    torch.set_num_threads(args.threads)
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        print(f"error: the embedded model is missing: {EMBEDDED_MODEL / 'model_index.json'} "
              "(the repository checkout is incomplete)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipe = FewStepPipeline.from_pretrained(EMBEDDED_MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if EMBEDDED_FLASH_LORA.is_file():
        pipe.load_acceleration_lora(EMBEDDED_FLASH_LORA, recipe="nimblediff-tiny-flash")
    load_s = time.perf_counter() - t0
    prompts = args.prompt or DEMO_PROMPTS
    t0 = time.perf_counter()
    images = pipe(prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).images
    gen_s = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _captioned_grid(images, prompts, scale=args.scale).save(out)
    print(f"{len(images)} images, {args.steps} steps, Flash LoRA {'on' if EMBEDDED_FLASH_LORA.is_file() else 'off'}: "
          f"load {load_s:.2f} s, generate {gen_s:.2f} s ({gen_s / len(images):.3f} s/image) -> {out}")
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
    from .workflow_check import WORKFLOWS, validate_file

    paths = args.paths or sorted(WORKFLOWS.glob("*.json")) + sorted((WORKFLOWS / "api").glob("*.json"))
    paths = [p for p in map(Path, paths) if p.name != "core_nodes.json"]
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

    from .workflow_check import api_to_ui

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    out.write_text(json.dumps(api_to_ui(json.loads(Path(args.api).read_text())), indent=1))
    print(f"wrote {out}")
    return 0


def _lora_inspect(args) -> int:
    from .weights.lora_formats import read_lora

    deltas, report = read_lora(args.path)
    print(report)
    ranks = {}
    for delta in deltas.values():
        ranks[getattr(delta, "rank", "diff")] = ranks.get(getattr(delta, "rank", "diff"), 0) + 1
    print(f"{len(deltas)} modules; ranks: {dict(sorted(ranks.items(), key=str))}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nimblediff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a captioned grid with the embedded model (Flash LoRA, 4 steps)")
    demo.add_argument("--out", default="out/demo.png")
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=int, default=3, help="upscale factor of the 64x64 tiles in the grid")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--prompt", action="append", help="a prompt (repeatable); default: four demo prompts")
    demo.set_defaults(run=_demo)

    workflow = sub.add_parser("workflow", help="workflow tools").add_subparsers(dest="action", required=True)
    validate = workflow.add_parser("validate", help="check workflow JSON against the node schemas")
    validate.add_argument("paths", nargs="*", help="files (default: the shipped workflows)")
    validate.set_defaults(run=_workflow_validate)

    to_ui = workflow.add_parser("to-ui", help="convert an API-format workflow to the UI (drag-and-drop) format")
    to_ui.add_argument("api")
    to_ui.add_argument("out")
    to_ui.add_argument("--overwrite", action="store_true")
    to_ui.set_defaults(run=_workflow_to_ui)

    lora = sub.add_parser("lora", help="LoRA tools").add_subparsers(dest="action", required=True)
    inspect = lora.add_parser("inspect", help="detect a LoRA file's layout and architecture")
    inspect.add_argument("path")
    inspect.set_defaults(run=_lora_inspect)

    args = parser.parse_args(argv)
    from .errors import NimbleDiffError

    try:
        return args.run(args)
    except NimbleDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
