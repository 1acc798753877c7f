"""LoRA operation nodes (nodes/adapter_ops.py) with ComfyUI-shaped inputs and stub comfy modules.

References: diffusers load_lora_weights + fuse_lora (a peer reader and patcher), hand-worked block factors from the
LDM key names, and core calls for the file operations (the nodes must add nothing but translation).
"""

import copy
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import fake_comfy  # noqa: E402
import lora_files  # noqa: E402

from nimblediff.core.adapters.merge import merge  # noqa: E402
from nimblediff.core.adapters.rank import prune_to_budget, resize_lora, weight_shape  # noqa: E402
from nimblediff.errors import (AdapterMismatchError, InvalidParameterError, NimbleDiffError,  # noqa: E402
                               WeightsFormatError)
from nimblediff.nodes import adapter_ops as ops  # noqa: E402
from nimblediff.weights.lora_formats import read_lora  # noqa: E402

# the tiny SD1.5-layout UNet as ComfyUI's model_detection describes it
UNET_CONFIG = {"model_channels": 4, "channel_mult": [1, 2, 2, 2], "num_res_blocks": [2, 2, 2, 2],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
               "transformer_depth_middle": 1}


class Patcher(fake_comfy.FakeModelPatcher):
    """The stub MODEL plus ModelPatcher.model_state_dict with the patches applied (as after load_models_gpu with
    force_patch_weights=True)."""

    def clone(self):
        c = Patcher(self.model, self.model_sampling)
        c.patches = {k: list(v) for k, v in self.patches.items()}
        return c

    def model_state_dict(self, filter_prefix=None):
        return {k: v for k, v in self.patched_state_dict().items()
                if filter_prefix is None or k.startswith(filter_prefix)}


@pytest.fixture(scope="module")
def pipe():
    return factories.tiny_sd15_pipeline(0, layout="sd15")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return {f"{k}.safetensors": path for k, path in lora_files.two_loras(pipe, folder).items()}


@pytest.fixture
def comfy(files, tmp_path):
    """Stub comfy modules: the LoRA files by name, models/loras at tmp_path/loras, a progress bar that records."""
    fake_comfy.install(dict(files))
    loras = tmp_path / "loras"
    loras.mkdir()
    sys.modules["folder_paths"].get_folder_paths = lambda kind: [str(loras)]
    calls = types.SimpleNamespace(progress=[], loaded=[])
    mm = types.ModuleType("comfy.model_management")
    mm.load_models_gpu = lambda models, force_patch_weights=False: calls.loaded.append((models, force_patch_weights))
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls.progress.append((value, total))

    utils.ProgressBar = ProgressBar
    sys.modules.update({"comfy.model_management": mm, "comfy.utils": utils})
    sys.modules["comfy"].model_management, sys.modules["comfy"].utils = mm, utils
    calls.folder = loras
    yield calls
    for name in ("comfy.model_management", "comfy.utils"):
        sys.modules.pop(name, None)
    fake_comfy.uninstall()


def comfy_model_and_clip(unet_sd, te_sd, unet_config):
    ldm = factories.unet_to_ldm(unet_sd, unet_config, prefix="diffusion_model.")
    te = {f"clip_l.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in te_sd.items()}
    model = Patcher(types.SimpleNamespace(state_dict=lambda: ldm), None, dict(UNET_CONFIG))
    clip = fake_comfy.FakeCLIP(types.SimpleNamespace(state_dict=lambda: te))
    return model, clip, ldm, te


@pytest.fixture(scope="module")
def reference(pipe, files):
    """What diffusers (load_lora_weights + fuse_lora at scale 1) adds to each weight, per file:
    {name: (UNet deltas in ComfyUI keys, text-encoder deltas in transformers keys)}. Fusing is linear in the scale."""
    out = {}
    ldm0 = factories.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config, prefix="diffusion_model.")
    te0 = pipe.text_encoder.state_dict()
    for name, path in files.items():
        unet, te = lora_files.diffusers_fused(copy.deepcopy(pipe), path, scale=1.0)
        ldm = factories.unet_to_ldm(unet, pipe.unet.config, prefix="diffusion_model.")
        out[name] = ({k: v - ldm0[k] for k, v in ldm.items()}, {k: v - te0[k] for k, v in te.items()})
    return out


def dense(d):
    return d.delta_weight(weight_shape(d))


def assert_same_deltas(ours, ref, atol=1e-6):
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(dense(ours[k]), dense(ref[k]), rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------------------- patching
def test_stack_equals_the_loras_applied_one_after_another(comfy, pipe, reference):
    from nimblediff.nodes.adapters import LoRALoader

    model, clip, ldm, te = comfy_model_and_clip(pipe.unet.state_dict(), pipe.text_encoder.state_dict(),
                                                pipe.unet.config)
    slots = dict(lora_1="a.safetensors", strength_model_1=0.8, strength_clip_1=0.5,
                 lora_2="None", strength_model_2=1.0, strength_clip_2=1.0,
                 lora_3="b.safetensors", strength_model_3=-0.6, strength_clip_3=1.0,
                 lora_4="None", strength_model_4=1.0, strength_clip_4=1.0)
    new_model, new_clip, report = ops.LoRAStack().apply(model, clip, **slots)
    assert model.patches == {} and clip.patcher.patches == {}          # the inputs are never patched
    assert "lora_1" in report and "lora_3" in report and "lora_2" not in report
    # 1. the same patches as two LoRA loaders in a row
    m1, c1, _ = LoRALoader().load(model, clip, "a.safetensors", 0.8, 0.5)
    m2, c2, _ = LoRALoader().load(m1, c1, "b.safetensors", -0.6, 1.0)
    ours, seq = new_model.patched_state_dict(), m2.patched_state_dict()
    assert all(torch.equal(ours[k], seq[k]) for k in ldm)
    # 2. what diffusers adds for the same two LoRAs (UNet at the model strengths, CLIP at the clip ones)
    (ua, ta), (ub, tb) = reference["a.safetensors"], reference["b.safetensors"]
    assert sum(bool(ua[k].any()) for k in ldm) > 20
    for k in ldm:
        torch.testing.assert_close(ours[k], ldm[k] + 0.8 * ua[k] - 0.6 * ub[k], rtol=0, atol=2e-6, msg=k)
    ours_te = new_clip.patcher.patched_state_dict()
    for k, v in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(ours_te[f"clip_l.transformer.text_model.{k}"], v + 0.5 * ta[k] + tb[k],
                                   rtol=0, atol=2e-6, msg=k)


def test_stack_validates_every_slot_before_patching(comfy, pipe, files, tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(junk))
    names = {**files, "junk.safetensors": str(junk)}
    sys.modules["folder_paths"].get_full_path_or_raise = lambda kind, name: names[name]
    model, clip, _, _ = comfy_model_and_clip(pipe.unet.state_dict(), pipe.text_encoder.state_dict(), pipe.unet.config)
    slots = {f"lora_{i}": "None" for i in range(1, 5)}
    slots.update(lora_1="a.safetensors", lora_2="junk.safetensors")
    with pytest.raises(NimbleDiffError, match=r"lora_2 \(junk.safetensors\).*foo.bar"):
        ops.LoRAStack().apply(model, clip, **slots)
    assert model.patches == {} and clip.patcher.patches == {}
    with pytest.raises(WeightsFormatError, match="lora_1='missing.safetensors'"):
        ops.LoRAStack().apply(model, clip, **{**slots, "lora_1": "missing.safetensors", "lora_2": "None"})
    out_model, out_clip, report = ops.LoRAStack().apply(model, clip, **{k: "None" for k in slots})
    assert out_model is model and out_clip is clip and report == "no LoRA selected"


def _block_factor(ldm_key: str, table: dict) -> float:
    """By hand from the LDM name: input_blocks / middle_block / output_blocks; output_blocks 3-5 are up_blocks.1."""
    parts = ldm_key.split(".")
    if parts[1] == "input_blocks":
        return table["input"]
    if parts[1] == "middle_block":
        return table["middle"]
    if parts[1] == "output_blocks":
        return table["output.1"] if int(parts[2]) in (3, 4, 5) else table["output"]
    return 1.0


def test_block_weights_scale_only_the_chosen_blocks(comfy, pipe, reference):
    model, clip, ldm, te = comfy_model_and_clip(pipe.unet.state_dict(), pipe.text_encoder.state_dict(),
                                                pipe.unet.config)
    table = {"input": 0.5, "middle": 1.0, "output": 0.0, "output.1": 2.0}
    new_model, new_clip, report = ops.LoRABlockWeights().apply(
        model, clip, "a.safetensors", 0.8, 0.5, unet_input=0.5, unet_middle=1.0, unet_output=0.0,
        dit_double=1.0, dit_single=1.0, blocks="output.1 = 2")
    assert model.patches == {} and "left out" in report
    delta, te_delta = reference["a.safetensors"]
    ours = new_model.patched_state_dict()
    seen = set()
    for k, w in ldm.items():
        factor = _block_factor(k, table)
        torch.testing.assert_close(ours[k], w + 0.8 * factor * delta[k], rtol=0, atol=2e-6, msg=k)
        if delta[k].abs().max() > 0:
            seen.add(factor)
            if factor == 0:
                assert torch.equal(ours[k], w)
    assert seen == {0.5, 1.0, 0.0, 2.0}
    ours_te = new_clip.patcher.patched_state_dict()       # the text encoder follows strength_clip only
    for k, v in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(ours_te[f"clip_l.transformer.text_model.{k}"], v + 0.5 * te_delta[k],
                                   rtol=0, atol=2e-6)


@pytest.mark.parametrize("spec, match", [("input.1=abc", "input.1=abc"), ("input.1", "name=number"),
                                         ("foo=1", "unknown block names.*foo")])
def test_block_weights_bad_spec_names_the_entry(comfy, pipe, spec, match):
    model, clip, _, _ = comfy_model_and_clip(pipe.unet.state_dict(), pipe.text_encoder.state_dict(), pipe.unet.config)
    with pytest.raises(InvalidParameterError, match=match):
        ops.LoRABlockWeights().apply(model, clip, "a.safetensors", 1.0, 1.0, blocks=spec)
    assert model.patches == {}


# -------------------------------------------------------------------------------------------------------- files
def test_resize_node_writes_core_result_and_refuses_to_overwrite(comfy, files):
    node = ops.LoRAResize()
    (report,) = node.resize("a.safetensors", 2, "none", 0.9, "small", "peft", "fp32", False)
    path = comfy.folder / "small.safetensors"
    assert str(path) in report and "ranks 2..2" in report
    expected, _ = resize_lora(read_lora(files["a.safetensors"])[0], rank=2)
    assert_same_deltas(read_lora(path)[0], expected)
    before = path.read_bytes()
    with pytest.raises(WeightsFormatError, match=f"{path}: exists; set overwrite to true"):
        node.resize("a.safetensors", 1, "none", 0.9, "small", "peft", "fp32", False)
    assert path.read_bytes() == before
    node.resize("a.safetensors", 1, "none", 0.9, "small", "kohya", "fp32", True)     # explicit overwrite
    assert path.read_bytes() != before and all(d.rank == 1 for d in read_lora(path)[0].values())
    for bad in ("../escape", "/abs/path"):
        with pytest.raises(InvalidParameterError, match="relative path inside"):
            node.resize("a.safetensors", 1, "none", 0.9, bad, "peft", "fp32", False)
    with pytest.raises(InvalidParameterError, match="sv_ratio=0.5"):
        node.resize("a.safetensors", 4, "sv_ratio", 0.5, "other", "peft", "fp32", False)


def test_prune_node_keeps_the_budget(comfy, files):
    (report,) = ops.LoRAPrune().prune("a.safetensors", "fraction", 0.5, "relative", 0, "pruned", "kohya", "fp32", False)
    expected, rep = prune_to_budget(read_lora(files["a.safetensors"])[0], fraction=0.5, dtype=torch.float32)
    assert f"-> {rep.params} parameters" in report
    assert_same_deltas(read_lora(comfy.folder / "pruned.safetensors")[0], expected, atol=1e-6)


@pytest.mark.parametrize("method, rank", [("dare_ties", 0), ("ties", 2)])
def test_merge_node_equals_core_merge(comfy, files, method, rank):
    slots = dict(lora_1="a.safetensors", weight_1=0.7, lora_2="None", weight_2=1.0,
                 lora_3="b.safetensors", weight_3=-0.4, lora_4="None", weight_4=1.0)
    (report,) = ops.LoRAMerge().merge(method=method, density=0.5, seed=3, rank=rank, filename="m", layout="kohya",
                                      dtype="fp32", overwrite=False, **slots)
    a, b = read_lora(files["a.safetensors"])[0], read_lora(files["b.safetensors"])[0]
    expected, _ = merge([a, b], [0.7, -0.4], method, density=0.5, seed=3, rank=rank or None)
    assert_same_deltas(read_lora(comfy.folder / "m.safetensors")[0], expected, atol=1e-5)
    assert comfy.progress and comfy.progress[-1][0] == comfy.progress[-1][1] == len(expected)
    assert f"{method} of 2 LoRAs" in report


def test_merge_node_bad_inputs(comfy):
    none = {f"lora_{i}": "None" for i in range(1, 5)}
    with pytest.raises(InvalidParameterError, match="all None"):
        ops.LoRAMerge().merge("linear", 1.0, 0, 8, "m", "kohya", "fp16", False, **none)
    with pytest.raises(InvalidParameterError, match="peft layout cannot hold"):
        ops.LoRAMerge().merge("linear", 1.0, 0, 0, "m", "peft", "fp16", False, **{**none, "lora_1": "a.safetensors"})
    with pytest.raises(InvalidParameterError, match="method='darex_q'"):
        ops.LoRAMerge().merge("darex_q", 1.0, 0, 8, "m", "kohya", "fp16", False, **{**none, "lora_1": "a.safetensors"})


def test_extract_node_recovers_a_fused_lora(comfy, pipe, reference):
    """tuned = base with LoRA a fused by diffusers; the extracted rank-4 LoRA reproduces the difference."""
    base, _, ldm, _ = comfy_model_and_clip(pipe.unet.state_dict(), {}, pipe.unet.config)
    tuned_ldm = {k: v + reference["a.safetensors"][0][k] for k, v in ldm.items()}
    tuned = Patcher(types.SimpleNamespace(state_dict=lambda: tuned_ldm), None, dict(UNET_CONFIG))
    (report,) = ops.LoRAExtract().extract(tuned, base, 4, "none", 0.9, 1.0, 0.0, "extracted", "comfyui", "fp32", False)
    assert [m for m, force in comfy.loaded] == [[tuned], [base]] and all(force for _, force in comfy.loaded)
    got = read_lora(comfy.folder / "extracted.safetensors")[0]
    adapted = {k for k in ldm if k.endswith(".weight") and not torch.equal(ldm[k], tuned_ldm[k])}
    assert len(got) == len(adapted) > 20 and "ranks 4..4" in report     # unchanged layers are skipped
    ours = Patcher(types.SimpleNamespace(state_dict=lambda: ldm), None, dict(UNET_CONFIG))
    from nimblediff.nodes.adapters import comfy_target, comfy_patches

    u, _, unmatched = comfy_patches(got, ours, None, comfy_target(ours, None))
    assert not unmatched
    ours.add_patches(u, 1.0)
    patched = ours.patched_state_dict()
    for k in ldm:
        torch.testing.assert_close(patched[k], tuned_ldm[k], rtol=0, atol=2e-5, msg=k)
    with pytest.raises(InvalidParameterError, match="do not differ"):
        ops.LoRAExtract().extract(base, base, 4, "none", 0.9, 1.0, 0.0, "same", "kohya", "fp32", False)


def test_extract_node_rejects_a_non_unet_model(comfy, pipe):
    base, _, _, _ = comfy_model_and_clip(pipe.unet.state_dict(), {}, pipe.unet.config)
    base.model.model_config.unet_config = {"image_model": "flux", "depth": 1}
    with pytest.raises(AdapterMismatchError, match="base_model: its ComfyUI unet_config"):
        ops.LoRAExtract().extract(base, base, 4, "none", 0.9, 1.0, 0.0, "x", "kohya", "fp32", False)


# ------------------------------------------------------------------------------------------------------ schema
SHIPPED = {  # node id -> input names in widget order: saved workflows depend on them, never change or reorder
    "NimbleLoRAStack": ["model"] + [f"{p}_{i}" for i in range(1, 5) for p in ("lora", "strength_model",
                                                                               "strength_clip")] + ["clip"],
    "NimbleLoRABlockWeights": ["model", "clip", "lora_name", "strength_model", "strength_clip", "unet_input",
                               "unet_middle", "unet_output", "dit_double", "dit_single", "blocks"],
    "NimbleLoRAResize": ["lora_name", "rank", "dynamic_method", "dynamic_param", "filename", "layout", "dtype",
                         "overwrite"],
    "NimbleLoRAPrune": ["lora_name", "budget", "amount", "score", "min_rank", "filename", "layout", "dtype",
                        "overwrite"],
    "NimbleLoRAMerge": [f"{p}_{i}" for i in range(1, 5) for p in ("lora", "weight")]
    + ["method", "density", "seed", "rank", "filename", "layout", "dtype", "overwrite"],
    "NimbleLoRAExtract": ["tuned_model", "base_model", "rank", "dynamic_method", "dynamic_param", "clamp_quantile",
                          "min_diff", "filename", "layout", "dtype", "overwrite"],
}


def test_node_schemas_are_frozen_and_registered():
    import nimblediff

    for node_id, names in SHIPPED.items():
        cls = nimblediff.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        assert [*spec["required"], *spec.get("optional", {})] == names, node_id
        assert cls.CATEGORY == "NimbleDiff/adapters" and callable(getattr(cls, cls.FUNCTION))
        assert getattr(cls, "OUTPUT_NODE", False) == ("filename" in names)
