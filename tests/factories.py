"""Tiny random diffusers models, built offline in well under a second each, seeded. Used by tests/ and bench/.

Configs follow ../shared/notes/diffusers-offline.md section 1 (diffusers' own ``get_dummy_components``, smaller).
Nothing here downloads: tokenizers are built from in-memory vocabularies, models from configs.

    tiny_sd15_components(seed) -> dict for StableDiffusionPipeline(**components)      (also sdxl/pixart/sd3/flux)
    tiny_sd15_layout_unet()    -> UNet with the real SD1.5 block layout at tiny widths (every LDM block index)
    sd15_shaped_unet(scale)    -> random UNet with the real SD1.5 layout, full size at scale=1 (~860M params)
    sd15_to_ldm(pipe)          -> original single-file state dict (model.diffusion_model.*, first_stage_model.*, ...)
"""

from __future__ import annotations

import string
import torch

__all__ = [
    "tiny_clip_tokenizer", "tiny_clip_text_encoder", "tiny_t5_tokenizer", "tiny_t5_encoder", "tiny_t5",
    "tiny_vae", "tiny_sd15_unet", "tiny_sd15_layout_unet", "tiny_sd15_layout_vae", "sd15_shaped_unet",
    "tiny_sd15_components", "tiny_sd15_pipeline", "save_tiny_sd15",
    "tiny_sdxl_components", "tiny_sdxl_pipeline", "tiny_pixart_components", "tiny_pixart_pipeline",
    "tiny_sd3_components", "tiny_sd3_pipeline", "tiny_flux_components", "tiny_flux_pipeline",
    "unet_to_ldm", "vae_to_ldm", "text_encoder_to_ldm", "sd15_to_ldm",
]


def _seeded(seed: int, build):
    """Build under a fixed global seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# ---------------------------------------------------------------------------------------------------------- text
def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable characters, one per byte, in byte order."""
    from nimblediff.tiny.vocab import bytes_to_unicode

    return [c for _, c in sorted(bytes_to_unicode().items())]


_CLIP_WORDS = ("a", "photo", "of", "cat", "dog", "the", "in", "on", "red", "blue", "painting", "astronaut", "horse")


def tiny_clip_tokenizer(model_max_length: int = 77):
    """CLIP byte-level BPE with a ~540-token vocabulary (transformers >= 5 in-memory constructor); no unk."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(piece, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _CLIP_WORDS:  # merge each word left to right into one token "word</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_text_encoder(hidden: int = 8, with_projection: bool = False, projection_dim: int | None = None,
                           num_layers: int = 2, seed: int = 0):
    """CLIPTextModel (or CLIPTextModelWithProjection) with `hidden` width, 2 layers, 2 heads, vocab 1000."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=num_layers, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(config))


def tiny_t5_tokenizer():
    """Unigram T5 tokenizer (~130 pieces): <pad>=0, </s>=1, <unk>=2, '▁', '▁a'..'▁z', ASCII, a few words."""
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁"] + ["▁" + c for c in string.ascii_lowercase]
    pieces += [c for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += ["▁" + w for w in _CLIP_WORDS if len(w) > 1]
    vocab = [(p, 0.0 if i < 3 else -float(len(pieces) - i) / len(pieces) - (10.0 if len(p) == 1 else 0.0))
             for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=160, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return _seeded(seed, lambda: T5EncoderModel(config))


def tiny_t5(d_model: int = 32, seed: int = 0):
    """(tokenizer, encoder) pair."""
    return tiny_t5_tokenizer(), tiny_t5_encoder(d_model, seed)


# ----------------------------------------------------------------------------------------------------------- vae
def tiny_vae(seed: int = 0, *, flow: bool = False, latent_channels: int = 4, block_out_channels=(4, 8)):
    """AutoencoderKL with two blocks (vae_scale_factor 2). flow=True: the SD3/Flux variant (no quant convs)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                 scaling_factor=1.5035) if flow else {}
    return _seeded(seed, lambda: AutoencoderKL(
        block_out_channels=list(block_out_channels), layers_per_block=1, norm_num_groups=2,
        latent_channels=latent_channels, in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n, **extra))


def tiny_sd3_vae(seed: int = 0):
    return tiny_vae(seed, flow=True)


def tiny_flux_vae(seed: int = 0):
    return tiny_vae(seed, flow=True)


def tiny_sd15_layout_vae(seed: int = 0):
    """A 4-level VAE (the SD1.5 layout: 4 levels, 2 resnets per encoder level) at tiny widths."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        block_out_channels=[4, 8, 8, 8], layers_per_block=2, norm_num_groups=2, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4))


# ---------------------------------------------------------------------------------------------------------- unet
def tiny_sd15_unet(seed: int = 0, cross_attention_dim: int = 8):
    """2-level UNet, 16.9k params (notes section 1)."""
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=2, attention_head_dim=2))


_SD15_UNET = dict(
    layers_per_block=2, in_channels=4, out_channels=4, sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def tiny_sd15_layout_unet(seed: int = 0, cross_attention_dim: int = 8, block_out_channels=(4, 8, 8, 8)):
    """The real SD1.5 block layout (4 levels, 2 resnets each, CrossAttn x3 + Down) at tiny widths.

    Every LDM index of SD1.5 exists here (input_blocks.0-11, middle_block.0-2, output_blocks.0-11), so key maps
    tested on it cover the real model.
    """
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), cross_attention_dim=cross_attention_dim, norm_num_groups=2,
        attention_head_dim=2, **_SD15_UNET))


def sd15_shaped_unet(scale: float = 1.0, *, block_out_channels=None, cross_attention_dim: int = 768, seed: int = 0,
                     dtype: torch.dtype = torch.float32):
    """Random UNet with the real SD1.5 layout. scale=1: full size, 859.5M params; scale=0.2: (64,128,256,256).

    Widths are rounded to multiples of 32 (GroupNorm(32)) and 8 heads are kept, as in SD1.5.
    """
    from diffusers import UNet2DConditionModel

    if block_out_channels is None:
        block_out_channels = tuple(max(32, int(round(c * scale / 32)) * 32) for c in (320, 640, 1280, 1280))
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), cross_attention_dim=cross_attention_dim, norm_num_groups=32,
        attention_head_dim=8, **_SD15_UNET))
    return unet if dtype == torch.float32 else unet.to(dtype)


# ----------------------------------------------------------------------------------------------------- pipelines
def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def tiny_sd15_components(seed: int = 0, *, layout: str = "tiny") -> dict:
    """Components for StableDiffusionPipeline(**c). layout="sd15": 4-level UNet and VAE (real SD1.5 block layout)."""
    if layout not in ("tiny", "sd15"):
        raise ValueError(f"layout={layout!r}: use 'tiny' (2 levels) or 'sd15' (the real 4-level block layout)")
    real = layout == "sd15"
    return dict(
        unet=tiny_sd15_layout_unet(seed) if real else tiny_sd15_unet(seed),
        vae=tiny_sd15_layout_vae(seed + 1) if real else tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_encoder(8, seed=seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=_ddim(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def tiny_sd15_pipeline(seed: int = 0, *, layout: str = "tiny"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd15_components(seed, layout=layout))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd15(folder, seed: int = 0, *, layout: str = "tiny"):
    """save_pretrained a tiny SD1.5 pipeline into `folder`; returns the pipeline."""
    pipe = tiny_sd15_pipeline(seed, layout=layout)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def tiny_sdxl_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32, norm_num_groups=2))


def tiny_sdxl_components(seed: int = 0) -> dict:
    from diffusers import EulerDiscreteScheduler

    return dict(
        unet=tiny_sdxl_unet(seed), vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip_text_encoder(16, seed=seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(16, with_projection=True, projection_dim=16, seed=seed + 3),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        image_encoder=None, feature_extractor=None,
    )


def tiny_pixart_components(seed: int = 0) -> dict:
    from diffusers import PixArtTransformer2DModel

    transformer = _seeded(seed, lambda: PixArtTransformer2DModel(
        sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate"))
    tokenizer, text_encoder = tiny_t5(32, seed + 2)
    return dict(transformer=transformer, vae=tiny_vae(seed + 1), text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=_ddim())


def tiny_sd3_components(seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=32))
    tokenizer_3, text_encoder_3 = tiny_t5(32, seed + 4)
    return dict(
        transformer=transformer, vae=tiny_vae(seed + 1, flow=True),
        text_encoder=tiny_clip_text_encoder(16, with_projection=True, projection_dim=16, seed=seed + 2),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(16, with_projection=True, projection_dim=16, seed=seed + 3),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_encoder=None, feature_extractor=None,
    )


def tiny_flux_components(seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]))
    tokenizer_2, text_encoder_2 = tiny_t5(32, seed + 3)
    return dict(
        transformer=transformer, vae=tiny_vae(seed + 1, flow=True),
        text_encoder=tiny_clip_text_encoder(16, seed=seed + 2), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096, shift=3.0),
        image_encoder=None, feature_extractor=None,
    )


def _pipeline(cls_name: str, components: dict):
    import diffusers

    cls = getattr(diffusers, cls_name)
    accepted = set(cls.__init__.__code__.co_varnames)
    pipe = cls(**{k: v for k, v in components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    return _pipeline("StableDiffusionXLPipeline", tiny_sdxl_components(seed))


def tiny_pixart_pipeline(seed: int = 0):
    return _pipeline("PixArtAlphaPipeline", tiny_pixart_components(seed))


def tiny_sd3_pipeline(seed: int = 0):
    return _pipeline("StableDiffusion3Pipeline", tiny_sd3_components(seed))


def tiny_flux_pipeline(seed: int = 0):
    return _pipeline("FluxPipeline", tiny_flux_components(seed))


# ------------------------------------------------------------------------------------- original (LDM) single file
# The LDM converters live in the package (weights/keymaps.py) so that loaders and factories share one key map.
def unet_to_ldm(state_dict: dict, unet_config: dict, prefix: str = "model.diffusion_model.") -> dict:
    """diffusers UNet state dict -> original LDM keys."""
    from nimblediff.weights import keymaps

    return keymaps.unet_diffusers_to_ldm(state_dict, keymaps.UNetLayout.from_diffusers_config(unet_config), prefix)


def vae_to_ldm(state_dict: dict, vae_config: dict, prefix: str = "first_stage_model.") -> dict:
    """diffusers AutoencoderKL state dict -> original keys; mid-attention linears become 1x1 convs."""
    from nimblediff.weights import keymaps

    return keymaps.vae_diffusers_to_ldm(state_dict, vae_config, prefix)


def text_encoder_to_ldm(state_dict: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers CLIPTextModel state dict -> original keys (re-adds the `text_model.` level transformers 5 drops)."""
    from nimblediff.weights import keymaps

    return keymaps.clip_diffusers_to_ldm(state_dict, prefix)


def sd15_to_ldm(pipe) -> dict:
    """A StableDiffusionPipeline's UNet, VAE and text encoder as one original single-file state dict."""
    sd = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    sd.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    return {k: v.contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ LoRA files
_LORA_TARGETS = (r"attn[12]\.to_(q|k|v|out\.0)$", r"proj_(in|out)$", r"ff\.net\.(0\.proj|2)$",
                 r"resnets\.\d+\.conv[12]$", r"time_emb_proj$", r"self_attn\.(q|k|v|out)_proj$", r"mlp\.fc[12]$")


def random_lora(modules: dict, rank: int = 2, seed: int = 0, alpha: float | None = 1.0, targets=_LORA_TARGETS,
                scale: float = 0.1) -> dict:
    """Random LoRA factors for the Linear/Conv modules of `modules` ({"unet": ..., "text_encoder": ...}) whose
    name matches `targets`: {canonical key: (down, up, alpha)}; down (r, in, kh, kw) for convs, up (out, r[, 1, 1])."""
    import re

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for comp, root in modules.items():
        base = getattr(root, "text_model", root)
        for name, m in base.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not any(re.search(t, name) for t in targets):
                continue
            w = m.weight
            if w.ndim == 4:
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) * scale
                up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * scale
            else:
                down = torch.randn(rank, w.shape[1], generator=gen) * scale
                up = torch.randn(w.shape[0], rank, generator=gen) * scale
            out[f"{comp}.{name}"] = (down, up, alpha)
    return out


def lora_state_dict(lora: dict, layout: str, unet_config=None) -> dict:
    """Write random_lora() factors in a file layout: "peft" (diffusers), "kohya", "kohya_sgm" (LDM names for the
    UNet, needs unet_config), "comfyui" (LoraSave: LDM names, no alpha: alpha/rank is baked into up), "legacy"
    (diffusers lora_linear_layer.down/up), "lora_dot" (older savers' lora.down/up)."""
    sd = {}
    ldm = None
    if layout in ("kohya_sgm", "comfyui"):
        from nimblediff.weights import keymaps

        ldm = keymaps.unet_keymap(keymaps.UNetLayout.from_diffusers_config(unet_config))
    for key, (down, up, alpha) in lora.items():
        comp, path = key.split(".", 1)
        if layout == "peft":
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
            continue
        if layout in ("legacy", "lora_dot"):
            p = f"{comp}.text_model.{path}" if comp.startswith("text_encoder") else key
            infix = "lora_linear_layer" if layout == "legacy" else "lora"
            sd[f"{p}.{infix}.down.weight"], sd[f"{p}.{infix}.up.weight"] = down, up
            if alpha is not None:
                sd[f"{p}.alpha"] = torch.tensor(float(alpha))
            continue
        if layout == "comfyui":
            if comp == "unet":
                p = "diffusion_model." + ldm.to_b(path)
            else:
                p = {"text_encoder": "text_encoders.clip_l", "text_encoder_2": "text_encoders.clip_g"}[comp] + \
                    ".transformer." + ("" if path == "text_projection" else "text_model.") + path
            s = 1.0 if alpha is None else alpha / down.shape[0]
            sd[f"{p}.lora_up.weight"], sd[f"{p}.lora_down.weight"] = up * s, down
            continue
        # kohya
        if comp == "unet":
            name = ldm.to_b(path) if layout == "kohya_sgm" else path
            p = "lora_unet_" + name.replace(".", "_")
        else:
            head = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
            p = head + "text_model_" + path.replace(".", "_")
        sd[f"{p}.lora_down.weight"], sd[f"{p}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{p}.alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in sd.items()}


def lora_reference(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha, strength: float = 1.0):
    """Hand-written math: W + strength * alpha / r * up @ down (float64)."""
    r = down.shape[0]
    s = strength * (1.0 if alpha is None else alpha / r)
    delta = up.double().flatten(1) @ down.double().flatten(1)
    return (weight.double() + s * delta.reshape(weight.shape)).to(weight.dtype)
