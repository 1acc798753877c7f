"""NimbleDiff-Tiny: a small real text-to-image model trained here on CPU, its Flash LoRA, and its evaluator.

| file | owns |
|---|---|
| `data.py` | procedural captioned scenes (64x64, one or two shapes) with exact labels, seedable |
| `vocab.py` | the 26-word grammar, an in-memory CLIPTokenizer (one token per word), `check_prompt` |
| `model.py` | AutoencoderKL / CLIPTextModel / UNet2DConditionModel configs, SD schedule, pipeline assembly |
| `train.py` | `python -m nimblediff.tiny.train --stage vae|unet|flash|all`: resumable CPU training |
| `flash.py` | Flash Diffusion distillation loss, LoRA attach / save |
| `evaluate.py` | v2: whole-prompt accuracy (every stated word, objects matched jointly), per-attribute accuracy with 95% intervals, chance levels, paired differences; v1 attribute accuracies; Frechet feature distance |
| `heldout.py` | the held-out prompt set (512 scenes from a seed training never uses) with fixed noise seeds |
| `package.py` | writes weights/tiny/ (fp16 pipeline, Flash LoRA, MODEL_CARD.md) |

Nothing here is imported by `nimblediff/__init__.py`; importing these modules needs torch, diffusers, transformers.
"""
