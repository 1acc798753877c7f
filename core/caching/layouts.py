"""Block maps: which paths of a denoiser are blocks, for the layouts the caches know. A patch names these paths.

| layout | classes | blocks |
|---|---|---|
| unet | diffusers UNet2DConditionModel | down_blocks.i / mid_block / up_blocks.i, each with resnets.j, attentions.j |
| comfy-unet | ComfyUI openaimodel.UNetModel | input_blocks.i / middle_block / output_blocks.i |
| dit | diffusers SD3Transformer2DModel, FluxTransformer2DModel | transformer_blocks.i (+ single_transformer_blocks.i) |
| comfy-mmdit | ComfyUI mmdit.MMDiT / OpenAISignatureMMDITWrapper (SD3) | joint_blocks.i |

A class matches through its bases too (a subclass of ComfyUI's MMDiT, as NimbleDiff's DiT loader builds, is
comfy-mmdit). `BLOCK_IO` says how a DiT layout's blocks are called: diffusers' take (hidden_states,
encoder_hidden_states, ...), ComfyUI's JointBlock takes (context, x, ...); both return (encoder, hidden).
"""

from __future__ import annotations

import torch

from ...errors import InvalidParameterError

LAYOUTS = {"UNet2DConditionModel": "unet", "UNetModel": "comfy-unet",
           "SD3Transformer2DModel": "dit", "FluxTransformer2DModel": "dit",
           "OpenAISignatureMMDITWrapper": "comfy-mmdit", "MMDiT": "comfy-mmdit"}
DIT_LAYOUTS = ("dit", "comfy-mmdit")
_DIT_LISTS = {"dit": ("transformer_blocks", "single_transformer_blocks"),    # in call order
              "comfy-mmdit": ("joint_blocks",)}
# layout: (position of hidden, keyword of hidden, position of encoder, keyword of encoder) in a block call
BLOCK_IO = {"dit": (0, "hidden_states", 1, "encoder_hidden_states"),
            "comfy-mmdit": (1, "x", 0, "context")}


def _layout_of(model) -> str | None:
    return next((LAYOUTS[c.__name__] for c in type(model).__mro__ if c.__name__ in LAYOUTS), None)


def detect_layout(model: torch.nn.Module, want: tuple[str, ...] | None = None) -> str:
    """The model's layout; an unknown class (or one the method does not support) raises naming it."""
    name = type(model).__name__
    layout = _layout_of(model)
    if layout is None or (want is not None and layout not in want):
        ok = [c for c, lay in LAYOUTS.items() if want is None or lay in want]
        raise InvalidParameterError(f"model type {name} is not supported by this cache; supported: {', '.join(ok)}")
    return layout


def _len(module, name) -> int:
    sub = getattr(module, name, None)
    return len(sub) if sub is not None else 0


def deepcache_paths(model: torch.nn.Module, block: int = 0, layer: int = 0) -> list[str]:
    """The paths DeepCache (Ma et al. 2024, its DeepCacheSDHelper rule) reuses for branch (block, layer): every
    down/up block deeper than the branch and the mid block; inside the branch block, down layers >= layer and up
    layers counted from the output side > layer. Only the shallow path (conv_in, the branch's first layers, the
    last up layers, conv_out) then runs on an off-step. ComfyUI's UNetModel takes depth = block * (L + 1) + layer
    (L layers per level): input_blocks past depth, middle_block, and the output blocks that consume them."""
    layout = detect_layout(model, ("unet", "comfy-unet"))
    if layout == "comfy-unet":
        n = len(model.input_blocks)
        nrb = getattr(model, "num_res_blocks", 1)            # ComfyUI stores a list, one entry per level
        per = (nrb[0] if isinstance(nrb, (list, tuple)) else int(nrb)) + 1
        depth = block * per + layer
        if not 0 <= depth < n - 1:
            raise InvalidParameterError(f"branch block={block}, layer={layer} (depth {depth}) is outside "
                                        f"{type(model).__name__}'s {n} input blocks")
        return ([f"input_blocks.{i}" for i in range(depth + 1, n)] + ["middle_block"]
                + [f"output_blocks.{i}" for i in range(n - 1 - depth)])
    downs, ups = model.down_blocks, model.up_blocks
    if not (0 <= block < len(downs)) or not (0 <= layer < _len(downs[block], "resnets") + 1):
        raise InvalidParameterError(f"branch block={block}, layer={layer} is outside {type(model).__name__}: "
                                    f"block in 0..{len(downs) - 1}, layer in 0..{_len(downs[0], 'resnets')}")
    paths = []
    for i, d in enumerate(downs):
        if i > block or (i == block and layer == 0):
            paths.append(f"down_blocks.{i}")
        elif i == block:
            for kind in ("resnets", "attentions"):
                paths += [f"down_blocks.{i}.{kind}.{j}" for j in range(layer, _len(d, kind))]
            if _len(d, "downsamplers"):       # DeepCache numbers the downsampler as layer len(resnets)
                paths.append(f"down_blocks.{i}.downsamplers.0")
    paths.append("mid_block")
    n_up = len(ups)
    for i, u in enumerate(ups):
        r = n_up - 1 - i                      # DeepCache counts up blocks from the output side
        if r > block:
            paths.append(f"up_blocks.{i}")
        elif r == block:
            L = _len(u, "resnets")
            for kind in ("resnets", "attentions"):
                paths += [f"up_blocks.{i}.{kind}.{j}" for j in range(_len(u, kind)) if L - 1 - j > layer]
    return paths


def dit_block_paths(model: torch.nn.Module) -> list[str]:
    """The transformer blocks in call order (Flux: double blocks, then single blocks)."""
    layout = detect_layout(model, DIT_LAYOUTS)
    return [f"{name}.{i}" for name in _DIT_LISTS[layout] for i in range(_len(model, name))]


def block_io(model: torch.nn.Module) -> tuple[int, str, int, str]:
    """How the model's transformer blocks take (hidden, encoder): BLOCK_IO of its layout; diffusers' order for a
    model of another class whose blocks a caller names itself."""
    return BLOCK_IO.get(_layout_of(model), BLOCK_IO["dit"])
