"""Writes the quanto and torchao fixtures (run with both installed: pip install --no-deps optimum-quanto==0.2.7
torchao==0.18.0): a tiny SD3 transformer quantized by diffusers' QuantoConfig (int8, int4) and TorchAoConfig (int8
weight-only, bf16) and saved by save_pretrained, plus reference.safetensors: the peer's own dequantized weights and
forward output on a fixed input (what tests/test_quant_quanto.py compares NimbleDiff's readers against).

    python tests/data/quanto/make_fixture.py
"""

from pathlib import Path

import torch
from diffusers import QuantoConfig, SD3Transformer2DModel
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=32, num_attention_heads=2,
              joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
              pos_embed_max_size=8)
LAYERS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
          "transformer_blocks.0.norm1.linear")


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))


def main():
    torch.manual_seed(0)
    float_dir = HERE / "_float"
    SD3Transformer2DModel(**CONFIG).save_pretrained(float_dir)
    ref = {f"input.{k}": v for k, v in inputs().items()}
    for dtype in ("int8", "int4"):
        q = SD3Transformer2DModel.from_pretrained(float_dir, quantization_config=QuantoConfig(weights_dtype=dtype))
        q.save_pretrained(HERE / dtype)
        with torch.no_grad():
            ref[f"{dtype}.output"] = q(**inputs()).sample
        modules = dict(q.named_modules())
        for name in LAYERS:
            ref[f"{dtype}.{name}.weight"] = modules[name].weight.dequantize().float().contiguous()
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    q = SD3Transformer2DModel.from_pretrained(float_dir, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                              torch_dtype=torch.bfloat16)
    q.save_pretrained(HERE / "torchao_int8", safe_serialization=False)
    with torch.no_grad():
        ref["torchao_int8.output"] = q(**{k: v.bfloat16() if v.is_floating_point() else v
                                          for k, v in inputs().items()}).sample.float()
    modules = dict(q.named_modules())
    for name in LAYERS:
        ref[f"torchao_int8.{name}.weight"] = modules[name].weight.dequantize().float().contiguous()
    save_file(ref, HERE / "reference.safetensors")
    import shutil

    shutil.rmtree(float_dir)


if __name__ == "__main__":
    main()
