"""NimbleDiff-Tiny-DiT: an MM-DiT (diffusers `SD3Transformer2DModel`) trained with rectified flow, in a genuine
`StableDiffusion3Pipeline` folder that the stock class loads.

Why SD3's MM-DiT rather than Flux's: the stock SD3 pipeline runs with its T5 encoder absent (`text_encoder_3=None`),
so the text side is two small CLIP encoders that share NimbleDiff-Tiny's in-memory vocabulary tokenizer; Flux's
pipeline requires a T5 encoder and tokenizer, which would add a third vocabulary for no gain on this grammar. The two
families share the joint-attention block, the flow parameterization and the LoRA layouts NimbleDiff maps.

64x64 RGB -> the NimbleDiff-Tiny VAE (/4) -> 4x16x16 latents -> 2x2 patches: 64 image tokens. Context: the two CLIP
encoders' penultimate hidden states side by side (24 tokens x 128) followed by the pipeline's T5 stand-in, which is
`max_sequence_length` rows of zeros (256 by default); training varies that count so any value works.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from . import vocab

CLIP_DIM = 64         # each encoder; joint_attention_dim = 2 * CLIP_DIM, so the CLIP embeddings need no padding
HIDDEN_HEADS = 4      # x 32 = 128 hidden
ZERO_ROWS = (8, 24, 77, 256)  # T5 stand-in lengths seen in training (24 = the tokenizer length, 256 = the default)
ZERO_ROWS_P = (0.4, 0.35, 0.15, 0.1)
SHIFT = 1.0           # 16x16 latents need no resolution shift (SD3's 3.0 is for 128x128)
# the teacher's CFG, chosen on the calibration split (bench/dit_calibrate.py: 2-5 within noise of each other, 7
# worse); its InstaFlow couples are sampled with it, and bench/quality.py reports the teacher at it
CFG = 3.0


def make_text_encoder(vocab_size):
    # Three layers: the pipeline reads the penultimate hidden state for the sequence, the last for the pooled vector.
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_DIM, intermediate_size=4 * CLIP_DIM,
                         num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=vocab.MAX_LENGTH,
                         projection_dim=CLIP_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg)


def make_transformer(num_layers=8):
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
                                 attention_head_dim=32, num_attention_heads=HIDDEN_HEADS,
                                 joint_attention_dim=2 * CLIP_DIM, caption_projection_dim=32 * HIDDEN_HEADS,
                                 pooled_projection_dim=2 * CLIP_DIM, pos_embed_max_size=16, qk_norm="rms_norm")


def make_scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def sd3_vae(vae):
    """The SD1-style tiny VAE as the SD3 pipeline reads it: latents = (z - shift_factor) * scaling_factor."""
    if vae.config.get("shift_factor") is None:
        vae.register_to_config(shift_factor=0.0)
    return vae


def make_pipeline(vae, text_encoder, text_encoder_2, transformer, tokenizer=None):
    tok = tokenizer or vocab.build_tokenizer()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=make_scheduler(), vae=sd3_vae(vae),
                                    text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def encode(pipe, captions, zero_rows):
    """(prompt_embeds (B, 24 + zero_rows, 128), pooled (B, 128)) exactly as StableDiffusion3Pipeline builds them."""
    embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                              max_sequence_length=zero_rows, device=torch.device("cpu"))
    return embeds, pooled


def logit_normal(n, generator, mean=0.0, std=1.0):
    """SD3's timestep density: sigma = sigmoid(N(mean, std)), which favours the middle of the path."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


@torch.no_grad()
def flow_euler_cfg(transformer, z, sigma, embeds, pooled, null_embeds, null_pooled, cfg, steps):
    """Flow Euler with CFG from sigma (a float) to 0 in `steps` uniform steps, as StableDiffusion3Pipeline samples
    on those sigmas; the null embeddings are one row or one per sample."""
    b = len(z)
    both_e = torch.cat([null_embeds.expand(b, -1, -1), embeds])
    both_p = torch.cat([null_pooled.expand(b, -1), pooled])
    sig = torch.linspace(sigma, 0, steps + 1)
    for s, s_next in zip(sig[:-1], sig[1:]):
        v_u, v_c = transformer(hidden_states=torch.cat([z, z]), timestep=(s * 1000).expand(2 * b),
                               encoder_hidden_states=both_e, pooled_projections=both_p).sample.chunk(2)
        z = z + (s_next - s) * (v_u + cfg * (v_c - v_u))
    return z
