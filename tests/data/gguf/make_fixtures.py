"""Rebuild the GGUF fixtures in this folder with ComfyUI-GGUF's own tools (see README.md for the versions used).

    python tests/data/gguf/make_fixtures.py <ComfyUI-GGUF checkout> [<patched llama-quantize binary>]

1. `source_state_dict(name)` makes the source weights: deterministic random values (one seeded generator per
   tensor, so the test suite can rebuild them on any machine) in the shapes of a diffusers model, renamed to the
   original layout ComfyUI-GGUF's converter requires (LDM ``model.diffusion_model.*`` for the SD1.5-layout UNets,
   BFL ``double_blocks.*`` for Flux), saved as .safetensors under a temporary folder.
2. ``tools/convert.py --src <that file> --dst <name>-F16.gguf`` (ComfyUI-GGUF's converter) writes the F16 files.
3. With a llama-quantize built from llama.cpp tag b3962 + ComfyUI-GGUF's ``tools/lcpp.patch`` (their documented
   route to quantized files), ``llama-quantize <name>-F16.gguf <name>-<TYPE>.gguf <TYPE> 1`` writes the quantized
   ones. Build: ``cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
   -DCMAKE_C_FLAGS=-ffp-contract=off && cmake --build build --target llama-quantize``: without contraction off, the
   compiler fuses ggml's ``a*b - c*d`` into FMA instructions and a few K-quant bytes depend on the build machine.
   Nothing of either project is kept in this repository.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# name -> (model builder config, original layout, quantized types to make)
FIXTURES = {
    "sd1_tiny": ("unet", dict(block_out_channels=(4, 8, 8, 8), attention_levels=3), ()),
    "sd1_small": ("unet", dict(block_out_channels=(4, 8, 16, 16), attention_levels=3), ("Q4_K_S", "Q6_K")),
    "flux_tiny": ("flux", {}, ("Q8_0", "Q4_0")),
}


def unet_config(block_out_channels, attention_levels: int) -> dict:
    """SD1.5's block layout (4 levels x 2 resnets, LDM indices input_blocks.0-11 / output_blocks.0-11) at tiny widths,
    cross-attention in the first `attention_levels` levels."""
    down = ("CrossAttnDownBlock2D",) * attention_levels + ("DownBlock2D",) * (4 - attention_levels)
    up = ("UpBlock2D",) * (4 - attention_levels) + ("CrossAttnUpBlock2D",) * attention_levels
    return dict(block_out_channels=tuple(block_out_channels), layers_per_block=2, in_channels=4, out_channels=4,
                sample_size=16, down_block_types=down, up_block_types=up, cross_attention_dim=8,
                norm_num_groups=2, attention_head_dim=2)


FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])


def build_model(name: str):
    """The diffusers model whose shapes (and config) the fixture has, with the fixture's source weights loaded."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    kind, cfg, _ = FIXTURES[name]
    model = UNet2DConditionModel(**unet_config(**cfg)) if kind == "unet" else FluxTransformer2DModel(**FLUX_CONFIG)
    model.load_state_dict(_values(name, {k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return model.eval()


def _values(name: str, shapes: dict) -> dict:
    """Seeded values per tensor: weights ~ N(0, 1/fan_in), 1-D tensors ~ 1 + N(0, 0.1^2) (norm scales) / N(0, 0.1^2)
    (biases). A generator seeded from (fixture, key) makes each tensor independent of the others' order."""
    out = {}
    for key, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{key}".encode()))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            out[key] = x / fan_in ** 0.5
        elif key.endswith("weight") or key.endswith("scale"):
            out[key] = 1 + 0.1 * x
        else:
            out[key] = 0.1 * x
    return out


def source_state_dict(name: str) -> dict:
    """The source file's tensors (original layout, the key names the converter saw, prefix included for UNets)."""
    from nimblediff.weights.gguf_io import to_original

    model = build_model(name)
    sd = model.state_dict()
    if FIXTURES[name][0] == "unet":
        return {f"model.diffusion_model.{k}": v for k, v in to_original(sd, "sd15", model.config).items()}
    return to_original(sd, "flux")


def main(comfy_gguf: str, quantize: str | None = None) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, _, qtypes) in FIXTURES.items():
            src = Path(tmp) / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in source_state_dict(name).items()}, str(src))
            f16 = HERE / f"{name}-F16.gguf"
            subprocess.run([sys.executable, str(Path(comfy_gguf) / "tools" / "convert.py"), "--src", str(src),
                            "--dst", str(f16)], check=True, input=b"\n")
            for qtype in qtypes if quantize else ():
                subprocess.run([quantize, str(f16), str(HERE / f"{name}-{qtype}.gguf"), qtype], check=True)
            if name != "sd1_tiny":
                f16.unlink()  # only the smallest F16 file is kept; the quantized ones were made from the others


if __name__ == "__main__":
    main(*sys.argv[1:])
