"""A user's ComfyUI environment may hold a peft that diffusers refuses, or none: NimbleDiff's own LoRA path, the
pipeline and the node pack must not depend on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import sys
sys.modules["peft"] = None           # `import peft` now raises ImportError, as if it were not installed
import torch, nimblediff
from nimblediff import NODE_CLASS_MAPPINGS
from nimblediff.pipelines import FewStepPipeline
assert NODE_CLASS_MAPPINGS
pipe = FewStepPipeline.from_pretrained(nimblediff.TINY_MODEL)
pipe.set_progress_bar_config(disable=True)
out = {}
for fuse in (True, False):
    pipe.load_lora(nimblediff.TINY_FLASH_LORA, fuse=fuse)
    out[f"fuse={fuse}"] = pipe("a red circle in the center", num_inference_steps=4, output_type="pt",
                               sampler="lcm", schedule="lcm", generator=torch.Generator().manual_seed(0)).images
    pipe.unload_loras()
assert "peft" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
torch.save(out, sys.argv[1])
"""


def test_lora_path_works_without_peft(tmp_path):
    import nimblediff
    from nimblediff.pipelines import FewStepPipeline

    saved = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(saved)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    without = torch.load(saved, weights_only=True)
    # the same calls here, where peft is importable: the result must not depend on it
    pipe = FewStepPipeline.from_pretrained(nimblediff.TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora(nimblediff.TINY_FLASH_LORA)
    with_peft = pipe("a red circle in the center", num_inference_steps=4, output_type="pt", sampler="lcm",
                     schedule="lcm", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(without["fuse=True"], with_peft, atol=1e-5, rtol=0)
    # hooked and fused LoRAs compute the same function (to float rounding)
    torch.testing.assert_close(without["fuse=False"], without["fuse=True"], atol=2e-3, rtol=0)
