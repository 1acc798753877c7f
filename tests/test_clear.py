"""CLEAR local-window attention (core/caching/local_attention.py, its diffusers and ComfyUI surfaces, the clear
training stage and the shipped adapter). References: a mask built here by looping over token pairs, a naive masked
softmax written from the definition, dense `F.scaled_dot_product_attention`, the unpatched transformer, diffusers'
own JointAttnProcessor2_0 with a windowed softmax patched in (image-first order, as diffusers joins tokens) and the
stock `load_lora_weights`."""

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nimblediff.core.caching import local_attention as la
from nimblediff.errors import InvalidParameterError, NimbleDiffError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402
from factories import tiny_sd3_pipeline  # noqa: E402
from test_sparse_attention import MMDiT, Base, Patcher, comfy_sample  # noqa: E402
from test_tiny_dit import folder  # noqa: E402,F401  (the tiny random DiT folder fixture)


# ----------------------------------------------------------------------------------------------------- the pattern
def hand_mask(h, w, r, n_text, text_first):
    """Token by token: text rows see everything; an image row sees text and image tokens within distance r."""
    n = n_text + h * w
    pos = {}
    for i in range(h * w):
        pos[(n_text + i) if text_first else i] = divmod(i, w)      # (row, column), row-major
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            if a not in pos or b not in pos:
                mask[a, b] = True
            else:
                (ya, xa), (yb, xb) = pos[a], pos[b]
                mask[a, b] = math.sqrt((ya - yb) ** 2 + (xa - xb) ** 2) <= r
    return mask


@pytest.mark.parametrize("h,w,r,n_text,text_first", [(3, 4, 1.5, 2, True), (3, 4, 1.5, 2, False), (4, 4, 1, 0, True),
                                                     (5, 3, 2, 3, True), (2, 2, 0, 1, False)])
def test_mask_equals_the_hand_built_reference(h, w, r, n_text, text_first):
    assert torch.equal(la.window_mask((h, w), r, n_text, text_first=text_first), hand_mask(h, w, r, n_text,
                                                                                             text_first))


def test_kept_share_by_hand():
    # 3x3 grid, r = 1, no text: 9 self pairs + 12 grid edges both ways = 33 of 81 pairs
    assert la.kept_share((3, 3), 1) == pytest.approx(33 / 81)
    # + 2 text tokens: 11 x 11 pairs, of which text rows 2 x 11, text columns 9 x 2, and the 33 image pairs
    assert la.kept_share((3, 3), 1, 2) == pytest.approx((22 + 18 + 33) / 121)
    assert la.kept_share((3, 3), math.hypot(2, 2), 2) == 1.0


def qkv(seed=0, b=2, h=3, n=17, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("grid,n_text", [((3, 4), 5), ((4, 4), 1), ((1, 6), 11)])
def test_radius_past_the_diagonal_is_sdpa_exactly(grid, n_text):
    q, k, v = qkv(n=n_text + grid[0] * grid[1])
    r = la.diagonal(grid)
    assert la.window_mask(grid, r, n_text).all()
    assert torch.equal(la.local_attention(q, k, v, grid, r), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(la.local_attention(q, k, v, grid, 100.0), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("r,text_first", [(0, True), (1, True), (1.5, False), (2.2, True)])
def test_local_attention_equals_a_naive_masked_softmax(r, text_first):
    grid, n_text = (3, 4), 5
    q, k, v = qkv(1, n=n_text + 12)
    mask = hand_mask(3, 4, r, n_text, text_first)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    got = la.local_attention(q, k, v, grid, r, text_first=text_first)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda: la.window_mask((3, 3), -1), "radius=-1"), (lambda: la.window_mask((3, 3), float("nan")), "radius=nan"),
    (lambda: la.window_mask((3, 3), True), "radius=True"), (lambda: la.window_mask((3, 3), "2"), "radius='2'"),
    (lambda: la.window_mask((0, 3), 1), r"grid=\(0, 3\)"), (lambda: la.window_mask((3,), 1), r"grid=\(3,\)"),
    (lambda: la.window_mask((2.0, 3), 1), r"grid=\(2.0, 3\)"), (lambda: la.window_mask((3, 3), 1, -1), "n_text=-1"),
    (lambda: la.local_attention(*qkv(n=5), (3, 3), 1), "5 tokens cannot hold a 3x3 image grid"),
    (lambda: la.LocalAttention(-2), "radius=-2"), (lambda: la.LocalAttention(2, 0), "patch_size=0"),
    (lambda: la.LocalAttention(2).attend(*qkv()), "outside a model call"),
])
def test_bad_radius_and_grids_are_refused_naming_them(call, match):
    with pytest.raises(InvalidParameterError, match=match):
        call()


def test_state_reads_the_grid_and_counts_flops():
    state = la.LocalAttention(1, patch_size=2)
    q, k, v = qkv(n=3 + 6)
    out = state(lambda x: state.attend(q, k, v, state.next_layer()), torch.tensor(1.0), torch.zeros(1, 4, 4, 6))
    assert state.grid == (2, 3) and state.keep < 1
    torch.testing.assert_close(out, la.local_attention(q, k, v, (2, 3), 1))
    assert state.flops_kept == pytest.approx(la.kept_share((2, 3), 1, 3))
    state(lambda x: None, torch.tensor(1.0), torch.zeros(1, 4, 3, 5))             # odd sizes: padded patches
    assert state.grid == (2, 3)


# ------------------------------------------------------------------------------------------- diffusers surface
@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline(0)


def _latents(pipe, steps=3, **kw):
    return pipe("a cat", num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, max_sequence_length=8,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def windowed_sdpa(grid, r, n_img):
    """A stand-in for F.scaled_dot_product_attention under diffusers' own JointAttnProcessor2_0: its joint call
    (image tokens first, then text) gets the CLEAR pattern as a naive masked softmax."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or is_causal or q.shape[2] <= n_img:     # the text encoders' (causal) attention
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            **kw)
        n_text = q.shape[2] - n_img
        mask = hand_mask(*grid, r, n_text, text_first=False)
        s = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
    return sdpa


def test_pipeline_full_window_is_the_unpatched_model_and_disable_restores(sd3):
    from nimblediff.pipelines.caching import RettentionProcessor, disable_nimble_cache, enable_nimble_cache

    base, before = _latents(sd3), dict(sd3.transformer.attn_processors)
    state = enable_nimble_cache(sd3, "clear", radius=la.diagonal((8, 8)))
    assert all(isinstance(p, RettentionProcessor) for p in sd3.transformer.attn_processors.values())
    assert torch.equal(_latents(sd3), base)
    assert state.grid == (8, 8) and state.flops_kept == 1.0 and state.calls == 3      # 1 layer, CFG batched
    disable_nimble_cache(sd3)
    after = dict(sd3.transformer.attn_processors)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_latents(sd3), base)


@pytest.mark.parametrize("r", [1, 2.5])
def test_pipeline_window_equals_diffusers_processor_with_a_masked_softmax(sd3, monkeypatch, r):
    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    state = enable_nimble_cache(sd3, "clear", radius=r)
    got = _latents(sd3)
    disable_nimble_cache(sd3)
    base = _latents(sd3)
    monkeypatch.setattr(F, "scaled_dot_product_attention", windowed_sdpa((8, 8), r, 64))
    want = _latents(sd3)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)
    assert 0 < state.flops_kept < 1


@pytest.mark.parametrize("opts,match", [({"radius": -1}, "radius=-1"), ({}, "needs radius="),
                                        ({"radius": 2, "keep": 0.5}, "keep: method='clear'"),
                                        ({"adapter": "/no/such.safetensors"}, "no such file")])
def test_pipeline_bad_options_leave_it_unchanged(sd3, opts, match):
    from nimblediff.pipelines.caching import enable_nimble_cache

    before = dict(sd3.transformer.attn_processors)
    with pytest.raises(NimbleDiffError, match=match):
        enable_nimble_cache(sd3, "clear", **opts)
    assert all(sd3.transformer.attn_processors[n] is p for n, p in before.items())
    assert not getattr(sd3.transformer, "peft_config", None)


def test_pipeline_adapter_of_other_keys_is_refused_unchanged(sd3, tmp_path):
    from safetensors.torch import save_file

    from nimblediff.pipelines.caching import enable_nimble_cache

    path = tmp_path / "bad.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(path))
    base = _latents(sd3)
    with pytest.raises(NimbleDiffError, match="not a diffusers transformer LoRA"):
        enable_nimble_cache(sd3, "clear", radius=2, adapter=path)
    assert torch.equal(_latents(sd3), base)


def test_pipeline_unknown_model_type_is_named():
    from factories import tiny_flux_pipeline

    from nimblediff.pipelines.caching import enable_nimble_cache

    flux = tiny_flux_pipeline(0)
    with pytest.raises(InvalidParameterError, match="model type FluxTransformer2DModel is not supported"):
        enable_nimble_cache(flux, "clear", radius=2)


# --------------------------------------------------------------------------------- shipped adapter and training
def _tiny_dit():
    import nimblediff
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(nimblediff.TINY_DIT, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_latents(pipe, steps=3):
    return pipe(["a red circle on the left", "a blue square at the top"], height=64, width=64, guidance_scale=3.0,
                num_inference_steps=steps, max_sequence_length=24, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


def test_shipped_adapter_is_stock_lora_loading_plus_the_window(monkeypatch):
    """enable_nimble_cache(pipe, 'clear', adapter=TINY_DIT_CLEAR_LORA) = the stock load_lora_weights of that file
    with diffusers' own processors under the windowed softmax; disable gives the unpatched model back."""
    import nimblediff
    from safetensors import safe_open

    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache

    path = nimblediff.TINY_DIT_CLEAR_LORA
    assert os.path.getsize(path) < 4 * 2**20
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    assert meta["grid"] == "8x8" and float(meta["radius"]) > 0
    pipe = _tiny_dit()
    base = _dit_latents(pipe)
    state = enable_nimble_cache(pipe, "clear", adapter=path)
    assert state.radius == float(meta["radius"]) and pipe.transformer.active_adapters() == ["nimblediff_clear"]
    got = _dit_latents(pipe)
    disable_nimble_cache(pipe)
    assert not getattr(pipe.transformer, "peft_config", None)
    assert torch.equal(_dit_latents(pipe), base)

    stock = _tiny_dit()
    stock.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    monkeypatch.setattr(F, "scaled_dot_product_attention", windowed_sdpa((8, 8), state.radius, 64))
    want = _dit_latents(stock)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(got).all() and not torch.allclose(got, base, atol=1e-3)


def test_clear_stage_trains_resumes_and_saves_a_lora_diffusers_loads(folder, tmp_path):  # noqa: F811
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache
    from nimblediff.tiny import train_dit

    shutil.copytree(folder, tmp_path / "dit" / "pipeline")
    common = ["--out", str(tmp_path), "--no-progress", "--threads", "1"]
    train_dit.main(["--stage", "couples", "--max-steps", "1", "--batch", "2"] + common)
    train_dit.main(["--stage", "clear", "--max-steps", "1", "--batch", "2", "--radius", "1.5"] + common)
    assert torch.load(tmp_path / "clear" / "ckpt.pt", weights_only=True)["step"] == 1
    train_dit.main(["--stage", "clear", "--max-steps", "2", "--batch", "2", "--radius", "1.5"] + common)
    assert "resumed at step 1" in (tmp_path / "clear" / "train.log").read_text()
    path = tmp_path / "clear" / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["radius"] == "1.5" and meta["steps"] == "2"
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    assert keys and all(k.startswith("transformer.") and any(f".{m}.lora_" in k for m in attention) for k in keys)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "dit" / "pipeline", text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    assert sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_A" in n) == len(keys) // 2
    pipe.unload_lora_weights()
    assert enable_nimble_cache(pipe, "clear", adapter=path).radius == 1.5
    disable_nimble_cache(pipe)


# --------------------------------------------------------------------------------------------- ComfyUI surface
@pytest.fixture
def comfy():
    fake_comfy.install()
    from nimblediff.nodes import caching

    yield caching
    fake_comfy.uninstall()


def test_node_registered_with_tooltips():
    from nimblediff import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["NimbleDiffClearAttention"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["NimbleDiffClearAttention"] == "NimbleDiff CLEAR Local Attention (DiT)"
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "adapter", "radius"]
    assert spec["required"]["adapter"][0][:2] == ["nimblediff-tiny-dit-clear (embedded)", "none (window only)"]
    assert all("tooltip" in opts for group in spec.values() for _, opts in group.values())
    assert cls.DESCRIPTION


def test_node_window_only_is_the_core_rule_through_the_override(comfy):
    """A toy MMDiT (patch 1, 4x4 grid, 5 text tokens first): the node's window equals the model run with a hand-made
    override computing local_attention directly; a radius past the diagonal is the unpatched model bit for bit."""
    inner = MMDiT()
    inner.patch_size = 1
    model = Patcher(Base(inner))
    (full,) = comfy.ClearLocalAttentionModel().patch(model, "none (window only)", la.diagonal((4, 4)))
    assert model.model_options == {"transformer_options": {}}
    assert all(torch.equal(a, b) for a, b in zip(comfy_sample(full), comfy_sample(model)))
    (patched,) = comfy.ClearLocalAttentionModel().patch(model, "none (window only)", 1.0)
    got = comfy_sample(patched)

    def hand(func, q, k, v, heads, transformer_options=None, **_):
        b = q.shape[0]
        qh, kh, vh = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        o = la.local_attention(qh, kh, vh, (4, 4), 1.0)
        return o.transpose(1, 2).reshape(b, -1, q.shape[-1])

    ref = Patcher(model.model)
    ref.model_options["transformer_options"]["optimized_attention_override"] = hand
    want = comfy_sample(ref)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert not torch.allclose(got[-1], comfy_sample(model)[-1], atol=1e-4)


@pytest.mark.parametrize("name", ["Flux", "UNetModel"])
def test_node_refuses_other_model_types_naming_them(comfy, name):
    model = Patcher(Base(type(name, (torch.nn.Module,), {})()))
    with pytest.raises(InvalidParameterError, match=f"model type {name} is not supported"):
        comfy.ClearLocalAttentionModel().patch(model, "none (window only)", 2.0)
    assert model.model_options == {"transformer_options": {}}


def test_a_users_lora_stays_active_with_the_clear_adapter_and_after(tmp_path):
    """Loading the CLEAR LoRA activates it next to the user's adapter (diffusers would make it the only active one);
    disable deletes ours only."""
    from peft import LoraConfig

    from nimblediff.pipelines.caching import disable_nimble_cache, enable_nimble_cache
    from nimblediff.tiny import clear
    from nimblediff.tiny.flash import add_lora

    source = tiny_sd3_pipeline(0).transformer
    add_lora(source, 4, clear.TARGET_MODULES)
    path = clear.save_adapter(source, tmp_path, radius=1.5, grid=(8, 8), rank=4)
    pipe = tiny_sd3_pipeline(0)
    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="user")
    state = enable_nimble_cache(pipe, "clear", adapter=path)
    assert state.radius == 1.5 and pipe.transformer.active_adapters() == ["user", "nimblediff_clear"]
    disable_nimble_cache(pipe)
    assert pipe.transformer.active_adapters() == ["user"] and list(pipe.transformer.peft_config) == ["user"]
