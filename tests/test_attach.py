"""Unfused (hooked) LoRAs give the fused model's output; detaching restores the base model exactly."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.core.adapters.apply import fuse  # noqa: E402
from nimblediff.core.adapters.attach import attach  # noqa: E402
from nimblediff.core.adapters.delta import LoRA  # noqa: E402
from nimblediff.errors import NimbleDiffError  # noqa: E402


def _lora_for(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_v", "proj_in")):
            deltas[f"unet.{name}"] = LoRA(torch.randn(2, m.in_features, generator=g) * 0.1,
                                          torch.randn(m.out_features, 2, generator=g) * 0.1, alpha=1.0)
        elif isinstance(m, torch.nn.Conv2d) and name.endswith("conv1") and m.kernel_size == (3, 3):
            deltas[f"unet.{name}"] = LoRA(torch.randn(2, m.in_channels, 3, 3, generator=g) * 0.1,
                                          torch.randn(m.out_channels, 2, 1, 1, generator=g) * 0.1, alpha=2.0)
    return deltas


def test_attached_equals_fused_and_detach_restores():
    unet = factories.tiny_sd15_unet(0).eval()
    deltas = _lora_for(unet)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        base = unet(x, 500, ctx).sample
        handle = attach({"unet": unet}, deltas, 0.7)
        hooked = unet(x, 500, ctx).sample
        handle.detach()
        assert torch.equal(unet(x, 500, ctx).sample, base)
        fused_handle = fuse({"unet": unet}, deltas, 0.7)
        fused = unet(x, 500, ctx).sample
        fused_handle.unfuse()
    assert len(handle.applied) == len(deltas) > 4
    torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-5)
    assert (hooked - base).abs().max() > 1e-3


def test_hooked_forward_under_autograd_equals_no_grad_and_backpropagates():
    """The hooks add in place only when no graph is recorded: with autograd on (PTI tunes an embedding through the
    model) the output is the same and gradients reach the input, equal to the fused model's."""
    unet = factories.tiny_sd15_unet(0).eval()
    deltas = _lora_for(unet, seed=1)
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim)
    handle = attach({"unet": unet}, deltas, 0.7)
    with torch.no_grad():
        plain = unet(x, 500, ctx).sample
    c = ctx.clone().requires_grad_()
    out = unet(x, 500, c).sample
    out.square().sum().backward()
    handle.detach()
    fused_handle = fuse({"unet": unet}, deltas, 0.7)
    c_ref = ctx.clone().requires_grad_()
    unet(x, 500, c_ref).sample.square().sum().backward()
    fused_handle.unfuse()
    torch.testing.assert_close(out.detach(), plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-4, atol=1e-5)


def test_attach_rejects_bad_delta_without_hooking():
    unet = factories.tiny_sd15_unet(0)
    deltas = _lora_for(unet)
    key = next(iter(deltas))
    deltas[key] = LoRA(deltas[key].down, deltas[key].up * float("nan"))
    with pytest.raises(NimbleDiffError, match="NaN"):
        attach({"unet": unet}, deltas)
    assert not any(m._forward_hooks for m in unet.modules())
