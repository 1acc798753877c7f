"""Swap the forward of named submodules, all or nothing, and put them back. Pure torch: a patch names module
paths ("up_blocks.1", "transformer_blocks.0"), never framework classes."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections import Counter
from typing import Callable

import torch

from ...errors import InvalidParameterError

Wrapper = Callable[..., object]     # wrapper(original_forward, *args, **kwargs) -> output


def resolve(model: torch.nn.Module, paths) -> dict[str, torch.nn.Module]:
    """{path: submodule}; an unknown path raises naming it and the closest valid paths, before anything changes."""
    named = dict(model.named_modules())
    out = {}
    for p in paths:
        if not isinstance(p, str) or p not in named or p == "":
            near = difflib.get_close_matches(str(p), [n for n in named if n], n=3)
            raise InvalidParameterError(f"module path {p!r} is not in {type(model).__name__}"
                                        + (f"; closest: {', '.join(near)}" if near else ""))
        out[p] = named[p]
    return out


class ModelPatch:
    """Replace `module.forward` of each path with `functools.partial(wrapper, original_forward)`.

    Used as a context manager (ComfyUI: patched for one model call only, so clones sharing the module stay
    untouched) or with install() / remove() (diffusers pipelines). Paths are resolved in __init__, so a bad path
    raises before the model changes."""

    def __init__(self, model: torch.nn.Module, wrappers: dict[str, Wrapper]):
        self.modules = resolve(model, list(wrappers))
        self.wrappers = wrappers
        self._saved: dict[str, object] | None = None

    def install(self) -> "ModelPatch":
        if self._saved is not None:
            raise InvalidParameterError("this patch is already installed")
        saved = {}
        for p, m in self.modules.items():
            saved[p] = m.__dict__.get("forward")                     # an instance-level forward we must restore
            m.forward = functools.partial(self.wrappers[p], m.forward)
        self._saved = saved
        return self

    def remove(self) -> None:
        if self._saved is None:
            return
        for p, m in self.modules.items():
            if self._saved[p] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = self._saved[p]
        self._saved = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()


@contextlib.contextmanager
def count_calls(model: torch.nn.Module, paths=None):
    """Counter {path: calls} of modules that actually ran (a module skipped by a cache is called, but its children
    are not: count leaf or inner paths to see skipped work)."""
    counts: Counter = Counter()
    named = resolve(model, paths) if paths is not None else {n: m for n, m in model.named_modules() if n}
    handles = [m.register_forward_pre_hook(lambda _m, _a, p=p: counts.update([p])) for p, m in named.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
