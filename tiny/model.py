"""NimbleDiff-Tiny architecture: real diffusers / transformers classes at a size one CPU thread can train.

64x64 RGB -> AutoencoderKL (/4) -> 4x16x16 latents -> UNet2DConditionModel conditioned on a 2-layer CLIPTextModel.
The noise schedule is Stable Diffusion's, so every SD sampler, LoRA loader and few-step recipe applies unchanged.
"""

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import vocab

LATENT_CHANNELS = 4
TEXT_DIM = 64

# Stable Diffusion 1.x training schedule: scaled-linear betas, 1000 steps, epsilon prediction.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="trailing")


def make_vae():
    # Three blocks = two downsamplings: 64 -> 16. No mid-block attention: it buys nothing on flat shapes.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                         sample_size=64, mid_block_add_attention=False)


# v1 is the shipped teacher. v2 is built to bind attributes in two-shape scenes: a text encoder wide enough that the
# last token of "a yellow circle on the left" carries all three words (CLIP is causal), cross-attention at every
# resolution including 4x4 where the two objects' layout is decided, and 32-wide attention heads (v1's are 16).
ARCHS = {
    "v1": dict(text_dim=TEXT_DIM, text_layers=2, text_heads=4, channels=(64, 128, 128),
               cross=(True, True, False), heads=4),
    "v2": dict(text_dim=128, text_layers=3, text_heads=4, channels=(64, 128, 192),
               cross=(True, True, True), heads=(2, 4, 6)),
}


def make_text_encoder(vocab_size, arch="v1"):
    a = ARCHS[arch]
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=a["text_dim"], intermediate_size=4 * a["text_dim"],
                         num_hidden_layers=a["text_layers"], num_attention_heads=a["text_heads"],
                         max_position_embeddings=vocab.MAX_LENGTH, projection_dim=a["text_dim"],
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def make_unet(arch="v1"):
    # 16x16 -> 8x8 -> 4x4.
    a = ARCHS[arch]
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in a["cross"])
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(a["cross"]))
    return UNet2DConditionModel(sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=down, up_block_types=up, block_out_channels=a["channels"],
                                layers_per_block=1, norm_num_groups=16, cross_attention_dim=a["text_dim"],
                                attention_head_dim=a["heads"])


def make_scheduler():
    return DDIMScheduler(**SCHEDULE)


def make_pipeline(vae, text_encoder, unet, tokenizer=None):
    """A genuine StableDiffusionPipeline (no safety checker) that save_pretrained / from_pretrained round-trip."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or vocab.build_tokenizer(),
                                   unet=unet, scheduler=make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def n_params(module):
    return sum(p.numel() for p in module.parameters())
