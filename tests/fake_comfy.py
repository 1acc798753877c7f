"""Just enough of ComfyUI's module surface to call NimbleDiff's node functions in CI (ComfyUI is not on PyPI).

Real-ComfyUI behaviour is covered by tests/test_comfyui_real.py when COMFYUI_PATH is set; these stubs only give
the node functions the objects they receive in a graph: a ModelPatcher-like MODEL, a CLIP with a patcher, and the
KSAMPLER / model_sampling / folder_paths entry points.
"""

from __future__ import annotations

import sys
import types

import torch


class EPS:
    def __init__(self, sigmas):
        self.sigmas = sigmas


class CONST:
    shift = 1.0


class KSAMPLER:
    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function = sampler_function
        self.extra_options = extra_options


class FakeModelPatcher:
    """ModelPatcher's contract: clone() shares weights, add_patches() records (strength, patch) per known key."""

    def __init__(self, module, model_sampling=None, unet_config=None):
        self.model = module
        self.patches = {}
        self.model_sampling = model_sampling
        if unet_config is not None:
            module.model_config = types.SimpleNamespace(unet_config=unet_config)

    def clone(self):
        c = FakeModelPatcher(self.model, self.model_sampling)
        c.patches = {k: list(v) for k, v in self.patches.items()}
        return c

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd = self.model.state_dict()
        applied = []
        for k, v in patches.items():
            if k in sd:
                self.patches.setdefault(k, []).append((strength_patch, v))
                applied.append(k)
        return applied

    def get_model_object(self, name):
        return self.model_sampling if name == "model_sampling" else getattr(self.model, name)

    def patched_state_dict(self):
        """The weights ComfyUI would compute: W + strength * delta for each patch (LoRA or diff)."""
        out = {}
        for k, w in self.model.state_dict().items():
            w = w.clone().float()
            for strength, patch in self.patches.get(k, []):
                kind, values = patch if isinstance(patch, tuple) else ("lora", patch.weights)
                if kind == "diff":
                    w += strength * values[0].float().reshape(w.shape)
                else:
                    up, down, alpha = values[0].float(), values[1].float(), values[2]
                    scale = 1.0 if alpha is None else alpha / down.shape[0]
                    w += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            out[k] = w
        return out


class OptionsPatcher(FakeModelPatcher):
    """FakeModelPatcher with ModelPatcher's model_options (transformer_options, model_function_wrapper), copied one
    level deep by clone() as ComfyUI does: what model patches and wrappers install on a clone."""

    def __init__(self, module):
        super().__init__(module)
        self.model_options = {"transformer_options": {}}

    def clone(self):
        c = type(self)(self.model)
        c.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        return c

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


class FakeCLIP:
    def __init__(self, module):
        self.patcher = FakeModelPatcher(module)

    def clone(self):
        c = FakeCLIP(self.patcher.model)
        c.patcher = self.patcher.clone()
        return c

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def install(loras: dict | None = None, input_dir=None, output_dir=None):
    """Register stub comfy modules in sys.modules (undo with uninstall()). input_dir / output_dir: ComfyUI's input
    and output folders (absent when not given: a node reading a file name finds no folder to look in)."""
    loras = loras or {}
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER = KSAMPLER
    model_sampling = types.ModuleType("comfy.model_sampling")
    model_sampling.EPS, model_sampling.CONST = EPS, CONST
    weight_adapter = types.ModuleType("comfy.weight_adapter")   # absent -> legacy ("lora", values) tuples
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda kind: sorted(loras) if kind == "loras" else []
    folder_paths.get_full_path_or_raise = lambda kind, name: loras[name]
    folder_paths.get_folder_paths = lambda kind: []
    if input_dir is not None:
        folder_paths.get_input_directory = lambda: str(input_dir)
    if output_dir is not None:
        folder_paths.get_output_directory = lambda: str(output_dir)
    model_management = types.ModuleType("comfy.model_management")
    model_management.intermediate_device = lambda: torch.device("cpu")
    comfy.samplers, comfy.model_sampling, comfy.model_management = samplers, model_sampling, model_management
    sys.modules.update({"comfy": comfy, "comfy.samplers": samplers, "comfy.model_sampling": model_sampling,
                        "comfy.model_management": model_management, "folder_paths": folder_paths})
    sys.modules.pop("comfy.weight_adapter", None)
    del weight_adapter


def install_sample(**functions):
    """A stub comfy.sample holding `functions` (sample_custom, sample, prepare_noise: each test's stand-ins), after
    install(); uninstall() removes it."""
    sample = types.ModuleType("comfy.sample")
    for name, fn in functions.items():
        setattr(sample, name, fn)
    sys.modules["comfy.sample"] = sys.modules["comfy"].sample = sample


def uninstall():
    for name in ("comfy", "comfy.samplers", "comfy.model_sampling", "comfy.model_management", "comfy.sample",
                 "folder_paths"):
        sys.modules.pop(name, None)


class GuidedModel(torch.nn.Module):
    """What KSAMPLER hands a sampler: KSamplerX0Inpaint(guider) whose inner_model.inner_model has model_sampling."""

    def __init__(self, denoiser, model_sampling, cfg=1.0):
        super().__init__()
        self.denoiser = denoiser
        self.inner_model = types.SimpleNamespace(
            cfg=cfg, inner_model=types.SimpleNamespace(model_sampling=model_sampling))

    def forward(self, x, sigma, **extra):
        return self.denoiser(x, sigma)
