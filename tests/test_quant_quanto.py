"""optimum-quanto and torchao checkpoints (weights/quanto_io.py, weights/torchao_io.py and their pipelines/ loaders)
against the peers themselves: the fixtures in tests/data/quanto were written by diffusers' QuantoConfig with
optimum-quanto 0.2.7 and TorchAoConfig with torchao 0.18 (tests/data/quanto/make_fixture.py), with the peer's own
dequantized weights and forward output beside them."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nimblediff.core.quant.int4 import Int4Weight
from nimblediff.core.quant.int8 import Int8Weight
from nimblediff.core.quant.modules import QuantLinear
from nimblediff.errors import InvalidParameterError, WeightsFormatError
from nimblediff.pipelines.quantized_quanto import load_quanto_denoiser, load_quanto_into

DATA = Path(__file__).parent / "data" / "quanto"
LAYERS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
          "transformer_blocks.0.norm1.linear")


@pytest.fixture(scope="module")
def reference():
    return load_file(DATA / "reference.safetensors")


def _inputs(ref):
    return {k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith("input.")}


def _forward(model, ref, fast=True):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qweight.fast = fast
    with torch.no_grad():
        return model(**_inputs(ref)).sample


def test_int8_codes_and_scales_are_quantos(reference):
    """int8: the same codes and per-channel scales, so the dequantized weights equal quanto's bit for bit, and the
    dequantizing forward equals quanto's output; the int8 kernel (bf16 activations) stays within 1%."""
    model = load_quanto_denoiser(DATA / "int8")
    modules = dict(model.named_modules())
    for name in LAYERS:
        assert isinstance(modules[name], QuantLinear) and isinstance(modules[name].qweight, Int8Weight)
        assert torch.equal(modules[name].qweight.dequantize(), reference[f"int8.{name}.weight"])
    want = reference["int8.output"]
    torch.testing.assert_close(_forward(model, reference, fast=False), want, atol=1e-5, rtol=1e-5)
    assert (_forward(model, reference) - want).abs().max() <= 1e-2 * want.abs().max()


def test_int4_groups_map_onto_ours(reference):
    """int4: quanto's groups of 128 (ff.net.2, rows of 256) and row-wide groups (rows of 64) become Int4Weight
    groups of the same size; weights equal quanto's up to the fp16 storage of scale and shift."""
    model = load_quanto_denoiser(DATA / "int4")
    modules = dict(model.named_modules())
    assert modules["transformer_blocks.0.ff.net.2"].qweight.group == 128
    assert modules["transformer_blocks.0.ff.net.0.proj"].qweight.group == 64
    for name in LAYERS:
        w, want = modules[name].qweight, reference[f"int4.{name}.weight"]
        assert isinstance(w, Int4Weight)
        assert (w.dequantize() - want).abs().max() <= 2e-3 * want.abs().max()
    want = reference["int4.output"]
    assert (_forward(model, reference, fast=False) - want).abs().max() <= 5e-3 * want.abs().max()


def test_a_row_wide_group_outside_ours_is_padded_exactly():
    """A row of 48 quantized as one group (quanto's per-axis int4) is 2 of our groups of 32 (16 padded), each
    with the row's scale: the dequantized weight is quanto's formula scale * q - shift, computed by hand."""
    from nimblediff.weights.quanto_io import _qbits

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (4, 48), generator=g, dtype=torch.uint8)
    scale, shift = torch.rand(4, 1, generator=g) + 0.5, torch.rand(4, 1, generator=g)
    packed = q[:2] | (q[2:] << 4)         # quanto: rows i and i + R (R = 2) share byte row i
    w = _qbits("w", packed, scale, shift, torch.Size((4, 48)), "t")
    assert isinstance(w, Int4Weight) and (w.group, w.pad) == (32, 16)
    want = scale * q.float() - shift
    assert (w.dequantize() - want).abs().max() <= 2e-3 * want.abs().max()


def test_not_quanto_and_broken_files_are_named(tmp_path):
    """A plain checkpoint, a missing scale and a wrong shape are WeightsFormatErrors naming the file and key; the
    target model is unchanged after a failed load."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(DATA / "int8"))
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    broken = tmp_path / "int8"
    shutil.copytree(DATA / "int8", broken)
    file = broken / "diffusion_pytorch_model.safetensors"
    sd = load_file(file)
    del sd["transformer_blocks.0.attn.to_k.weight._scale"]
    save_file(sd, file)
    with pytest.raises(WeightsFormatError, match="to_k.weight._scale"):
        load_quanto_into(model, broken)
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    plain = {k: v for k, v in sd.items() if "._" not in k}
    save_file(plain, file)
    with pytest.raises(WeightsFormatError, match="plain checkpoint"):
        load_quanto_into(model, broken)
    with pytest.raises(WeightsFormatError, match="no such file"):
        load_quanto_denoiser(tmp_path / "missing")
    with pytest.raises(InvalidParameterError, match="no model config"):
        load_quanto_denoiser(file)


def test_torchao_int8_weight_only_keeps_its_codes(reference):
    """torchao Int8Tensor (per row) -> Int8Weight with its codes and scales: our fp32 dequantization equals
    torchao's bf16 one to bf16 rounding, and the model's output torchao's (computed in bf16) to 2%."""
    pytest.importorskip("torchao")
    from nimblediff.pipelines.quantized_torchao import load_torchao_denoiser

    model = load_torchao_denoiser(DATA / "torchao_int8")
    modules = dict(model.named_modules())
    for name in LAYERS:
        w, want = modules[name].qweight, reference[f"torchao_int8.{name}.weight"]
        assert isinstance(w, Int8Weight)
        assert (w.dequantize() - want).abs().max() <= 2 ** -8 * want.abs().max()
    want = reference["torchao_int8.output"]
    assert (_forward(model, reference, fast=False) - want).abs().max() <= 2e-2 * want.abs().max()


def test_torchao_errors_are_named(tmp_path):
    """A folder without .bin files, a plain pickle and a missing config are named errors."""
    pytest.importorskip("torchao")
    from nimblediff.pipelines.quantized_torchao import load_torchao_denoiser

    with pytest.raises(WeightsFormatError, match="no .bin"):
        load_torchao_denoiser(DATA / "int8")
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(DATA / "torchao_int8" / "config.json", plain / "config.json")
    torch.save({"x.weight": torch.zeros(2, 2)}, plain / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsFormatError, match="plain checkpoint"):
        load_torchao_denoiser(plain)
    with pytest.raises(InvalidParameterError, match="no model config"):
        load_torchao_denoiser(DATA / "torchao_int8" / "diffusion_pytorch_model.bin")
