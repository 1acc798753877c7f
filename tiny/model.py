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


def make_text_encoder(vocab_size):
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=vocab.MAX_LENGTH,
                         projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def make_unet():
    # 16x16 -> 8x8 -> 4x4. Cross-attention at 16 and 8, where position and shape are decided.
    return UNet2DConditionModel(sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=16,
                                cross_attention_dim=TEXT_DIM, attention_head_dim=4)


def make_scheduler():
    return DDIMScheduler(**SCHEDULE)


def make_pipeline(vae, text_encoder, unet, tokenizer=None):
    """A genuine StableDiffusionPipeline (no safety checker) that save_pretrained / from_pretrained round-trip."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or vocab.build_tokenizer(),
                                   unet=unet, scheduler=make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def n_params(module):
    return sum(p.numel() for p in module.parameters())
