"""The math of NimbleDiff: pure torch (and numpy). Never imports comfy, diffusers, transformers or peft."""
