"""NimbleDiff: few-step samplers, adapter loaders and more, for ComfyUI and Diffusers.

This file is also the ComfyUI entry point. Importing it never imports comfy or diffusers: the node modules
import ComfyUI lazily inside their functions.
"""

__version__ = "0.1.0"

from .errors import NimbleDiffError  # noqa: E402
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "NimbleDiffError", "__version__"]
