"""Composition (PrimeComposer): core math against hand-computed references, the two attention adapters (diffusers
processor, ComfyUI attn1/attn2 replace) against each other, ComposePipeline on NimbleDiff-Tiny, the node through the
stub ComfyUI surface, and the errors for bad input."""

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from nimblediff.core import schedules
from nimblediff.core.editing import sample_inpaint
from nimblediff.core.editing.attention_patch import AttentionCall, AttentionPatch, attention, mask_tokens, token_grid
from nimblediff.core.editing.composition import CompositionPatch, place, sample_compose
from nimblediff.core.gmm import GaussianMixture
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import run
from nimblediff.core.sampling.driver import noise_from_seed
from nimblediff.errors import InvalidParameterError, NimbleDiffError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402

torch.set_num_threads(1)
PARAMS = {"vp": VP(), "flow": Flow()}
TINY = Path(__file__).resolve().parent.parent / "weights" / "tiny" / "nimblediff-tiny"


def _case(seed=0, size=8):
    """background, object (already in place), region: the right half's middle rows."""
    mix = GaussianMixture.random(k=4, dim=4 * size * size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    bg = mix.sample(1, g, dtype=torch.float64).reshape(1, 4, size, size)
    obj = mix.sample(1, g, dtype=torch.float64).reshape(1, 4, size, size)
    mask = torch.zeros(size, size, dtype=torch.float64)
    mask[2:6, size // 2:] = 1.0
    return mix, bg, obj, mask


def _hand_attention(q, k, v, heads, forbidden=None):
    """softmax per head, query by query, written out: forbidden (B, N, T) bool sets a logit to -inf."""
    b, n, inner = q.shape
    d = inner // heads
    out = torch.zeros(b, n, inner, dtype=q.dtype)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(n):
                logits = [float(q[bi, i, sl] @ k[bi, t, sl]) / math.sqrt(d) for t in range(k.shape[1])]
                if forbidden is not None:
                    logits = [-math.inf if forbidden[min(bi, len(forbidden) - 1), i, t] else z
                              for t, z in enumerate(logits)]
                top = max(logits)
                w = [math.exp(z - top) for z in logits]
                out[bi, i, sl] = sum(wt / sum(w) * v[bi, t, sl] for t, wt in enumerate(w))
    return out


# --- core: attention pieces -----------------------------------------------------------------------------------

def test_token_grid_follows_unet_levels():
    assert token_grid(64, 8, 8) == (8, 8)
    assert token_grid(16, 8, 8) == (4, 4)
    assert token_grid(6, 5, 9) == (2, 3)          # ceil(5/2)=3 -> 2, ceil(9/2)=5 -> 3
    with pytest.raises(InvalidParameterError, match="not a level of a 8x8 latent"):
        token_grid(10, 8, 8)


def test_mask_tokens_is_the_area_share_per_token():
    region = torch.zeros(1, 1, 4, 4)
    region[0, 0, 0, 0] = 1.0
    region[0, 0, 3, 2:] = 1.0
    r = mask_tokens(region, 4)                     # 2x2 tokens, each 2x2 cells
    assert torch.equal(r, torch.tensor([[0.25, 0.0, 0.0, 0.5]]))


def test_plain_attention_matches_the_hand_computed_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    torch.testing.assert_close(attention(q, k, v, 2), _hand_attention(q, k, v, 2))


@pytest.mark.parametrize("latent", [4, 8])          # region at the token level, and area-pooled 8x8 -> 4x4
def test_region_cross_attention_is_the_hand_computed_masked_softmax(latent):
    g = torch.Generator().manual_seed(1)
    region = torch.zeros(1, 1, latent, latent, dtype=torch.float64)
    region[..., : latent // 2, latent // 4:] = 1.0
    span = (3, 6)
    q = torch.randn(2, 16, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 9, 8, generator=g, dtype=torch.float64), torch.randn(2, 9, 8, generator=g,
                                                                               dtype=torch.float64)
    patch = CompositionPatch(region, span, injection=0.0)
    out = patch(q, k, v, AttentionCall("cross", "x", 2))
    cell = latent // 4                             # token (r, c) covers cells [r*cell, (r+1)*cell)
    inside = [float(region[0, 0, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].mean()) >= 0.5
              for r in range(4) for c in range(4)]
    forbidden = torch.zeros(1, 16, 9, dtype=torch.bool)
    for i, ins in enumerate(inside):
        if not ins:
            forbidden[0, i, span[0]:span[1]] = True
    torch.testing.assert_close(out, _hand_attention(q, k, v, 2, forbidden))
    # a context shorter than the span (e.g. a negative prompt without object tokens) is left alone
    short = patch(q, k[:, :5], v[:, :5], AttentionCall("cross", "x", 2))
    torch.testing.assert_close(short, _hand_attention(q, k[:, :5], v[:, :5], 2))


def test_self_attention_injection_is_the_hand_computed_mixture():
    """Region queries: attention over [reference keys inside the region, own keys outside], blended by
    injection * region share; queries outside: plain attention."""
    g = torch.Generator().manual_seed(2)
    region = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    region[..., 1:3, 1:4] = 1.0
    q, k, v, k_ref, v_ref = (torch.randn(1, 16, 8, generator=g, dtype=torch.float64) for _ in range(5))
    patch = CompositionPatch(region, None, injection=0.6)
    patch.mode = "record"
    recorded = patch(q, k_ref, v_ref, AttentionCall("self", "L", 2))
    torch.testing.assert_close(recorded, _hand_attention(q, k_ref, v_ref, 2))     # recording changes nothing
    patch.mode = "inject"
    out = patch(q, k, v, AttentionCall("self", "L", 2))
    inside = region.reshape(16) > 0.5
    keys, values = torch.cat([k_ref, k], 1), torch.cat([v_ref, v], 1)
    forbidden = torch.cat([~inside, inside])[None, None].expand(1, 16, 32)
    injected, plain = _hand_attention(q, keys, values, 2, forbidden), _hand_attention(q, k, v, 2)
    w = 0.6 * region.reshape(1, 16, 1)
    torch.testing.assert_close(out, plain + w * (injected - plain))
    assert torch.equal(out[:, ~inside], _hand_attention(q, k, v, 2)[:, ~inside]) or \
        torch.allclose(out[:, ~inside], plain[:, ~inside])
    # the reference equal to the composite: injection changes nothing (same keys, rearranged)
    patch.mode = "record"
    patch(q, k, v, AttentionCall("self", "L", 2))
    patch.mode = "inject"
    torch.testing.assert_close(patch(q, k, v, AttentionCall("self", "L", 2)), plain)


# --- core: the sampler ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PARAMS)
def test_without_injection_composition_is_the_inpaint_blend(kind):
    param = PARAMS[kind]
    mix, bg, obj, mask = _case()
    collage, region = place(bg, obj, mask)
    sigmas = schedules.make_sigmas("karras" if kind == "vp" else "trailing", 10, param).double()
    x = param.noise_scaling(float(sigmas[0]), torch.randn_like(bg), collage)
    ref = run(sample_inpaint, mix.denoiser(param), x, sigmas, param=param, seed=3, known=bg, mask=region)
    for patch in (None, CompositionPatch(region, (1, 2), injection=0.0)):
        out = run(sample_compose, mix.denoiser(param), x, sigmas, param=param, seed=3, background=bg,
                  reference=collage, region=region, patch=patch)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", PARAMS)
def test_outside_the_region_the_composite_follows_the_background_trajectory(kind):
    """Every composite ask equals the background re-noised with its one noise draw outside the region (to the
    bit), every reference ask is the collage on that same noise, and the result is the background there."""
    param = PARAMS[kind]
    mix, bg, obj, mask = _case(1)
    collage, region = place(bg, obj, mask)
    sigmas = schedules.make_sigmas("karras" if kind == "vp" else "trailing", 8, param).double()
    x = param.noise_scaling(float(sigmas[0]), torch.randn_like(bg), collage)
    patch = CompositionPatch(region, None, injection=1.0)
    asks, modes, denoiser = [], [], mix.denoiser(param)

    def model(x_in, sigma, **_):
        asks.append((x_in.clone(), float(sigma[0])))
        modes.append(patch.mode)
        return denoiser(x_in, sigma)

    out = run(sample_compose, model, x, sigmas, param=param, seed=5, background=bg, reference=collage,
              region=region, patch=patch, injection_end=0.5)
    n_bg = noise_from_seed(bg, 5)(None, None)
    outside = (region == 0).expand_as(bg)
    assert modes == ["record", "inject"] * 4 + ["plain"] * 4      # a reference pass for the first half
    for (x_in, sigma), mode in zip(asks, modes):
        expected = param.noise_scaling(sigma, n_bg, collage if mode == "record" else bg)
        target = x_in if mode == "record" else x_in[outside]
        assert torch.equal(target, expected if mode == "record" else expected[outside])
    assert torch.equal(out[outside], bg[outside])
    assert (out - bg)[~outside].abs().max() > 1e-3
    assert patch.mode == "plain" and not patch.bank


def test_place_cuts_the_object_and_resizes_it_into_the_box():
    bg = torch.zeros(1, 4, 8, 8)
    obj = torch.full((1, 4, 8, 8), -1.0)
    obj[..., 1:3, 1:3] = 2.0                       # the object: a 2x2 patch
    mask = torch.zeros(8, 8)
    mask[1:3, 1:3] = 1.0
    collage, region = place(bg, obj, mask, box=(0.5, 0.25, 0.5, 0.5))   # -> rows 2:6, cols 4:8
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:6, 4:8] = 1.0
    assert torch.equal(region, expected)
    assert torch.equal(collage, 2.0 * expected.expand(1, 4, 8, 8))


# --- adapters: diffusers processor and ComfyUI replace patch give the same attention -----------------------

class _PatcherRecorder:
    """The ModelPatcher calls patch_model makes: clone, get_model_object, set_model_attn1/2_replace."""

    def __init__(self, diffusion_model):
        self.diffusion_model, self.replace = diffusion_model, {}

    def clone(self):
        return _PatcherRecorder(self.diffusion_model)

    def get_model_object(self, name):
        return self.diffusion_model

    def set_model_attn1_replace(self, fn, block_name, number, transformer_index=None):
        self.replace[("attn1", block_name, number, transformer_index)] = fn

    def set_model_attn2_replace(self, fn, block_name, number, transformer_index=None):
        self.replace[("attn2", block_name, number, transformer_index)] = fn


def _comfy_unet():
    st = types.SimpleNamespace(transformer_blocks=[0, 1])
    return types.SimpleNamespace(input_blocks=[[], [st]], middle_block=[st], output_blocks=[[st], []])


def test_comfy_adapter_patches_every_transformer_block():
    from nimblediff.nodes.compose import patch_model

    patch = CompositionPatch(torch.ones(1, 1, 4, 4).tril(), (1, 2), 1.0)
    original = _PatcherRecorder(_comfy_unet())
    patched = patch_model(original, patch)
    blocks = [("input", 1), ("middle", 0), ("output", 0)]
    assert set(patched.replace) == {(a, *b, i) for a in ("attn1", "attn2") for b in blocks for i in (0, 1)}
    assert original.replace == {}                                   # the caller's model is not touched
    only_cross = patch_model(original, CompositionPatch(torch.ones(1, 1, 4, 4).tril(), (1, 2), 0.0))
    assert {k[0] for k in only_cross.replace} == {"attn2"}


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_diffusers_processor_and_comfy_replace_patch_agree(kind):
    from diffusers.models.attention_processor import Attention

    from nimblediff.nodes.compose import patch_model
    from nimblediff.pipelines.compose import PatchedAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=16 if kind == "cross" else None).eval()
    x, x_ref = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    ctx = torch.randn(2, 9, 16) if kind == "cross" else None
    region = torch.zeros(1, 1, 4, 4)
    region[..., 1:3, :2] = 1.0
    patch = CompositionPatch(region, (3, 6), injection=0.8)
    comfy = patch_model(_PatcherRecorder(_comfy_unet()), patch).replace[
        ("attn1" if kind == "self" else "attn2", "middle", 0, 1)]
    attn.set_processor(PatchedAttnProcessor(patch, "mid.attn", kind))
    options = {"n_heads": 4, "cond_or_uncond": [0, 1], "block": ("middle", 0), "block_index": 1}

    def comfy_call(h):
        c = h if ctx is None else ctx
        return attn.to_out[0](comfy(attn.to_q(h), attn.to_k(c), attn.to_v(c), options))

    with torch.no_grad():
        patch.mode = "record"
        ours = [attn(x_ref, encoder_hidden_states=ctx), comfy_call(x_ref)]
        patch.mode = "inject"
        ours += [attn(x, encoder_hidden_states=ctx), comfy_call(x)]
        attn.set_processor(type(Attention(query_dim=8).processor)())       # diffusers' own processor
        plain = [attn(x_ref, encoder_hidden_states=ctx), attn(x, encoder_hidden_states=ctx)]
    torch.testing.assert_close(ours[0], ours[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[2], ours[3], rtol=0, atol=1e-6)
    if kind == "self":            # the reference pass is plain attention; the composite pass is changed
        torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-5)
    assert (ours[2] - plain[1]).abs().max() > 1e-3


def test_plain_patch_through_the_diffusers_processor_is_diffusers_attention():
    from diffusers.models.attention_processor import Attention

    from nimblediff.pipelines.compose import PatchedAttnProcessor

    torch.manual_seed(1)
    attn = Attention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=16).eval()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=ctx)
        attn.set_processor(PatchedAttnProcessor(AttentionPatch(), "a", "cross"))
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), ref, rtol=1e-5, atol=1e-6)


# --- ComposePipeline on NimbleDiff-Tiny ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from nimblediff.pipelines import ComposePipeline

    p = ComposePipeline.from_pretrained(TINY)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def latents(pipe):
    import numpy as np
    from PIL import Image

    from nimblediff.tiny import data

    rng = np.random.default_rng(11)
    scenes = [data.sample_scene(rng, p_two=0.0) for _ in range(2)]
    bg, obj = (pipe.encode_image(Image.fromarray(data.render(s))) for s in scenes)
    mask = torch.zeros(bg.shape[-2:])
    mask[4:12, 8:16] = 1.0
    return bg, obj, mask


def test_pipeline_without_injection_or_token_mask_is_the_inpaint_blend(pipe, latents):
    from nimblediff.core.editing import truncate
    from nimblediff.pipelines.editing import _seed

    bg, obj, mask = latents
    prompt = "a red circle on the left on a black background"
    out = pipe(prompt, background_latents=bg, object_latents=obj, object_mask=mask, injection=0.0, strength=0.8,
               num_inference_steps=10, output_type="latent", generator=torch.Generator().manual_seed(4)).images
    param = pipe.editing_param()
    g = torch.Generator().manual_seed(4)
    sigmas = truncate(pipe._sigmas(param, 10, "trailing"), 0.8)
    noise = torch.randn(bg.shape, generator=g)
    collage = mask * obj + (1 - mask) * bg
    cond, _ = pipe._embeds(prompt, 1, 1.0)
    with torch.no_grad():
        ref = run(sample_inpaint, pipe.denoiser(param, cond), param.noise_scaling(sigmas[0], noise, collage),
                  sigmas, param=param, seed=_seed(g), known=bg, mask=mask)
    assert torch.equal(out, ref)


def test_pipeline_keeps_the_background_exactly_and_restores_the_unet(pipe, latents):
    bg, obj, mask = latents
    before = dict(pipe.unet.attn_processors)
    kwargs = dict(background_latents=bg, object_latents=obj, object_mask=mask, num_inference_steps=6,
                  output_type="latent", guidance_scale=3.0)
    out = pipe("a blue square on a white background", object_prompt="a green star", box=(0.25, 0.25, 0.5, 0.5),
               generator=torch.Generator().manual_seed(0), **kwargs).images
    plain = pipe("a blue square on a white background", injection=0.0, box=(0.25, 0.25, 0.5, 0.5),
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    _, region = place(bg, obj, mask, (0.25, 0.25, 0.5, 0.5))
    outside = (region == 0).expand_as(bg)
    assert torch.equal(out[outside], bg[outside]) and torch.equal(plain[outside], bg[outside])
    assert (out - plain)[~outside].abs().max() > 1e-2            # injection and token masking change the region
    assert dict(pipe.unet.attn_processors) == before
    with pytest.raises(NimbleDiffError):                           # restored after an error too
        pipe("a blue square", injection=2.0, **kwargs)
    assert dict(pipe.unet.attn_processors) == before


@pytest.mark.slow
def test_custom_pipeline_shim_loads_compose_pipeline(tmp_path):
    import os
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        from diffusers import DiffusionPipeline
        import nimblediff.pipelines as nd
        pipe = DiffusionPipeline.from_pretrained({str(TINY)!r}, custom_pipeline=nd.custom_pipeline_path("compose"),
                                                 trust_remote_code=True)
        assert isinstance(pipe, nd.ComposePipeline), type(pipe)
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_pipeline_errors_name_what_is_wrong(pipe, latents):
    import numpy as np

    bg, obj, mask = latents
    base = dict(background_latents=bg, object_latents=obj, num_inference_steps=2, output_type="latent")
    with pytest.raises(InvalidParameterError, match="object_mask is 32x32 but the object image is 64x64"):
        pipe("a red circle", object_mask=np.ones((32, 32), np.float32), **base)
    with pytest.raises(InvalidParameterError, match="object mask is empty"):
        pipe("a red circle", object_mask=torch.zeros(16, 16), **base)
    with pytest.raises(InvalidParameterError, match="covers the whole background"):
        pipe("a red circle", object_mask=torch.ones(16, 16), **base)
    with pytest.raises(InvalidParameterError, match="covers the whole background"):
        pipe("a red circle", object_mask=mask, box=(0, 0, 1, 1), **base)
    with pytest.raises(InvalidParameterError, match="injection_end"):
        pipe("a red circle", object_mask=mask, injection_end=-1, **base)


def test_unsupported_models_are_refused():
    from diffusers import SD3Transformer2DModel

    from nimblediff.nodes.compose import attention_blocks
    from nimblediff.pipelines.compose import attention_patched

    dit = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    with pytest.raises(InvalidParameterError, match="SD3Transformer2DModel has no UNet transformer attention"):
        with attention_patched(dit, CompositionPatch(torch.ones(1, 1, 4, 4).tril(), None, 1.0)):
            pass
    with pytest.raises(InvalidParameterError, match="this MODEL's diffusion model is Flux"):
        attention_blocks(type("Flux", (), {})())

    class EDM:
        kind = "edm"

        def noise_scaling(self, sigma, noise, x):
            return x

    _, bg, obj, mask = _case()
    with pytest.raises(InvalidParameterError, match="got a model of kind 'edm'"):
        next(sample_compose(bg, [1.0, 0.0], param=EDM(), noise=lambda a, b: bg, background=bg, reference=obj,
                            region=mask))


def test_bad_core_input_is_refused():
    _, bg, obj, mask = _case()
    with pytest.raises(InvalidParameterError, match="object mask is 5x5 but the object latent is 8x8"):
        place(bg, obj, torch.ones(5, 5))
    with pytest.raises(InvalidParameterError, match="object latent is 4x4 but the background latent is 8x8"):
        place(bg, obj[..., :4, :4], mask[2:6, 4:8])
    with pytest.raises(InvalidParameterError, match="covers no latent cell"):
        place(bg, obj, mask, box=(0.5, 0.5, 0.01, 0.01))
    with pytest.raises(InvalidParameterError, match="injection=1.5"):
        CompositionPatch(mask[None, None], None, 1.5)
    with pytest.raises(InvalidParameterError, match="cover the whole context"):
        CompositionPatch(mask[None, None], (0, 4), 0.0).cross_bias(64, 4)
    with pytest.raises(InvalidParameterError, match="region is 4x4 .* but the latent is 8x8"):
        next(sample_compose(bg, [1.0, 0.0], param=VP(), noise=lambda a, b: bg, background=bg, reference=obj,
                            region=mask[:4, :4]))


# --- the node through the stub ComfyUI surface --------------------------------------------------------------

PARAM = VP()


class _NodePatcher(fake_comfy.FakeModelPatcher):
    """FakeModelPatcher plus what the composition node uses: attention replace patches and process_latent_in."""

    def __init__(self, mix, unet, replace=None):
        super().__init__(torch.nn.Linear(1, 1), model_sampling=fake_comfy.EPS(PARAM.sigmas.float()))
        self.mix, self.unet, self.replace = mix, unet, dict(replace or {})
        self.model.process_latent_in = lambda x: x

    def clone(self):
        return _NodePatcher(self.mix, self.unet, self.replace)

    def get_model_object(self, name):
        return self.unet if name == "diffusion_model" else super().get_model_object(name)

    def set_model_attn1_replace(self, fn, block_name, number, transformer_index=None):
        self.replace[("attn1", block_name, number, transformer_index)] = fn

    def set_model_attn2_replace(self, fn, block_name, number, transformer_index=None):
        self.replace[("attn2", block_name, number, transformer_index)] = fn


@pytest.fixture
def comfy_stub():
    calls = []

    def sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, seed=None, callback=None,
                      **_):
        calls.append({"positive": positive, "model": model})
        guided = fake_comfy.GuidedModel(model.mix.denoiser(PARAM), model.model_sampling)
        guided.latent_image = latent_image
        return sampler.sampler_function(guided, latent_image + noise * float(sigmas[0]), sigmas,
                                        extra_args={"seed": seed},
                                        callback=lambda x: callback(x["i"], x["denoised"], x["x"], len(sigmas) - 1))

    fake_comfy.install()
    fake_comfy.install_sample(sample_custom=sample_custom, prepare_noise=lambda latent, seed: torch.randn(
        latent.shape, generator=torch.Generator().manual_seed(seed), dtype=latent.dtype))
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda i: calls.append(("bar", i, total)))
    sys.modules["comfy.utils"] = sys.modules["comfy"].utils = utils
    yield calls
    sys.modules.pop("comfy.utils", None)
    fake_comfy.uninstall()


def test_node_runs_the_core_sampler_with_patches_and_concatenated_tokens(comfy_stub):
    from nimblediff.nodes.compose import Compose

    mix, bg, obj, mask = _case(2)
    bg, obj, mask = bg.float(), obj.float(), mask.float()           # ComfyUI latents are float32
    pixel_mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[None].float()      # (1, 32, 32) image size
    model = _NodePatcher(mix, _comfy_unet())
    scene, thing = torch.randn(1, 7, 16), torch.randn(1, 5, 16)
    sigmas = schedules.make_sigmas("karras", 6, PARAM)
    # box width 0: the object stays where it is (object latent of the background's size)
    composite, collage = Compose().compose(model, [[scene, {"pooled_output": None}]], [], [[thing, {}]],
                                           {"samples": bg}, {"samples": obj}, sigmas, 7, 1.0, 1.0, 0.5,
                                           0.5, 0.25, 0.0, 0.5, object_mask=pixel_mask)
    assert model.replace == {}                                     # the caller's MODEL is untouched
    call = comfy_stub[0]
    assert len(call["model"].replace) == 12
    assert torch.equal(call["positive"][0][0], torch.cat([scene, thing], 1))
    region = mask[None, None]
    assert torch.equal(collage["samples"], region * obj + (1 - region) * bg)
    noise = torch.randn(bg.shape, generator=torch.Generator().manual_seed(7), dtype=bg.dtype)
    patch = CompositionPatch(region, (7, 12), 1.0)
    ref = run(sample_compose, mix.denoiser(PARAM), collage["samples"] + noise * float(sigmas[0]), sigmas,
              param=PARAM, seed=7, background=bg, reference=collage["samples"], region=region, patch=patch,
              injection_end=0.5)
    assert torch.equal(composite["samples"], ref)
    assert [c[1] for c in comfy_stub if isinstance(c, tuple)] == [1, 2, 3, 4, 5, 6]    # a tick per step, not per pass


def test_node_errors_name_both_sizes(comfy_stub):
    from nimblediff.nodes.compose import Compose

    mix, bg, obj, mask = _case(2)
    model = _NodePatcher(mix, _comfy_unet())
    args = ([[torch.randn(1, 7, 16), {}]], [], [[torch.randn(1, 5, 16), {}]], {"samples": bg}, {"samples": obj})
    sigmas = schedules.make_sigmas("karras", 4, PARAM)
    with pytest.raises(InvalidParameterError, match="mask is 24x32 but the latent is 8x8"):
        Compose().compose(model, *args, sigmas, 0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.5, 0.5, torch.ones(1, 32, 24))
    with pytest.raises(InvalidParameterError, match="object mask is empty"):
        Compose().compose(model, *args, sigmas, 0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.5, 0.5, torch.zeros(1, 32, 32))
    with pytest.raises(InvalidParameterError, match="covers the whole background"):
        Compose().compose(model, *args, sigmas, 0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, torch.ones(1, 32, 32))
    with pytest.raises(InvalidParameterError, match="give an object mask, or a box"):
        Compose().compose(model, *args, sigmas, 0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.0, 0.5)
    flux = _NodePatcher(mix, type("Flux", (), {})())
    with pytest.raises(InvalidParameterError, match="diffusion model is Flux"):
        Compose().compose(flux, *args, sigmas, 0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.5, 0.5, torch.ones(1, 32, 32).tril())


def test_node_without_a_mask_copies_the_box_of_the_object_image(comfy_stub):
    from nimblediff.nodes.compose import Compose

    mix, bg, obj, _ = _case(3)
    bg, obj = bg.float(), obj.float()
    model = _NodePatcher(mix, _comfy_unet())
    _, collage = Compose().compose(model, [[torch.randn(1, 7, 16), {}]], [], [[torch.randn(1, 5, 16), {}]],
                                   {"samples": bg}, {"samples": obj}, schedules.make_sigmas("karras", 3, PARAM), 0,
                                   1.0, 0.0, 0.5, 0.25, 0.5, 0.5, 0.25)       # box: cols 2:6, rows 4:6
    expected = bg.clone()
    expected[..., 4:6, 2:6] = obj[..., 4:6, 2:6]
    assert torch.equal(collage["samples"], expected)


# --- real ComfyUI: the node's adapter on ComfyUI's own UNet vs the pipeline's on diffusers' UNet ---------------

PARITY = r'''
import json, sys
comfy_dir, pack, folder = sys.argv[1:4]
sys.path.insert(0, pack + "/tests")
import comfy_harness
loaders = comfy_harness._import_pack(comfy_dir, pack)
import torch
from diffusers import UNet2DConditionModel
from nimblediff.core.editing.composition import CompositionPatch
from nimblediff.nodes.compose import patch_model
from nimblediff.pipelines.compose import attention_patched

torch.manual_seed(0)
model, clip, vae = loaders.load_sd15_folder(folder)
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
ms = model.model.model_sampling
region = torch.zeros(1, 1, 16, 16); region[..., 4:12, 8:16] = 1.0
ctx = torch.randn(2, 48, unet.config.cross_attention_dim)
out = {}
for name, tokens, injection in (("cross", (24, 48), 0.0), ("self", None, 1.0), ("both", (24, 48), 1.0)):
    t = 500
    sigma = ms.sigmas[t].float()
    x, x_ref = (torch.randn(2, 4, 16, 16) * (1 + sigma**2).sqrt() for _ in range(2))
    results = []
    for side in ("comfy", "diffusers"):
        patch = CompositionPatch(region, tokens, injection)
        outs = []
        for mode, xin in (("record", x_ref), ("inject", x)):
            patch.mode = mode
            with torch.no_grad():
                if side == "comfy":
                    patched = patch_model(model, patch)
                    opts = dict(patched.model_options["transformer_options"])
                    y = patched.model.apply_model(xin, sigma.expand(2), c_crossattn=ctx, transformer_options=opts)
                else:
                    with attention_patched(unet, patch):
                        eps = unet(xin / (1 + sigma**2).sqrt(), torch.tensor([t, t]), encoder_hidden_states=ctx).sample
                    y = xin - sigma * eps
            outs.append(y.float())
        results.append(outs)
    with torch.no_grad():                               # the composite pass without any patch
        plain = x - sigma * unet(x / (1 + sigma**2).sqrt(), torch.tensor([t, t]), encoder_hidden_states=ctx).sample
    out[name] = {"record": float((results[0][0] - results[1][0]).abs().max()),
                 "inject": float((results[0][1] - results[1][1]).abs().max()),
                 "patch_effect": float((results[1][1] - plain).abs().max()),
                 "scale": float(plain.abs().max())}
print(json.dumps(out))
'''


@pytest.mark.comfyui
def test_real_comfyui_unet_with_our_patches_matches_diffusers():
    """The shipped tiny model in ComfyUI's UNet (attn1 / attn2 replace patches, the node's adapter) and in diffusers'
    (attention processors, the pipeline's adapter): a reference pass recorded, then the composite pass injected, with
    cross-attention masking, self-attention injection and both. With every attention call ours the outputs agree to
    float rounding; the patch itself moves the output."""
    import json
    import os
    import subprocess

    import comfy_harness

    comfy = comfy_harness.comfyui_path()
    if comfy is None or not (comfy / "main.py").is_file():
        pytest.skip("needs COMFYUI_PATH (and COMFYUI_PYTHON with diffusers)")
    proc = subprocess.run([comfy_harness.comfyui_python(), "-c", PARITY, str(comfy), str(comfy_harness.PACK_DIR),
                           str(TINY)], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        assert r["record"] < 1e-4 * r["scale"] and r["inject"] < 1e-4 * r["scale"], (name, r)
        assert r["patch_effect"] > 1e-2, (name, r)
