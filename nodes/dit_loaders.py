"""DiT loader node: a diffusers StableDiffusion3Pipeline folder without T5 (NimbleDiff-Tiny-DiT) -> ComfyUI MODEL, CLIP
and VAE built with ComfyUI's own classes, as nodes/loaders.py does for SD1.5-family folders.

    transformer/config.json        -> comfy.supported_models.SD3 with an explicit unet_config -> model_base.SD3 (MMDiT)
    scheduler/scheduler_config     -> sampling_settings shift and multiplier: ComfyUI's ModelSamplingDiscreteFlow then
                                      gives FlowMatchEulerDiscreteScheduler's sigmas and timesteps (t = 1000 sigma)
    text_encoder(_2) + tokenizer(_2) -> two comfy.sd1_clip.SDClipModel (penultimate layer, projected pooled output)
                                      joined as StableDiffusion3Pipeline.encode_prompt joins them when T5 is absent
    vae/                           -> loaders.build_vae; latent format: the folder's scaling_factor and shift_factor

Transformer weights are renamed diffusers -> ComfyUI MMDiT keys by the table of weights/dit_keymaps.py (through
weights.dit_convert.convert_dit, the one converter, which GGUF files use too); every key must be consumed. Folder checks, configs and the
renaming are host-free; comfy is imported only inside the functions that build ComfyUI objects.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

import torch

from ..errors import InvalidParameterError, WeightsFormatError
from . import loaders

EMBEDDED_NAME = "nimblediff-tiny-dit"
EMBEDDED_CHOICE = f"{EMBEDDED_NAME} (embedded)"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny" / EMBEDDED_NAME

# T5 stand-in rows after the CLIP tokens: StableDiffusion3Pipeline(max_sequence_length=24) without T5, a length the
# tiny DiT was trained with (tiny/dit.py ZERO_ROWS) and the text encoders' own length
T5_STAND_IN_ROWS = 24
_HEAD_WIDTH = 64  # ComfyUI's MMDiT: hidden_size = 64 * depth ("apply magic --> this defines a head_size of 64")
_TRANSFORMER = "SD3Transformer2DModel"
_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
_WEIGHTS = {"transformer": loaders._WEIGHT_FILES["unet"], "vae": loaders._WEIGHT_FILES["vae"],
            "text_encoder": loaders._WEIGHT_FILES["text_encoder"],
            "text_encoder_2": loaders._WEIGHT_FILES["text_encoder"]}
_LAYOUT = ("a StableDiffusion3Pipeline folder for this loader has model_index.json, transformer/ "
           "(SD3Transformer2DModel), scheduler/ (FlowMatchEulerDiscreteScheduler), text_encoder/ + tokenizer/, "
           "text_encoder_2/ + tokenizer_2/ (CLIPTextModelWithProjection) and vae/, each with its config and weights")


# ------------------------------------------------------------------------------------------------ folder reading
def _weights_path(folder: Path, part: str, part_dir: Path | None = None) -> Path | None:
    """The weights file of component `part`, in folder/part or in `part_dir` (a replacement folder)."""
    where = part_dir if part_dir is not None else folder / part
    return next((where / n for n in _WEIGHTS[part] if (where / n).is_file()), None)


def _tokenizer_ok(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def check_dit_folder(folder) -> dict:
    """model_index.json of a complete StableDiffusion3Pipeline folder without T5; raises naming what is missing or
    which other pipeline the folder holds. Reads nothing but configs: a bad folder fails before any model is built."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsFormatError(f"{folder}: no such model folder; {_LAYOUT}")
    if not (folder / "model_index.json").is_file():
        raise WeightsFormatError(f"{folder / 'model_index.json'}: missing; {_LAYOUT}")
    index = loaders._read_json(folder / "model_index.json")
    kind = index.get("_class_name")
    if "transformer" not in index:
        other = ("a UNet pipeline (unet/): load it with NimbleDiff Diffusers Checkpoint Loader" if "unet" in index
                 else f"components {sorted(k for k in index if not k.startswith('_'))}")
        raise InvalidParameterError(f"{folder / 'model_index.json'}: {kind} is {other}; the DiT loader needs a "
                                    f"StableDiffusion3Pipeline folder with transformer/ ({_TRANSFORMER})")
    transformer = (index.get("transformer") or [None, None])[-1]
    if transformer != _TRANSFORMER:
        raise InvalidParameterError(f"{folder / 'model_index.json'}: {kind} with a {transformer} transformer; the DiT "
                                    f"loader builds ComfyUI's SD3 MMDiT and needs {_TRANSFORMER} "
                                    "(StableDiffusion3Pipeline)")
    if (index.get("text_encoder_3") or [None, None])[-1] is not None:
        raise InvalidParameterError(f"{folder / 'model_index.json'}: text_encoder_3 (T5) is present; this loader "
                                    "encodes prompts with the two CLIP encoders only (NimbleDiff-Tiny-DiT); load an "
                                    "SD3 with T5 with ComfyUI's own checkpoint and TripleCLIPLoader nodes")
    missing = [str(folder / f) for f in ("transformer/config.json", "scheduler/scheduler_config.json",
                                         "text_encoder/config.json", "text_encoder_2/config.json", "vae/config.json")
               if not (folder / f).is_file()]
    missing += [f"{folder / part}/{_WEIGHTS[part][0]}" for part in _WEIGHTS if _weights_path(folder, part) is None]
    missing += [f"{folder / t}/tokenizer.json" for t in ("tokenizer", "tokenizer_2") if not _tokenizer_ok(folder / t)]
    if missing:
        raise WeightsFormatError(f"{folder}: missing {missing}; {_LAYOUT}")
    return index


def _load(folder: Path, part: str, part_dir: Path | None = None) -> dict:
    from ..weights.safetensors_io import load_state_dict

    return load_state_dict(_weights_path(folder, part, part_dir))


def check_transformer_folder(tdir: Path, folder: Path) -> None:
    """A transformer-only folder (SD3Transformer2DModel.save_pretrained: config.json + weights) that replaces the
    pipeline folder's transformer/: same class and the same sizes, so the text encoders and VAE still fit it."""
    tdir = Path(tdir)
    if not (tdir / "config.json").is_file() or _weights_path(folder, "transformer", tdir) is None:
        raise WeightsFormatError(f"{tdir}: a transformer folder has config.json and {_WEIGHTS['transformer'][0]} "
                                 "(SD3Transformer2DModel.save_pretrained)")
    own, base = loaders._read_json(tdir / "config.json"), loaders._read_json(folder / "transformer" / "config.json")
    if own.get("_class_name", _TRANSFORMER) != _TRANSFORMER:
        raise InvalidParameterError(f"{tdir / 'config.json'}: _class_name={own['_class_name']!r}; the DiT loader "
                                    f"needs {_TRANSFORMER}")
    sizes = ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
             "pooled_projection_dim", "in_channels", "patch_size", "pos_embed_max_size")
    differ = {k: (own.get(k), base.get(k)) for k in sizes if own.get(k) != base.get(k)}
    if differ:
        raise InvalidParameterError(f"transformer {tdir} does not fit the pipeline {folder}: "
                                    + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()))


# --------------------------------------------------------------------------------- diffusers config -> comfy config
def mmdit_config_from_diffusers(cfg: dict) -> dict:
    """ComfyUI MMDiT kwargs (model_detection's unet_config format, plus num_heads) for a diffusers
    SD3Transformer2DModel config. ComfyUI's MMDiT ties the width to the depth (hidden = 64 x depth, heads = depth)
    and takes the block count as num_blocks; the head count is restored by the loader's MMDiT subclass."""
    if cfg.get("_class_name", _TRANSFORMER) != _TRANSFORMER:
        raise InvalidParameterError(f"transformer/config.json _class_name={cfg['_class_name']!r}; this loader "
                                    f"supports {_TRANSFORMER}")
    heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if hidden % _HEAD_WIDTH:
        raise InvalidParameterError(f"transformer/config.json num_attention_heads={heads} x attention_head_dim="
                                    f"{head_dim} = {hidden}: ComfyUI's MMDiT needs a width that is a multiple of 64")
    if cfg.get("caption_projection_dim", hidden) != hidden:
        raise InvalidParameterError(f"transformer/config.json caption_projection_dim={cfg['caption_projection_dim']}: "
                                    f"ComfyUI's MMDiT projects the context to the width {hidden}")
    qk_norm = cfg.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise InvalidParameterError(f"transformer/config.json qk_norm={qk_norm!r}; supported: None, 'rms_norm'")
    max_size = cfg.get("pos_embed_max_size")
    if not isinstance(max_size, int) or max_size < 1:
        raise InvalidParameterError(f"transformer/config.json pos_embed_max_size={max_size!r}: a stored position "
                                    "table (an integer side) is needed")
    patch, channels = cfg.get("patch_size", 2), cfg.get("in_channels", 16)
    return {
        "in_channels": channels, "out_channels": cfg.get("out_channels") or channels, "patch_size": patch,
        "depth": hidden // _HEAD_WIDTH, "num_blocks": cfg.get("num_layers", 18), "num_heads": heads,
        "input_size": None, "adm_in_channels": cfg.get("pooled_projection_dim", 2048),
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": cfg.get("joint_attention_dim", 4096),
                                               "out_features": hidden}},
        "pos_embed_max_size": max_size, "num_patches": max_size * max_size, "pos_embed_scaling_factor": None,
        "qk_norm": "rms" if qk_norm else None, "x_block_self_attn_layers": list(cfg.get("dual_attention_layers", ())),
    }


def flow_sampling_from_scheduler(cfg: dict) -> dict:
    """ComfyUI sampling_settings for a FlowMatchEulerDiscreteScheduler config: sigma(t) = shift t / (1 + (shift - 1) t)
    and the model's timestep = num_train_timesteps x sigma, as ModelSamplingDiscreteFlow computes them."""
    where = "scheduler/scheduler_config.json"
    if cfg.get("_class_name", _SCHEDULER) != _SCHEDULER:
        raise InvalidParameterError(f"{where} _class_name={cfg['_class_name']!r}; a flow DiT folder has {_SCHEDULER}")
    if cfg.get("use_dynamic_shifting", False):
        raise InvalidParameterError(f"{where} use_dynamic_shifting=true (a resolution-dependent Flux-type shift): "
                                    "ComfyUI's SD3 model sampling has one fixed shift")
    shift = cfg.get("shift", 1.0)
    if not isinstance(shift, (int, float)) or shift <= 0:
        raise InvalidParameterError(f"{where} shift={shift!r}: a positive number is needed")
    steps = cfg.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"{where} num_train_timesteps={steps!r}: a positive integer is needed")
    return {"shift": float(shift), "multiplier": steps}


def check_patchify(height: int, width: int, patch: int, max_size: int, source: str = "", ratio: int = 1) -> None:
    """Refuse a latent the DiT cannot cut into patches or place in its position table. ComfyUI's MMDiT would pad it
    circularly (an image the model never saw) or stop on a bare assert; diffusers' pipeline refuses it too."""
    fits = height % patch == 0 and width % patch == 0 and height <= max_size * patch and width <= max_size * patch
    if not fits:
        side = f"image sides a multiple of {patch * ratio} px up to {max_size * patch * ratio} px" if ratio > 1 else ""
        raise InvalidParameterError(
            f"latent {width}x{height} (image {width * ratio}x{height * ratio} px) cannot be patchified by the DiT "
            f"{source}: its patch_size {patch} needs latent sides divisible by {patch}, and pos_embed_max_size "
            f"{max_size} allows at most {max_size * patch}x{max_size * patch} latents" + (f" ({side})" if side else ""))


def transformer_to_comfy(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel weights -> ComfyUI MMDiT keys (joint_blocks.{i}.x_block.attn.qkv, ...):
    q/k/v fused by rows, adaLN (scale, shift) halves swapped where ComfyUI keeps (shift, scale); every key consumed."""
    from ..weights.dit_convert import convert_dit

    try:
        return convert_dit(sd, "sd3", "original", None)
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"transformer weights -> ComfyUI MMDiT: {exc}") from exc


# ------------------------------------------------------------------------------------------------------ ComfyUI
@functools.cache
def _mmdit_class():
    from comfy.ldm.modules.diffusionmodules import mmdit

    class NimbleMMDiT(mmdit.OpenAISignatureMMDITWrapper):
        """ComfyUI's MMDiT with the folder's head count (ComfyUI fixes heads = depth, head width 64) and a clear error
        for latents it cannot patchify."""

        def __init__(self, num_heads=None, **kwargs):
            super().__init__(**kwargs)
            self.source, self.image_ratio = "", 1  # set by the loader, for error messages
            if num_heads and num_heads != self.num_heads:
                self._set_heads(num_heads, kwargs.get("dtype"), kwargs.get("device"))

        def _set_heads(self, heads: int, dtype, device):
            self.num_heads = heads
            for attn in self.modules():
                if isinstance(attn, mmdit.SelfAttention):
                    attn.num_heads, attn.head_dim = heads, attn.qkv.in_features // heads
                    for name in ("ln_q", "ln_k"):  # per-head RMSNorm: its width is the head width
                        if isinstance(getattr(attn, name), mmdit.RMSNorm):
                            setattr(attn, name, mmdit.RMSNorm(attn.head_dim, elementwise_affine=True, eps=1e-6,
                                                              dtype=dtype, device=device))

        def forward(self, x, timesteps, context=None, y=None, **kwargs):
            check_patchify(x.shape[-2], x.shape[-1], self.patch_size, self.pos_embed_max_size, self.source,
                           self.image_ratio)
            return super().forward(x, timesteps, context=context, y=y, **kwargs)

    return NimbleMMDiT


@functools.cache
def _model_class():
    import comfy.model_base

    class NimbleSD3(comfy.model_base.SD3):
        """model_base.SD3 (conditioning, flow model type, isinstance checks of ComfyUI's LoRA key maps) on the MMDiT
        subclass above."""

        def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
            comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device,
                                                unet_model=_mmdit_class())

    return NimbleSD3


def build_dit_model(folder: Path, transformer: Path | None = None):
    """MODEL (ModelPatcher) from transformer/ (or the `transformer` folder replacing it, e.g. a distilled student)
    + scheduler/ (+ vae/config.json for the latent format)."""
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    tdir = Path(transformer) if transformer is not None else folder / "transformer"
    unet_config = mmdit_config_from_diffusers(loaders._read_json(tdir / "config.json"))
    settings = flow_sampling_from_scheduler(loaders._read_json(folder / "scheduler" / "scheduler_config.json"))
    vae_cfg = loaders._read_json(folder / "vae" / "config.json")
    sd = transformer_to_comfy(_load(folder, "transformer", tdir))

    config = comfy.supported_models.SD3(unet_config)
    config.sampling_settings = settings
    latent = comfy.latent_formats.SD3()  # (z - shift_factor) * scale_factor, as the SD3 pipeline
    latent.scale_factor = float(vae_cfg.get("scaling_factor", loaders._SD_VAE_SCALE))
    latent.shift_factor = float(vae_cfg.get("shift_factor") or 0.0)
    latent.latent_channels = unet_config["in_channels"]
    latent.latent_rgb_factors = latent.latent_rgb_factors_bias = latent.taesd_decoder_name = None  # SD3's don't fit
    config.latent_format = latent

    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), weight_dtype=comfy.utils.weight_dtype(sd),
                          supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = _model_class()(config)
    loaders._load_checked(model.diffusion_model, sd, f"{tdir}")
    model.diffusion_model.source = str(folder)
    model.diffusion_model.image_ratio = 2 ** (len(vae_cfg.get("block_out_channels", [64])) - 1)
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class DiTTextEncoders(torch.nn.Module):
    """StableDiffusion3Pipeline.encode_prompt without T5 from two ComfyUI CLIP encoders: the penultimate hidden
    states side by side, padded to the transformer's joint_attention_dim, then `zero_rows` rows of zeros (the
    pipeline's T5 stand-in); pooled = both projected pooled outputs side by side."""

    def __init__(self, device="cpu", dtype=None, model_options={}, *, encoders, width: int, zero_rows: int):
        super().__init__()
        self.clip_l = encoders[0](device=device, dtype=dtype, model_options={**model_options, "model_name": "clip_l"})
        self.clip_g = encoders[1](device=device, dtype=dtype, model_options={**model_options, "model_name": "clip_g"})
        self.dtypes = {dtype} if dtype is not None else set()
        self.width, self.zero_rows = width, zero_rows

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)
        self.clip_g.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()
        self.clip_g.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])[:2]   # (B, 24, 64), (B, 64)
        g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])[:2]
        cond = torch.cat([l_out, g_out], dim=-1)
        cond = torch.nn.functional.pad(cond, (0, self.width - cond.shape[-1]))              # (B, 24, width)
        cond = torch.cat([cond, cond.new_zeros(cond.shape[0], self.zero_rows, self.width)], dim=-2)
        return cond, torch.cat([l_pooled, g_pooled], dim=-1)                                # (B, 48, w), (B, 128)

    def load_sd(self, sd):
        raise InvalidParameterError("the NimbleDiff DiT CLIP loads its weights from the diffusers folder only")


class DiTTokenizer:
    """One tokenizer per encoder ("l": text_encoder's, "g": text_encoder_2's), as comfy.sd.CLIP calls them."""

    def __init__(self, embedding_directory=None, tokenizer_data={}, *, tokenizers):
        self.clip_l = tokenizers[0](embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.clip_g = tokenizers[1](embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {"l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs),
                "g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.clip_l.untokenize(token_weight_pair)

    def state_dict(self):
        return {}


def _encoder_parts(folder: Path, encoder: str, tokenizer: str, key: str):
    """(SDClipModel factory, SDTokenizer factory, transformers weights) for one CLIP encoder of the folder."""
    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    from ..tiny.vocab import CLOSED_VOCAB_SIZE
    from ..weights import keymaps

    raw = loaders._read_json(folder / encoder / "config.json")
    text_config = loaders.text_config_from_transformers(raw)
    layers, hidden = text_config["num_hidden_layers"], text_config["hidden_size"]
    if raw.get("projection_dim", hidden) != hidden:
        raise InvalidParameterError(f"{folder / encoder / 'config.json'} projection_dim={raw['projection_dim']} with "
                                    f"hidden_size={hidden}: ComfyUI's CLIP projection is square")
    if layers < 2:
        raise InvalidParameterError(f"{folder / encoder / 'config.json'} num_hidden_layers={layers}: SD3 reads the "
                                    "penultimate layer, so at least 2 layers are needed")
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder / tokenizer))
    except Exception as exc:  # transformers raises OSError / ValueError / its own errors for a bad folder
        raise WeightsFormatError(f"{folder / tokenizer}: CLIPTokenizer cannot read it ({type(exc).__name__}: "
                                 f"{exc})") from exc
    ids = tok("")["input_ids"]  # [bos, eos]
    if len(ids) != 2:
        raise WeightsFormatError(f"{folder / tokenizer}: an empty prompt tokenizes to {ids}; a CLIP tokenizer gives "
                                 "[bos, eos]")
    special = {"start": ids[0], "end": ids[1], "pad": tok.pad_token_id if tok.pad_token_id is not None else ids[1]}
    length = text_config["max_position_embeddings"]  # ComfyUI adds the whole position table: pad to its length
    # hidden_states[-2] of transformers = the output of layer (layers - 2); a positive index passes ComfyUI's
    # abs(layer_idx) < num_layers check also for 2-layer encoders
    encoder_factory = functools.partial(
        comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(text_config),
        model_class=loaders._clip_text_model_class(), special_tokens=special, max_length=length, layer="hidden",
        layer_idx=layers - 2, layer_norm_hidden_state=False, return_projected_pooled=True)
    tok_class = loaders._closed_vocab_tokenizer_class() if len(tok) < CLOSED_VOCAB_SIZE else comfy.sd1_clip.SDTokenizer
    tokenizer_factory = functools.partial(tok_class, tokenizer_path=str(folder / tokenizer), max_length=length,
                                          embedding_size=hidden, embedding_key=key, pad_token=special["pad"])
    sd = {k: v for k, v in _load(folder, encoder).items() if not k.endswith("position_ids")}
    return encoder_factory, tokenizer_factory, keymaps.clip_diffusers_to_ldm(sd, prefix=""), hidden


def build_dit_clip(folder: Path, embedding_directory=None, model_options=None):
    """CLIP from text_encoder(_2)/ + tokenizer(_2)/ through ComfyUI's SD1 clip classes. model_options as
    comfy.sd.CLIP's (e.g. {"dtype": torch.float32}: ComfyUI stores text encoders in fp16 by default)."""
    import comfy.sd

    width = loaders._read_json(folder / "transformer" / "config.json").get("joint_attention_dim", 4096)
    l_enc, l_tok, l_sd, l_dim = _encoder_parts(folder, "text_encoder", "tokenizer", "clip_l")
    g_enc, g_tok, g_sd, g_dim = _encoder_parts(folder, "text_encoder_2", "tokenizer_2", "clip_g")
    if l_dim + g_dim > width:
        raise InvalidParameterError(f"{folder}: text encoder widths {l_dim} + {g_dim} exceed the transformer's "
                                    f"joint_attention_dim {width}")

    target = types.SimpleNamespace(  # what comfy.sd.CLIP reads: params, clip(**params), tokenizer(...)
        params={}, clip=functools.partial(DiTTextEncoders, encoders=(l_enc, g_enc), width=width,
                                          zero_rows=T5_STAND_IN_ROWS),
        tokenizer=functools.partial(DiTTokenizer, tokenizers=(l_tok, g_tok)))
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options=model_options or {})
    loaders._load_checked(clip.cond_stage_model.clip_l.transformer, l_sd, f"{folder / 'text_encoder'}")
    loaders._load_checked(clip.cond_stage_model.clip_g.transformer, g_sd, f"{folder / 'text_encoder_2'}")
    return clip


def load_dit_folder(folder, embedding_directory=None, clip_options=None, transformer=None):
    """(MODEL, CLIP, VAE) from a diffusers StableDiffusion3Pipeline folder without T5 (NimbleDiff-Tiny-DiT);
    `transformer`: a transformer-only folder used instead of the pipeline's own (a student of it)."""
    folder = Path(folder)
    check_dit_folder(folder)
    if transformer is not None:
        check_transformer_folder(transformer, folder)
    return (build_dit_model(folder, transformer), build_dit_clip(folder, embedding_directory, clip_options),
            loaders.build_vae(folder))


# ---------------------------------------------------------------------------------------------------------- node
def _embedded_folder() -> Path | None:
    """weights/tiny/nimblediff-tiny-dit, else models/diffusers/nimblediff-tiny-dit (a pack installed without it)."""
    candidates = [EMBEDDED_DIR] + [Path(root) / EMBEDDED_NAME for root in loaders._diffusers_roots()]
    return next((c for c in candidates if (c / "model_index.json").is_file()), None)


def _scan_diffusers() -> tuple[list[str], list[str]]:
    """One walk of models/diffusers: (DiT pipeline folders, transformer-only folders), as relative posix paths."""
    pipelines, transformers = [], []
    for root in loaders._diffusers_roots():
        for path, dirs, files in os.walk(root, followlinks=True):
            rel = Path(os.path.relpath(path, root)).as_posix()
            if "model_index.json" in files:
                if os.path.isfile(os.path.join(path, "transformer", "config.json")):
                    pipelines.append(rel)
                dirs.clear()  # a pipeline folder's sub-folders are its components
            elif _transformer_only(path, files):
                transformers.append(rel)
                dirs.clear()
    return pipelines, transformers


def list_dit_models(scan=None) -> list[str]:
    """The embedded tiny DiT, then every folder under models/diffusers with model_index.json and
    transformer/config.json. Inside ComfyUI the embedded entry is offered only when its folder is there (a workflow
    naming it is then refused by ComfyUI's validation, not half-run); outside ComfyUI (workflow validation) always."""
    try:
        import folder_paths  # noqa: F401
        in_comfyui = True
    except ImportError:
        in_comfyui = False
    names = (scan or _scan_diffusers())[0]
    embedded = [EMBEDDED_CHOICE] if not in_comfyui or _embedded_folder() is not None else []
    return embedded + sorted(set(names) - {EMBEDDED_CHOICE})


def resolve_dit_model(name: str) -> Path:
    """Folder of a dropdown entry; the embedded entry falls back to models/diffusers/nimblediff-tiny-dit."""
    if name != EMBEDDED_CHOICE:
        return loaders.resolve_model(name)  # stays inside models/diffusers
    folder = _embedded_folder()
    if folder is None:
        raise WeightsFormatError(f"model {name!r}: no model_index.json in {EMBEDDED_DIR} or models/diffusers/"
                                 f"{EMBEDDED_NAME}; the pack was installed without NimbleDiff-Tiny-DiT: put its "
                                 f"folder at models/diffusers/{EMBEDDED_NAME} or choose another folder from the "
                                 "dropdown")
    return folder


OWN_TRANSFORMER = "(the folder's own)"
EMBEDDED_STUDENTS = ("instaflow", "2rf")  # tiny/package_dit.STUDENTS: transformer-only folders beside the teacher


def _transformer_only(path: str, files) -> bool:
    return "config.json" in files and "model_index.json" not in files and \
        loaders._read_json(Path(path) / "config.json").get("_class_name") == _TRANSFORMER


def list_dit_transformers(scan=None) -> list[str]:
    """The folder's own transformer, the shipped students of the tiny DiT that are present, then transformer-only
    folders (SD3Transformer2DModel.save_pretrained) under models/diffusers."""
    embedded = [f"{EMBEDDED_NAME}-{s} (embedded)" for s in EMBEDDED_STUDENTS
                if (EMBEDDED_DIR.parent / f"{EMBEDDED_NAME}-{s}" / "config.json").is_file()]
    return [OWN_TRANSFORMER] + embedded + sorted((scan or _scan_diffusers())[1])


def resolve_dit_transformer(name: str) -> Path | None:
    """None for the folder's own transformer, else the replacement folder (inside models/diffusers or shipped)."""
    if name in ("", OWN_TRANSFORMER):
        return None
    if name.endswith(" (embedded)"):
        stem = name[: -len(" (embedded)")]
        if stem not in {f"{EMBEDDED_NAME}-{s}" for s in EMBEDDED_STUDENTS}:
            raise InvalidParameterError(f"transformer {name!r}: the shipped students are "
                                        f"{[f'{EMBEDDED_NAME}-{s} (embedded)' for s in EMBEDDED_STUDENTS]}")
        folder = EMBEDDED_DIR.parent / stem
        if not (folder / "config.json").is_file():
            raise WeightsFormatError(f"transformer {name!r}: {folder} is not there (this copy of NimbleDiff was "
                                     "installed without it)")
        return folder
    from ..weights.paths import inside

    candidates = [inside(root, name, "transformer") for root in loaders._diffusers_roots()]  # never outside
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        raise WeightsFormatError(f"transformer {name!r}: no config.json in {[str(c) for c in candidates]}; choose an "
                                 "entry of the dropdown (transformer-only folders under models/diffusers)")
    return found


class NimbleDiffusersDiTLoader:
    """Loads a diffusers StableDiffusion3Pipeline folder without T5 (NimbleDiff-Tiny-DiT) as MODEL, CLIP and VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        scan = _scan_diffusers()  # one walk of models/diffusers for both dropdowns
        return {"required": {"model": (list_dit_models(scan), {
            "tooltip": "A diffusers StableDiffusion3Pipeline folder (two CLIP encoders, no T5) under "
                       "models/diffusers, or NimbleDiff-Tiny-DiT shipped with NimbleDiff."})},
                "optional": {"transformer": (list_dit_transformers(scan), {
                    "default": OWN_TRANSFORMER,
                    "tooltip": "Use another transformer of the same size with the folder's text encoders and VAE: "
                               "a distilled student (the shipped InstaFlow one-step or 2-rectified-flow student of "
                               "NimbleDiff-Tiny-DiT; they bake guidance in: sample them at CFG 1) or a "
                               "transformer-only folder under models/diffusers."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "NimbleDiff/loaders"
    DESCRIPTION = ("Builds ComfyUI's SD3 MMDiT MODEL (flow sampling with the folder's shift), a two-encoder CLIP "
                   "giving SD3-style conditioning and the VAE from a diffusers folder's configs, for sizes ComfyUI's "
                   "checkpoint detection does not recognise.")

    def load(self, model, transformer=OWN_TRANSFORMER):
        import folder_paths

        return load_dit_folder(resolve_dit_model(model), folder_paths.get_folder_paths("embeddings"),
                               transformer=resolve_dit_transformer(transformer))


NODES = {"NimbleDiffusersDiTLoader": (NimbleDiffusersDiTLoader, "NimbleDiff Diffusers DiT Loader")}
