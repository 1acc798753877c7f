"""GGUF files (weights/gguf_io.py, pipelines/quantized_gguf.py): files made by ComfyUI-GGUF's converter and
llama.cpp, files we write, diffusers' own GGUF loading, and bad files.

References: the `gguf` package (GGUFReader + gguf.quants.dequantize) on the same bytes, the fixtures' source
weights (rebuilt by tests/data/gguf/make_fixtures.py), llama.cpp's quantizer (the K-quant fixtures' bytes), and
diffusers' `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` on the same file.
"""

import importlib.util
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nimblediff.core.quant.gguf_quantize import quantize_rows
from nimblediff.core.quant.gguf_weight import GGUFWeight
from nimblediff.core.quant.modules import QuantModule, quantized_modules
from nimblediff.errors import WeightsFormatError
from nimblediff.pipelines.quantized_gguf import load_gguf_denoiser, load_gguf_into
from nimblediff.weights.gguf_io import install, read_gguf, to_diffusers, to_original, write_gguf

torch.set_num_threads(1)
DATA = Path(__file__).parent / "data" / "gguf"
_spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

# fixture file -> (source name, types in it besides F32/F16, relative RMS error bound per quantized tensor)
FIXTURES = {
    "sd1_tiny-F16.gguf": ("sd1_tiny", set(), 1e-3),
    "sd1_small-Q4_K_S.gguf": ("sd1_small", {"Q4_K", "Q5_K"}, 0.12),
    "sd1_small-Q6_K.gguf": ("sd1_small", {"Q6_K"}, 0.03),
    "flux_tiny-F16.gguf": ("flux_tiny", set(), 1e-3),
    "flux_tiny-Q8_0.gguf": ("flux_tiny", {"Q8_0"}, 0.01),
    "flux_tiny-Q4_0.gguf": ("flux_tiny", {"Q4_0"}, 0.15),
}


@pytest.fixture(scope="module")
def sources():
    return {name: {k.removeprefix("model.diffusion_model."): v for k, v in mf.source_state_dict(name).items()}
            for name in {s for s, _, _ in FIXTURES.values()}}


def _float(v) -> torch.Tensor:
    return v.dequantize() if isinstance(v, GGUFWeight) else v.float()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _model_weights(model) -> dict:
    """Every parameter of a model as float: our QuantModules and diffusers' GGUFParameters dequantized."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    out = {}
    quant = quantized_modules(model) if any(isinstance(m, QuantModule) for m in model.modules()) else {}
    for name, m in quant.items():
        out[f"{name}.weight"] = m.qweight.dequantize()
    for k, v in model.state_dict().items():
        if ".qweight." in k:
            continue
        out[k] = (dequantize_gguf_tensor(v) if hasattr(v, "quant_type") else v).float()
    return out


# ---------------------------------------------------------------------------------------- ComfyUI-GGUF files
@pytest.mark.parametrize("file", sorted(FIXTURES))
def test_fixture_matches_source_within_quantization_error(file, sources):
    name, qtypes, bound = FIXTURES[file]
    f = read_gguf(DATA / file)
    assert f.arch == ("flux" if name.startswith("flux") else "sd15") and f.layout == "original"
    assert set(f.qtypes) - {"F32", "F16"} == qtypes
    src = sources[name]
    assert set(f.tensors) == set(src)
    for key, v in f.tensors.items():
        assert tuple(v.shape) == tuple(src[key].shape), key
        err = _rel(_float(v), src[key])
        if isinstance(v, GGUFWeight):
            assert err < bound, (key, v.qtype, err)
        else:
            assert err < 1e-3, key  # F32 exact, F16 rounding


@pytest.mark.parametrize("file", sorted(FIXTURES))
def test_fixture_values_equal_gguf_reader(file):
    """Our tensors, bit for bit, are what the gguf package reads and dequantizes, reshaped by ComfyUI-GGUF's
    comfy.gguf.orig_shape metadata."""
    f = read_gguf(DATA / file)
    reader = gguf.GGUFReader(str(DATA / file))
    reshaped = 0
    for t in reader.tensors:
        ref = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is not None:
            assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            ref = ref.reshape([int(field.parts[i][0]) for i in field.data])
            reshaped += 1
        np.testing.assert_array_equal(_float(f.tensors[t.name]).numpy(), ref.reshape(f.tensors[t.name].shape))
    assert reshaped > 0 or file.startswith("flux")  # the SD1 files exercise the conv-kernel reshape


@pytest.mark.parametrize("file", ["sd1_small-Q4_K_S.gguf", "sd1_small-Q6_K.gguf"])
def test_llama_cpp_kquant_bytes_equal_our_writer(file, sources):
    """llama.cpp's quantizer (tag b3962 + ComfyUI-GGUF's patch) quantized the F16 file; our writer, given the same
    values, writes the same bytes (see README.md in tests/data/gguf: built without FMA contraction). The F16 file
    held tensors of <= 1024 values as F32, the rest as F16."""
    f = read_gguf(DATA / file)
    src = sources["sd1_small"]
    n = 0
    for key, v in f.tensors.items():
        if isinstance(v, GGUFWeight) and v.qtype in ("Q4_K", "Q5_K", "Q6_K"):
            x = src[key] if src[key].numel() <= 1024 else src[key].half().float()
            ours = quantize_rows(x.reshape(v.stored_shape), v.qtype)
            assert torch.equal(ours, v.blocks), (key, v.qtype, (ours != v.blocks).float().mean().item())
            n += 1
    assert n == 47


@pytest.mark.parametrize("file", sorted(FIXTURES))
def test_fixture_loads_into_diffusers_model(file):
    name = FIXTURES[file][0]
    ref = mf.build_model(name)
    model = load_gguf_denoiser(DATA / file, dict(ref.config))
    quant = quantized_modules(model)   # fused qkv / linear1 rows split into their diffusers layers, still quantized
    assert len(quant) == sum(isinstance(v, GGUFWeight) for v in to_diffusers(read_gguf(DATA / file), ref).values())
    assert len(quant) > 0 or "F16" in file
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name.startswith("sd1"):
            args = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 3, 8, generator=g))
            out, want = model(*args).sample, ref(*args).sample
        else:
            kw = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                      encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                      pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
            out, want = model(**kw).sample, ref(**kw).sample
    assert _rel(out, want) < 2 * FIXTURES[file][2] + 1e-3


# ------------------------------------------------------------------------------------------ our files, diffusers
def _flux_256(seed=0):
    """A Flux-shaped transformer with 256-wide rows, so K-quant blocks fit without reshaping."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                  pooled_projection_dim=256, axes_dims_rope=[16, 56, 56]).eval()


def _tiny(arch):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import factories

    if arch == "sd15":   # widths of 32 / 64 so Linear rows hold whole 32-blocks
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(**{**mf.unet_config((32, 32, 64, 64), 3), "cross_attention_dim": 32}).eval()
    if arch == "sdxl":
        return factories.tiny_sdxl_unet(0).eval()
    if arch == "flux":
        return _flux_256()
    return {"sd3": factories.tiny_sd3_components, "pixart": factories.tiny_pixart_components}[arch](0)["transformer"]


# PixArt has no from_single_file in diffusers, and the tiny SDXL UNet no row of 32: the round trip below covers them
CASES = [("sd15", "Q8_0"), ("sd15", "Q4_0"), ("sd3", "Q5_1"), ("flux", "Q4_K"), ("flux", "Q6_K")]


def _same_weights(ours, theirs):
    """diffusers dequantizes in float16 (its dequant functions run in the scales' dtype), we in float32 as gguf's
    numpy reference does: equal to float16 rounding."""
    a, b = _model_weights(ours), _model_weights(theirs)
    assert set(a) == set(b)
    for k in a:
        scale = float(a[k].abs().max()) if a[k].numel() else 0.0
        torch.testing.assert_close(a[k], b[k].reshape(a[k].shape), rtol=0, atol=5e-3 * scale + 1e-12, msg=k)


@pytest.mark.parametrize("arch,qtype", CASES)
def test_our_files_load_like_diffusers_gguf(arch, qtype, tmp_path):
    """A diffusers-layout file we write: diffusers' own GGUF loader and ours give the same dequantized weights, and
    the same outputs."""
    from diffusers import GGUFQuantizationConfig

    model = _tiny(arch)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    counts = write_gguf(path, model.state_dict(), arch, qtype, flatten=False)
    assert counts[qtype] > 0
    sub = "unet" if arch in ("sd15", "sdxl") else "transformer"
    model.save_config(tmp_path / "cfg" / sub)
    ours = load_gguf_denoiser(path, tmp_path / "cfg")
    theirs = type(model).from_single_file(str(path), config=str(tmp_path / "cfg"), subfolder=sub,
                                          quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                          local_files_only=True)
    _same_weights(ours, theirs)
    assert len(quantized_modules(ours)) == counts[qtype]


def test_original_layout_round_trip_and_diffusers_sd3(tmp_path):
    """SD3 in the original MMDiT layout (fused qkv): ours and diffusers' converter agree."""
    from diffusers import GGUFQuantizationConfig

    model = _tiny("sd3")
    path = tmp_path / "sd3.gguf"
    write_gguf(path, to_original(model.state_dict(), "sd3"), "sd3", "Q8_0", flatten=False)
    f = read_gguf(path)
    assert f.layout == "original" and "joint_blocks.0.x_block.attn.qkv.weight" in f.tensors
    model.save_config(tmp_path / "cfg" / "transformer")
    ours = load_gguf_denoiser(path, tmp_path / "cfg")
    theirs = type(model).from_single_file(str(path), config=str(tmp_path / "cfg"), subfolder="transformer",
                                          quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                          local_files_only=True)
    _same_weights(ours, theirs)
    assert quantized_modules(ours)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "flux", "pixart"])
def test_write_read_round_trip_both_layouts(arch, tmp_path):
    model = _tiny(arch) if arch != "flux" else mf.build_model("flux_tiny")
    sd = model.state_dict()
    for layout, tensors in (("diffusers", sd), ("original", to_original(sd, arch, getattr(model, "config", None)))):
        path = tmp_path / f"{layout}.gguf"
        write_gguf(path, tensors, arch, "Q8_0")
        f = read_gguf(path)
        assert f.layout == layout and f.file_arch == {"sd15": "sd1"}.get(arch, arch)
        back = to_diffusers(f, model)
        assert set(back) == set(sd)
        for k, v in back.items():
            assert _rel(_float(v), sd[k]) < 0.01, k
        again = tmp_path / f"{layout}-again.gguf"
        write_gguf(again, f.tensors, arch, "Q8_0")   # quantized tensors are written back as they are
        g = read_gguf(again)
        for k, v in f.tensors.items():
            if isinstance(v, GGUFWeight):
                assert torch.equal(g.tensors[k].blocks, v.blocks) and g.tensors[k].shape == v.shape


def test_comfyui_gguf_conventions_in_our_files(tmp_path):
    """What ComfyUI-GGUF's loader reads: its arch string, keys without a prefix, orig_shape as ARRAY of INT32 for
    conv kernels stored as rows of 256."""
    model = mf.build_model("sd1_small")
    path = tmp_path / "sd1.gguf"
    write_gguf(path, to_original(model.state_dict(), "sd15", model.config), "sd15", "Q4_K")
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == "sd1"
    names = {t.name: t for t in reader.tensors}
    assert not any(n.startswith("model.") for n in names)
    sd = to_original(model.state_dict(), "sd15", model.config)
    convs = [k for k, v in sd.items() if v.ndim == 4 and v.numel() > 1024 and v.numel() % 256 == 0]
    assert convs
    for key in convs:
        field = reader.get_field(f"comfy.gguf.orig_shape.{key}")
        assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
        assert [int(field.parts[i][0]) for i in field.data] == list(sd[key].shape)
        assert names[key].tensor_type == gguf.GGMLQuantizationType.Q4_K
    small = [k for k, v in sd.items() if v.numel() <= 1024]
    assert all(names[k].tensor_type == gguf.GGMLQuantizationType.F32 for k in small)


# ------------------------------------------------------------------------------------------------- bad files
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snap):
    sd, types = snap
    now = model.state_dict()
    return types == [type(m) for m in model.modules()] and set(now) == set(sd) and all(
        torch.equal(now[k], sd[k]) for k in sd)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999, 200, 30, 3])
def test_truncated_file_is_refused_and_model_unchanged(cut, tmp_path):
    src = (DATA / "sd1_small-Q4_K_S.gguf").read_bytes()
    n = int(len(src) * cut) if cut < 1 else cut
    path = tmp_path / "cut.gguf"
    path.write_bytes(src[:n])
    model = mf.build_model("sd1_small")
    snap = _snapshot(model)
    with pytest.raises(WeightsFormatError, match="cut.gguf"):
        load_gguf_into(model, path)
    assert _unchanged(model, snap)


def _write_raw(path, arch, tensors):
    w = gguf.GGUFWriter(path=None, arch=arch)
    for name, data, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file(path=str(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_named(tmp_path):
    path = tmp_path / "llm.gguf"
    _write_raw(path, "llama", [("blk.0.attn_q.weight", np.zeros((4, 32), np.float32), None)])
    with pytest.raises(WeightsFormatError, match=r"'llama'.*supported: \['flux', 'pixart', 'sd1', 'sd3', 'sdxl'\]"):
        read_gguf(path)


def test_unsupported_tensor_type_named(tmp_path):
    model = mf.build_model("flux_tiny")
    sd = to_original(model.state_dict(), "flux")
    path = tmp_path / "iq.gguf"
    tensors = [(k, v.numpy(), None) for k, v in sd.items() if k != "img_in.weight"]
    iq4 = np.zeros((32, 16 // 32 * 18 + 18), np.uint8)   # one IQ4_NL block per row of 32
    tensors.append(("img_in.weight", iq4, gguf.GGMLQuantizationType.IQ4_NL))
    _write_raw(path, "flux", tensors)
    with pytest.raises(WeightsFormatError, match="'img_in.weight' has type IQ4_NL.*supported: .*Q4_K"):
        read_gguf(path)


def test_not_a_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightsFormatError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(WeightsFormatError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


def test_wrong_model_or_missing_keys_leave_model_unchanged(tmp_path):
    other = mf.build_model("sd1_tiny")        # same block names, other widths
    snap = _snapshot(other)
    with pytest.raises(WeightsFormatError, match="file shape"):
        load_gguf_into(other, DATA / "sd1_small-Q4_K_S.gguf")
    assert _unchanged(other, snap)
    model = mf.build_model("sd1_small")
    snap = _snapshot(model)
    f = read_gguf(DATA / "sd1_small-Q4_K_S.gguf")
    sd = to_diffusers(f, model)
    sd.pop("conv_in.weight")
    with pytest.raises(WeightsFormatError, match="not in the file.*conv_in.weight"):
        install(model, sd, "partial")
    sd = to_diffusers(f, model)
    sd["up_blocks.0.resnets.0.conv1.bias"] = torch.full_like(sd["up_blocks.0.resnets.0.conv1.bias"], float("nan"))
    with pytest.raises(WeightsFormatError, match="not finite"):
        install(model, sd, "nan")
    assert _unchanged(model, snap)


def test_writer_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.gguf"
    shutil.copy(DATA / "flux_tiny-Q8_0.gguf", path)
    before = path.read_bytes()
    model = mf.build_model("flux_tiny")
    boom = RuntimeError("disk full")

    def fail(*a, **k):
        raise boom

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(path, to_original(model.state_dict(), "flux"), "flux", "Q4_0")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.gguf"]


def test_the_tiny_unet_in_comfyuis_layout_is_detected_as_sd1():
    """NimbleDiff-Tiny has one layer per level, so its first downsampler is input_blocks.2 (SD1.5: 3): the quantize
    node refused it ("not a UNet ... NimbleDiff can save quantized") before the generic LDM-UNet rule."""
    import json

    from diffusers import UNet2DConditionModel

    from nimblediff.weights.gguf_io import detect_arch
    from nimblediff.weights.keymaps import UNetLayout, read_unet_config, unet_diffusers_to_ldm

    tiny = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "nimblediff-tiny"
    unet = UNet2DConditionModel.from_config(json.loads((tiny / "unet" / "config.json").read_text()))
    keys = unet_diffusers_to_ldm(unet.state_dict(), UNetLayout.from_diffusers_config(read_unet_config(tiny)),
                                 prefix="")
    assert "input_blocks.3.0.op.weight" not in keys and detect_arch(keys) == "sd1"
    assert detect_arch({**keys, "label_emb.0.0.weight": None}) == "sdxl"
