"""NimbleDiff: few-step samplers, adapter loaders and more, for ComfyUI and Diffusers.

This file is also the ComfyUI entry point. Importing it never imports comfy or diffusers: the node modules
import ComfyUI lazily inside their functions.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path  # noqa: E402

_TINY = _Path(__file__).parent / "weights" / "tiny"
TINY_MODEL = str(_TINY / "nimblediff-tiny")                                  # the embedded diffusers SD folder
TINY_FLASH_LORA = str(_TINY / "nimblediff-tiny-flash-lora.safetensors")     # its 4-step Flash LoRA
TINY_FIT4 = str(_TINY / "nimblediff-tiny-fit4.json")                        # a 4-step solver fitted to it at CFG 5
TINY_DIT = str(_TINY / "nimblediff-tiny-dit")                               # the rectified-flow SD3 DiT folder
TINY_DIT_BOSS4 = str(_TINY / "nimblediff-tiny-dit-boss4.json")              # BOSS 4-step schedule for it at CFG 3
TINY_DIT_INSTAFLOW = str(_TINY / "nimblediff-tiny-dit-instaflow")            # its one-step InstaFlow transformer
TINY_DIT_2RF = str(_TINY / "nimblediff-tiny-dit-2rf")                        # its 2-rectified-flow transformer
TINY_DIT_FLASH_LORA = str(_TINY / "nimblediff-tiny-dit-flash-lora.safetensors")  # its 4-step Flash LoRA
TINY_DIT_CLEAR_LORA = str(_TINY / "nimblediff-tiny-dit-clear-lora.safetensors")  # its CLEAR local-attention LoRA

from .errors import NimbleDiffError  # noqa: E402
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NimbleDiffError", "TINY_DIT", "TINY_DIT_2RF",
           "TINY_DIT_BOSS4", "TINY_DIT_CLEAR_LORA", "TINY_DIT_FLASH_LORA", "TINY_DIT_INSTAFLOW", "TINY_FIT4",
           "TINY_FLASH_LORA", "TINY_MODEL", "__version__"]
