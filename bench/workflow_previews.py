"""Template previews: every shipped workflow run on the small models in a real ComfyUI, its output saved as the
thumbnail ComfyUI's template browser shows.

1. example_workflows/<name>.json is (re)written from workflows/api/<name>.json (workflow_check.sync_templates).
2. A ComfyUI server starts on a temporary base directory with this pack linked in (tests/comfy_harness.ComfyServer:
   nothing is written into the ComfyUI checkout), and each API workflow is posted to /prompt as it is shipped.
3. The images its SaveImage nodes wrote become one grid (nearest-neighbour upscaled to PREVIEW_SIDE pixels, so the
   small models' 64-pixel images stay sharp), saved as example_workflows/<name>.jpg at the highest JPEG quality that
   keeps it within MAX_BYTES.
4. The server's /workflow_templates must list every template, and each thumbnail must be served.

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python python bench/workflow_previews.py [name ...]

Names (workflow stems) limit the run to those workflows; a workflow that fails is reported and the others go on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PREVIEW_SIDE = 256          # pixels of the grid's longer side
MAX_BYTES = 30 * 1024       # per preview: 8 templates stay under 240 KB of the pack


def grid(images: list) -> "Image.Image":
    """The images in a near-square grid (row-major, in output order), upscaled to PREVIEW_SIDE."""
    from PIL import Image

    w, h = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    scale = max(1, PREVIEW_SIDE // max(sheet.size))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)


def jpeg_within(image, limit: int = MAX_BYTES) -> bytes:
    """The image as JPEG at the highest quality (95 down to 20) that fits in `limit` bytes."""
    for quality in range(95, 15, -5):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= limit:
            return buf.getvalue()
    raise RuntimeError(f"a {image.size} preview does not fit in {limit} bytes even at JPEG quality 20")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow stems (default: every workflows/api/*.json)")
    args = parser.parse_args(argv)

    import comfy_harness
    from PIL import Image

    from nimblediff.workflow_check import TEMPLATES, WORKFLOWS, sync_templates

    comfy = comfy_harness.comfyui_path()
    if comfy is None or not (comfy / "main.py").is_file():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter)")
    for line in sync_templates():
        print(line)
    paths = sorted((WORKFLOWS / "api").glob("*.json"))
    unknown = set(args.names) - {p.stem for p in paths}
    if unknown:
        raise SystemExit(f"no workflows/api/{', '.join(sorted(unknown))}.json; shipped: "
                         f"{', '.join(p.stem for p in paths)}")
    paths = [p for p in paths if not args.names or p.stem in args.names]

    failed = []
    with tempfile.TemporaryDirectory(prefix="nimblediff-previews-") as tmp:
        base = Path(tmp)
        server = comfy_harness.ComfyServer(comfy, base)
        server.start()
        try:
            for path in paths:
                start = time.monotonic()
                try:
                    entry = server.run_prompt(json.loads(path.read_text()), timeout=1800)
                    files = [base / "output" / img["subfolder"] / img["filename"]
                             for img in comfy_harness.output_images(entry)]
                    if not files:
                        raise RuntimeError("the workflow saved no image")
                    images = [Image.open(f) for f in files]
                    data = jpeg_within(grid(images))
                except Exception as e:  # noqa: BLE001  (report every workflow, then fail)
                    failed.append(path.stem)
                    print(f"{path.stem}: FAILED: {str(e)[:2000]}")
                    continue
                (TEMPLATES / f"{path.stem}.jpg").write_bytes(data)
                print(f"{path.stem}: {len(images)} image(s) -> {TEMPLATES.name}/{path.stem}.jpg, {len(data)} bytes, "
                      f"{time.monotonic() - start:.0f} s")
            listed = server.get("/workflow_templates").get("nimblediff", [])
            expected = sorted(p.stem for p in TEMPLATES.glob("*.json"))
            if sorted(listed) != expected:
                failed.append("/workflow_templates")
                print(f"/workflow_templates lists {sorted(listed)}, expected {expected}")
            for name in listed:               # the thumbnail URL the frontend asks for
                try:
                    with urllib.request.urlopen(f"{server.url}/api/workflow_templates/nimblediff/{name}.jpg",
                                                timeout=30) as r:
                        if r.read(3) != b"\xff\xd8\xff":
                            failed.append(f"{name}.jpg (not a JPEG)")
                except urllib.error.HTTPError as e:
                    failed.append(f"{name}.jpg ({e.code})")
            print(f"the server lists {len(listed)} templates of the pack")
        finally:
            server.stop()
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
