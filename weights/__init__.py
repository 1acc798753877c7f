"""Weights on disk: safetensors I/O, architecture detection, key maps between layouts, LoRA readers.

| module            | owns                                                                                   |
|-------------------|----------------------------------------------------------------------------------------|
| safetensors_io    | reading/writing weight files; every failure a WeightsFormatError naming the file        |
| keymaps           | diffusers <-> original LDM names (UNet from a structural layout, VAE, CLIP)             |
| dit_keymaps       | diffusers <-> original DiT module names (PixArt, SD3 MMDiT, Flux BFL), fused qkv splits |
| arch              | which base a LoRA was made for, which base a target is                                  |
| lora_formats      | any LoRA layout (PEFT/diffusers, kohya, ComfyUI, LyCORIS, DiT originals) -> canonical     |
|                   | {module: Delta} (LoRA, LoHa, LoKr, DoRA, Diff, Sparse, Factored); apply_lora             |
"""

from .arch import ArchGuess, detect_lora_arch, detect_model_arch
from .keymaps import UNetLayout
from .lora_formats import LoRAReport, Target, apply_lora, read_lora
from .safetensors_io import load_state_dict, load_with_metadata, read_header, save_state_dict

__all__ = [
    "ArchGuess", "detect_lora_arch", "detect_model_arch", "UNetLayout", "LoRAReport", "Target", "apply_lora",
    "read_lora", "load_state_dict", "load_with_metadata", "read_header", "save_state_dict",
]
