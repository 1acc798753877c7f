"""Model loader nodes: a diffusers SD1.5-family folder -> ComfyUI MODEL, CLIP and VAE built with ComfyUI's own classes.

ComfyUI's checkpoint detection only knows the released SD sizes, so a small or retrained model (NimbleDiff-Tiny,
widths 64/128, GroupNorm(16), a 24-token text encoder, a /4 VAE) is not recognised. Here the ComfyUI configs are
derived from the folder's diffusers configs instead of guessed from tensor shapes:

    unet/config.json           -> comfy.supported_models.SD15 with an explicit unet_config -> BaseModel -> ModelPatcher
    scheduler/scheduler_config -> the model's sampling_settings (beta schedule) and model type (eps / v)
    text_encoder + tokenizer   -> comfy.sd1_clip.SDClipModel / SDTokenizer with the folder's text config and vocab
    vae/config.json            -> comfy.sd.VAE(sd, config=...) with an explicit ddconfig

Weights are renamed with `weights.keymaps` (diffusers -> LDM) and every key must be consumed.
All comfy imports are inside functions: importing nimblediff outside ComfyUI never imports comfy.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from pathlib import Path

import torch

from ..errors import InvalidParameterError, WeightsFormatError

EMBEDDED_CHOICE = "nimblediff-tiny (embedded)"
EMBEDDED_NAME = "nimblediff-tiny"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "weights" / "tiny" / EMBEDDED_NAME

_WEIGHT_FILES = {  # first match wins; fp32 files before fp16 variants, safetensors before pickles
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}

# UNet2DConditionModel options ComfyUI's UNetModel does not implement: (config key, diffusers default, allowed values)
_UNET_FIXED = (
    ("addition_embed_type", None, (None,)), ("class_embed_type", None, (None,)),
    ("time_cond_proj_dim", None, (None,)), ("encoder_hid_dim", None, (None,)),
    ("only_cross_attention", False, (False,)), ("dual_cross_attention", False, (False,)),
    ("resnet_time_scale_shift", "default", ("default",)), ("time_embedding_type", "positional", ("positional",)),
    ("flip_sin_to_cos", True, (True,)), ("freq_shift", 0, (0,)), ("act_fn", "silu", ("silu",)),
    ("norm_eps", 1e-5, (1e-5,)), ("conv_in_kernel", 3, (3,)), ("conv_out_kernel", 3, (3,)),
    ("downsample_padding", 1, (1,)), ("center_input_sample", False, (False,)),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", ("UNetMidBlock2DCrossAttn",)),
    ("attention_type", "default", ("default",)), ("cross_attention_norm", None, (None,)),
    ("timestep_post_act", None, (None,)), ("time_embedding_act_fn", None, (None,)),
    ("mid_block_scale_factor", 1.0, (1.0,)), ("resnet_out_scale_factor", 1.0, (1.0,)),
)
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# diffusers beta_schedule -> ComfyUI make_beta_schedule name (ComfyUI's "linear" is linear in sqrt(beta))
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
_CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")  # comfy.clip_model.ACTIVATIONS
_SD_VAE_SCALE = 0.18215


# ------------------------------------------------------------------------------------------------ folder reading
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsFormatError(f"{path}: missing; a diffusers StableDiffusionPipeline folder has "
                                 "model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/ with configs")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsFormatError(f"{path}: not a readable JSON file ({exc})") from exc


def _weights_path(folder: Path, part: str) -> Path:
    for name in _WEIGHT_FILES[part]:
        if (folder / part / name).is_file():
            return folder / part / name
    raise WeightsFormatError(f"{folder / part / _WEIGHT_FILES[part][0]}: missing; expected one of "
                             f"{list(_WEIGHT_FILES[part])} in {folder / part}")


def _load_weights(folder: Path, part: str) -> dict:
    from ..weights.safetensors_io import load_state_dict

    return load_state_dict(_weights_path(folder, part))


def _check_tokenizer(folder: Path) -> Path:
    tok = folder / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        raise WeightsFormatError(f"{tok / 'tokenizer.json'}: missing; a CLIP tokenizer folder needs tokenizer.json "
                                 "or vocab.json + merges.txt (as written by CLIPTokenizer.save_pretrained)")
    return tok


# --------------------------------------------------------------------------------- diffusers config -> comfy config
def _per_level(value, levels: int, what: str) -> list:
    out = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(out) != levels:
        raise InvalidParameterError(f"unet/config.json {what}={value!r}: needs one entry per block ({levels})")
    return out


def unet_config_from_diffusers(cfg: dict) -> dict:
    """ComfyUI UNetModel kwargs (model_detection's unet_config format) for a diffusers UNet2DConditionModel config.

    Raises InvalidParameterError naming the option when the UNet uses something ComfyUI's UNetModel lacks.
    """
    from ..weights.keymaps import UNetLayout

    for key, default, allowed in _UNET_FIXED:
        if cfg.get(key, default) not in allowed:
            raise InvalidParameterError(f"unet/config.json {key}={cfg.get(key)!r} is not supported by the SD1.5-family "
                                        f"loader; supported: {list(allowed)}")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for types, valid, what in ((down, _DOWN_BLOCKS, "down_block_types"), (up, _UP_BLOCKS, "up_block_types")):
        if any(t not in valid for t in types):
            raise InvalidParameterError(f"unet/config.json {what}={types}: supported block types are {list(valid)}")
    if len(up) != len(down):
        raise InvalidParameterError(f"unet/config.json has {len(down)} down blocks and {len(up)} up blocks")
    context = cfg.get("cross_attention_dim", 1280)
    if not isinstance(context, int):
        raise InvalidParameterError(f"unet/config.json cross_attention_dim={context!r}: one integer is supported")

    levels = len(down)
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise InvalidParameterError(f"unet/config.json block_out_channels={channels}: ComfyUI's UNet needs every "
                                    f"width to be a multiple of the first ({base})")
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in channels):
        raise InvalidParameterError(f"unet/config.json norm_num_groups={groups} does not divide every width of "
                                    f"block_out_channels={channels}")
    layout = UNetLayout.from_diffusers_config(cfg)

    # diffusers' attention_head_dim is the number of heads when num_attention_heads is unset (its historic misnomer)
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), levels, "attention heads")
    attn = [i for i, t in enumerate(down) if "CrossAttn" in t] + [levels - 1]  # + the middle block (last width)
    attn_heads = {heads[i] for i in attn}
    head_dims = {channels[i] // heads[i] for i in attn}
    if len(attn_heads) == 1:
        num_heads, num_head_channels = attn_heads.pop(), -1
    elif len(head_dims) == 1 and all(channels[i] % heads[i] == 0 for i in attn):
        num_heads, num_head_channels = -1, head_dims.pop()
    else:
        raise InvalidParameterError(f"unet/config.json attention heads {heads} with widths {channels}: ComfyUI's UNet "
                                    "needs either the same number of heads or the same head width in every block")
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": cfg.get("in_channels", 4), "out_channels": cfg.get("out_channels", 4),
        "model_channels": base, "channel_mult": [c // base for c in channels],
        "num_res_blocks": list(layout.num_res_blocks), "transformer_depth": list(layout.transformer_depth),
        # ComfyUI pops transformer_depth_output from the end while building output_blocks 0, 1, ...
        "transformer_depth_output": list(reversed(layout.transformer_depth_output)),
        "transformer_depth_middle": layout.transformer_depth_middle,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": context, "num_heads": num_heads, "num_head_channels": num_head_channels,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def sampling_from_scheduler(cfg: dict) -> tuple[dict, str]:
    """(ComfyUI sampling_settings, prediction type) from a diffusers scheduler_config.json."""
    if cfg.get("trained_betas") is not None:
        raise InvalidParameterError("scheduler/scheduler_config.json trained_betas is not supported; "
                                    "use beta_start / beta_end / beta_schedule")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in _BETA_SCHEDULES:
        raise InvalidParameterError(f"scheduler/scheduler_config.json beta_schedule={schedule!r}; supported: "
                                    f"{list(_BETA_SCHEDULES)}")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise InvalidParameterError(f"scheduler/scheduler_config.json prediction_type={prediction!r}; supported: "
                                    "'epsilon', 'v_prediction'")
    settings = {"beta_schedule": _BETA_SCHEDULES[schedule], "linear_start": cfg.get("beta_start", 0.0001),
                "linear_end": cfg.get("beta_end", 0.02), "timesteps": cfg.get("num_train_timesteps", 1000),
                "zsnr": bool(cfg.get("rescale_betas_zero_snr", False))}
    return settings, prediction


def text_config_from_transformers(cfg: dict) -> dict:
    """comfy.clip_model.CLIPTextModel config (sd1_clip_config.json keys) from a transformers CLIPTextConfig dict."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _CLIP_ACTIVATIONS:
        raise InvalidParameterError(f"text_encoder/config.json hidden_act={act!r}; "
                                    f"supported: {list(_CLIP_ACTIVATIONS)}")
    if cfg.get("layer_norm_eps", 1e-5) != 1e-5:
        raise InvalidParameterError(f"text_encoder/config.json layer_norm_eps={cfg['layer_norm_eps']}; ComfyUI's CLIP "
                                    "uses 1e-5")
    keys = {"num_hidden_layers": 12, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048,
            "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2}  # transformers' defaults
    out = {k: cfg.get(k, v) for k, v in keys.items()}
    out["hidden_act"] = act
    return out


def vae_ddconfig_from_diffusers(cfg: dict) -> dict:
    """LDM Encoder/Decoder ddconfig for a diffusers AutoencoderKL config (SD layout: quant convs, no attention
    inside the levels)."""
    if not (cfg.get("use_quant_conv", True) and cfg.get("use_post_quant_conv", True)):
        raise InvalidParameterError("vae/config.json use_quant_conv/use_post_quant_conv=false (an SD3/Flux-style VAE) "
                                    "is not an SD1.5-family VAE")
    for key, valid in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != valid for t in cfg.get(key, [valid])):
            raise InvalidParameterError(f"vae/config.json {key}={cfg[key]}: supported: only {valid!r}")
    channels = list(cfg.get("block_out_channels", [64]))
    base = channels[0]
    if any(c % base for c in channels):
        raise InvalidParameterError(f"vae/config.json block_out_channels={channels}: every width must be a multiple "
                                    f"of the first ({base})")
    return {"double_z": True, "z_channels": cfg.get("latent_channels", 4), "resolution": cfg.get("sample_size", 256),
            "in_channels": cfg.get("in_channels", 3), "out_ch": cfg.get("out_channels", 3), "ch": base,
            "ch_mult": [c // base for c in channels], "num_res_blocks": cfg.get("layers_per_block", 1),
            "attn_resolutions": [], "dropout": 0.0}


# ------------------------------------------------------------------------------------------------------ ComfyUI
@functools.cache
def _group_norm_ops(base, groups: int):
    """`base` ComfyUI operations whose GroupNorm uses `groups` groups: ComfyUI's UNet and VAE hard-code 32."""

    class GroupNorm(base.GroupNorm):
        def __init__(self, num_groups=None, num_channels=None, *args, **kwargs):
            super().__init__(groups, num_channels, *args, **kwargs)

    return type(f"{base.__name__}_groupnorm{groups}", (base,), {"GroupNorm": GroupNorm})


class _NoMidAttention(torch.nn.Module):
    """Stands in for the VAE mid-block attention of a diffusers VAE saved with mid_block_add_attention=False."""

    def forward(self, x, **kwargs):
        return x


_VAE_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _vae_build_scope(groups: int, mid_attention: bool):
    """ComfyUI's VAE Encoder takes its GroupNorm (via the module global `ops`) and its mid attention (`make_attn`)
    from module globals, with no constructor argument; swap them only while our VAE is being built."""
    from comfy.ldm.modules.diffusionmodules import model as ldm_vae

    saved = ldm_vae.ops, ldm_vae.make_attn
    with _VAE_BUILD_LOCK:
        try:
            if groups != 32:
                ldm_vae.ops = _group_norm_ops(saved[0], groups)
            if not mid_attention:
                ldm_vae.make_attn = lambda *args, **kwargs: _NoMidAttention()
            yield
        finally:
            ldm_vae.ops, ldm_vae.make_attn = saved


def _load_checked(module: torch.nn.Module, sd: dict, what: str):
    """Every converted key must land and every parameter must be loaded (a fresh module: nothing to roll back)."""
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsFormatError(f"{what}: {len(missing)} weights missing (e.g. {missing[:5]}) and {len(unexpected)} "
                                 f"unexpected (e.g. {unexpected[:5]}) after conversion to ComfyUI's layout")


def build_model(folder: Path):
    """MODEL (ModelPatcher) from unet/ + scheduler/ (+ vae/config.json for the latent scale)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    import comfy.utils

    from ..weights import keymaps

    unet_cfg = _read_json(folder / "unet" / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    settings, prediction = sampling_from_scheduler(_read_json(folder / "scheduler" / "scheduler_config.json"))
    unet_config = unet_config_from_diffusers(unet_cfg)
    layout = keymaps.UNetLayout.from_diffusers_config(unet_cfg)
    sd = keymaps.unet_diffusers_to_ldm(_load_weights(folder, "unet"), layout, prefix="")

    config = comfy.supported_models.SD15(unet_config)
    config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=unet_config["num_head_channels"])
    config.sampling_settings = settings
    latent = config.latent_format
    latent.scale_factor = float(vae_cfg.get("scaling_factor", _SD_VAE_SCALE))
    latent.latent_channels = unet_config["in_channels"]
    if latent.scale_factor != _SD_VAE_SCALE or latent.latent_channels != 4:  # SD's preview factors and TAESD don't fit
        latent.latent_rgb_factors, latent.taesd_decoder_name = None, None

    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), weight_dtype=comfy.utils.weight_dtype(sd),
                          supported_dtypes=config.supported_inference_dtypes)
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    groups = unet_cfg.get("norm_num_groups", 32)
    if groups != 32:
        config.custom_operations = _group_norm_ops(comfy.ops.pick_operations(dtype, manual_cast), groups)
    model_type = {"epsilon": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    model = comfy.model_base.BaseModel(config, model_type=model_type[prediction])
    _load_checked(model.diffusion_model, sd, f"{folder / 'unet'}")
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


@functools.cache
def _clip_text_model_class():
    import comfy.clip_model

    class CLIPTextModelAnyVocab(comfy.clip_model.CLIPTextModel):
        """ComfyUI sizes the token table 49408 whatever the config says; use the config's vocab_size."""

        def __init__(self, config_dict, dtype, device, operations):
            super().__init__(config_dict, dtype, device, operations)
            self.set_input_embeddings(operations.Embedding(config_dict["vocab_size"], config_dict["hidden_size"],
                                                           dtype=dtype, device=device))

    return CLIPTextModelAnyVocab


@functools.cache
def _closed_vocab_tokenizer_class():
    import comfy.sd1_clip

    from ..tiny.vocab import check_words

    class ClosedVocabTokenizer(comfy.sd1_clip.SDTokenizer):
        """CLIP's BPE never fails: a word outside a closed vocabulary would be spelled out in byte tokens the text
        encoder never saw and silently ignored. Refuse the prompt instead, naming the words."""

        def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
            check_words([text], self.tokenizer.get_vocab())
            return super().tokenize_with_weights(text, return_word_ids, **kwargs)

    return ClosedVocabTokenizer


class _ClipTarget:
    """What comfy.sd.CLIP reads from a target: params, clip(**params) and tokenizer(embedding_directory, ...)."""

    def __init__(self, text_config: dict, tokenizer_path: Path, special: dict, closed_vocab: bool = False):
        import comfy.sd1_clip

        length = text_config["max_position_embeddings"]  # ComfyUI adds the whole position table: pad to its length
        self.params = {}
        self.clip = functools.partial(
            comfy.sd1_clip.SD1ClipModel,
            clip_model=lambda **kw: comfy.sd1_clip.SDClipModel(
                textmodel_json_config=dict(text_config), model_class=_clip_text_model_class(), special_tokens=special,
                max_length=length, return_projected_pooled=False, **kw))
        self.tokenizer = functools.partial(
            comfy.sd1_clip.SD1Tokenizer,
            tokenizer=functools.partial(_closed_vocab_tokenizer_class() if closed_vocab else comfy.sd1_clip.SDTokenizer,
                                        tokenizer_path=str(tokenizer_path),
                                        max_length=length, embedding_size=text_config["hidden_size"],
                                        embedding_key="clip_l", pad_token=special["pad"]))


def build_clip(folder: Path, embedding_directory=None, model_options=None):
    """CLIP from text_encoder/ + tokenizer/ through ComfyUI's SD1 clip classes. model_options as comfy.sd.CLIP's
    (e.g. {"dtype": torch.float32}: ComfyUI stores text encoders in fp16 by default, even on the CPU)."""
    import comfy.sd
    from transformers import CLIPTokenizer

    from ..tiny.vocab import CLOSED_VOCAB_SIZE
    from ..weights import keymaps

    text_config = text_config_from_transformers(_read_json(folder / "text_encoder" / "config.json"))
    tok_path = _check_tokenizer(folder)
    try:
        tok = CLIPTokenizer.from_pretrained(str(tok_path))
    except Exception as exc:  # transformers raises OSError / ValueError / its own errors for a bad folder
        raise WeightsFormatError(f"{tok_path}: CLIPTokenizer cannot read it ({type(exc).__name__}: {exc})") from exc
    ids = tok("")["input_ids"]  # [bos, eos]
    if len(ids) != 2:
        raise WeightsFormatError(f"{tok_path}: an empty prompt tokenizes to {ids}; a CLIP tokenizer gives [bos, eos]")
    special = {"start": ids[0], "end": ids[1], "pad": tok.pad_token_id if tok.pad_token_id is not None else ids[1]}

    sd = _load_weights(folder, "text_encoder")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer some exports keep
    sd = keymaps.clip_diffusers_to_ldm(sd, prefix="")
    # SD1 conditioning uses the unprojected pooled output; an identity projection keeps text_projection defined
    sd.setdefault("text_projection.weight", torch.eye(text_config["hidden_size"]))
    target = _ClipTarget(text_config, tok_path, special, closed_vocab=len(tok) < CLOSED_VOCAB_SIZE)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options=model_options or {})
    _load_checked(clip.cond_stage_model.clip_l.transformer, sd, f"{folder / 'text_encoder'}")
    return clip


def build_vae(folder: Path):
    """VAE from vae/ through comfy.sd.VAE with an explicit ddconfig (ComfyUI infers only SD's own widths)."""
    import comfy.sd

    from ..weights import keymaps

    cfg = _read_json(folder / "vae" / "config.json")
    ddconfig = vae_ddconfig_from_diffusers(cfg)
    mid_attention = bool(cfg.get("mid_block_add_attention", True))
    if not mid_attention:
        ddconfig["attn_op"] = lambda *args, **kwargs: _NoMidAttention()  # the Decoder's own hook
    sd = keymaps.vae_diffusers_to_ldm(_load_weights(folder, "vae"), cfg, prefix="")
    groups = cfg.get("norm_num_groups", 32)
    widths = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
    if any(w % groups for w in widths):
        raise InvalidParameterError(f"vae/config.json norm_num_groups={groups} does not divide every width {widths}")
    with _vae_build_scope(groups, mid_attention):
        vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": ddconfig["z_channels"]}})
    _load_checked(vae.first_stage_model, sd, f"{folder / 'vae'}")
    vae.latent_channels = ddconfig["z_channels"]
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(widths) - 1)
    return vae


def load_sd15_folder(folder, embedding_directory=None):
    """(MODEL, CLIP, VAE) from a diffusers SD1.5-family pipeline folder of any size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsFormatError(f"{folder}: no such model folder")
    index = _read_json(folder / "model_index.json")
    if "text_encoder_2" in index or "unet" not in index:
        raise InvalidParameterError(f"{folder / 'model_index.json'}: {index.get('_class_name')} is not an SD1.5-family "
                                    "pipeline (expected one unet and one text_encoder, as in StableDiffusionPipeline)")
    return build_model(folder), build_clip(folder, embedding_directory), build_vae(folder)


# ---------------------------------------------------------------------------------------------------------- node
def _diffusers_roots() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (workflow validation, docs): only the embedded entry
        return []
    return [p for p in folder_paths.get_folder_paths("diffusers") if os.path.isdir(p)]


def list_models() -> list[str]:
    """The embedded model, then every folder under models/diffusers with model_index.json and unet/config.json."""
    names = [EMBEDDED_CHOICE]
    for root in _diffusers_roots():
        for path, dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files and os.path.isfile(os.path.join(path, "unet", "config.json")):
                names.append(Path(os.path.relpath(path, root)).as_posix())
                dirs.clear()  # a pipeline folder's sub-folders are its components
    return names[:1] + sorted(set(names[1:]) - {EMBEDDED_CHOICE})


def resolve_model(name: str) -> Path:
    """Folder of a dropdown entry. The embedded entry falls back to models/diffusers/nimblediff-tiny when the pack
    was installed without its weights."""
    if name == EMBEDDED_CHOICE:
        candidates = [EMBEDDED_DIR] + [Path(root) / EMBEDDED_NAME for root in _diffusers_roots()]
    else:  # a name from a workflow: never a folder outside models/diffusers
        from ..weights.paths import inside

        candidates = [inside(root, name, "model") for root in _diffusers_roots()]
    for path in candidates:
        if (path / "model_index.json").is_file():
            return path
    raise WeightsFormatError(f"model {name!r}: no model_index.json in {[str(c) for c in candidates]}; choose a folder "
                             "listed in the dropdown (diffusers pipeline folders under models/diffusers)")


class NimbleDiffusersCheckpointLoader:
    """Loads an SD1.5-family diffusers folder of any size (including NimbleDiff-Tiny) as MODEL, CLIP and VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (list_models(), {
            "tooltip": "A diffusers StableDiffusionPipeline folder under models/diffusers, or the model shipped "
                       "with NimbleDiff."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "NimbleDiff/loaders"
    DESCRIPTION = ("Builds ComfyUI's SD1.5 MODEL, CLIP and VAE from a diffusers folder's configs, for sizes ComfyUI's "
                   "checkpoint detection does not recognise.")

    def load(self, model):
        import folder_paths

        return load_sd15_folder(resolve_model(model), folder_paths.get_folder_paths("embeddings"))


class NimbleEmptyLatent:
    """Empty latents for a VAE's own size ratio: EmptyLatentImage always divides by 8, so with NimbleDiff-Tiny's /4
    VAE (or any VAE that is not /8) it makes images of another size than the one asked for."""

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 16, "max": 16384, "step": 8}
        return {"required": {
            "vae": ("VAE", {"tooltip": "the VAE that will decode the latents: its downscale ratio and latent "
                                       "channels set the latent's shape"}),
            "width": ("INT", {**size, "tooltip": "width of the decoded images in pixels (NimbleDiff-Tiny: 64)"}),
            "height": ("INT", {**size, "tooltip": "height of the decoded images in pixels (NimbleDiff-Tiny: 64)"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "number of latent images"}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "NimbleDiff/loaders"
    DESCRIPTION = ("Empty latents that the given VAE decodes to width x height, whatever its downscale ratio "
                   "(EmptyLatentImage assumes /8: with NimbleDiff-Tiny's /4 VAE it gives half the size).")

    def generate(self, vae, width, height, batch_size=1):
        import comfy.model_management

        ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else \
            vae.downscale_ratio
        if not isinstance(ratio, int):
            raise InvalidParameterError(f"vae: downscale ratio {ratio!r} is not one integer (a video VAE?); this node "
                                        "is for image VAEs")
        from ..core.limits import check_latent_size

        check_latent_size(batch_size, vae.latent_channels, height, width, ratio, "NimbleEmptyLatent")
        for name, value in (("width", width), ("height", height)):
            if value % ratio:
                raise InvalidParameterError(f"{name}={value} is not a multiple of the VAE's downscale ratio {ratio}; "
                                            f"use {value // ratio * ratio} or {(value // ratio + 1) * ratio}")
        latent = torch.zeros([batch_size, vae.latent_channels, height // ratio, width // ratio],
                             device=comfy.model_management.intermediate_device())   # (B, C, H/r, W/r)
        return ({"samples": latent},)


NODES = {
    "NimbleDiffusersCheckpointLoader": (NimbleDiffusersCheckpointLoader, "NimbleDiff Diffusers Checkpoint Loader"),
    "NimbleEmptyLatent": (NimbleEmptyLatent, "NimbleDiff Empty Latent (VAE size)"),
}
