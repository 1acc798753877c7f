"""EIM (DiT semantic editing) and the PTI nodes, against independent references.

- core: on an analytic Gaussian flow denoiser whose mean is linear in the conditioning, strength 0 is plain
  inversion + Euler regeneration, strength 1 is inversion + prompt swap, and the edit is affine in the strength
  (hand-derived: every Euler step is affine in the conditioning's mean);
- pipeline: a tiny random SD3 (tests/factories.py) edited by DiTEditPipeline agrees with the stock
  StableDiffusion3Pipeline sampling our inverted noise under the source (strength 0) or target (strength 1) prompt;
- nodes: through the stub ComfyUI surface on the same analytic denoiser; PTI's tuned conditioning (token states and
  pooled vector) reconstructs better than the source prompt under guidance, and each tuned entry is active at its
  own step only.
"""

import sys
import types
from pathlib import Path

import pytest
import torch

from nimblediff.core.editing.eim import check_joint_model, direction, edit, edit_conds, manipulate
from nimblediff.core.editing.inversion import invert, latent_psnr
from nimblediff.core.editing.pti import run_per_step
from nimblediff.core.parameterization import VP, Flow
from nimblediff.core.sampling import run
from nimblediff.core.sampling.ode import sample_euler
from nimblediff.errors import InvalidParameterError, NimbleDiffError

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import fake_comfy  # noqa: E402

torch.set_num_threads(1)
PARAM = Flow()
SHAPE = (2, 2, 4, 4)                       # (B, C, H, W)
L, D, P = 3, 5, 4                          # tokens, token width, pooled width
S2 = 0.25                                  # data variance around the conditioning's mean
_G = torch.Generator().manual_seed(0)
A = torch.randn(D, 32, generator=_G, dtype=torch.float64) * 0.3
B = torch.randn(P, 32, generator=_G, dtype=torch.float64) * 0.3


def _mean(tokens, pooled):
    return (tokens.mean(1) @ A + pooled @ B).reshape(-1, *SHAPE[1:])


def gaussian_x0(x, sigma, tokens, pooled):
    """E[x0 | x] for x0 ~ N(mean(c), S2 I), x = (1 - s) x0 + s eps: exact, affine in x and in the mean."""
    s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    m, a = _mean(tokens, pooled), 1 - s
    return m + a * S2 / (a * a * S2 + s * s) * (x - a * m)


def model(x, sigma, c, **_):
    return gaussian_x0(x, sigma, *c)


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SHAPE[0], L, D, generator=g, dtype=torch.float64),
            torch.randn(SHAPE[0], P, generator=g, dtype=torch.float64))


def _x0(seed=1):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5


def _sigmas(steps=12):
    return torch.linspace(1, 0, steps + 1, dtype=torch.float64)


def _reference(x0, sigmas, invert_under, sample_under, fixed_point=0):
    """Inversion and Euler regeneration with the core drivers, called directly (no EIM code)."""
    trajectory = run(invert, lambda x, s: model(x, s, invert_under), x0, sigmas, param=PARAM, fixed_point=fixed_point)
    return run(sample_euler, lambda x, s: model(x, s, sample_under), trajectory[-1], sigmas, param=PARAM)


# ------------------------------------------------------------------------------------------------------ core
def test_strength_zero_is_plain_inversion_and_regeneration():
    src, tgt, x0, sigmas = _cond(2), _cond(3), _x0(), _sigmas()
    out, noise = edit(model, x0, sigmas, src, tgt, 0.0, param=PARAM, fixed_point=3)
    assert torch.equal(out, _reference(x0, sigmas, src, src, fixed_point=3))
    assert latent_psnr(out, x0) > 60                         # and that is the image back
    assert noise.shape == x0.shape and not torch.allclose(noise, x0)


def test_strength_one_is_inversion_plus_prompt_swap():
    src, tgt, x0, sigmas = _cond(2), _cond(3), _x0(), _sigmas()
    out, _ = edit(model, x0, sigmas, src, tgt, 1.0, param=PARAM)
    torch.testing.assert_close(out, _reference(x0, sigmas, src, tgt), rtol=0, atol=1e-12)
    assert (out - x0).abs().max() > 0.1                      # the edit moved the image


@pytest.mark.parametrize("strength", [-1.0, 0.5, 2.5])
def test_edit_is_affine_in_the_strength(strength):
    """Each Euler step is affine in the mean, and the mean is linear in c: out(l) = out(0) + l (out(1) - out(0))."""
    src, tgt, x0, sigmas = _cond(4), _cond(5), _x0(2), _sigmas(8)
    out = {s: edit(model, x0, sigmas, src, tgt, s, param=PARAM)[0] for s in (0.0, 1.0, strength)}
    torch.testing.assert_close(out[strength], out[0.0] + strength * (out[1.0] - out[0.0]), rtol=0, atol=1e-10)


def test_direction_and_manipulate_per_stream():
    (a, p), (b, q) = _cond(6), _cond(7)
    delta = direction((a, p), (b, q))
    mid = manipulate((a, p), delta, 0.5)
    torch.testing.assert_close(mid[0], (a + b) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(mid[1], (p + q) / 2, rtol=0, atol=1e-12)
    assert manipulate((a, p), delta, 0.0) == (a, p)
    single = direction(a, b)                                 # one stream: plain tensors in, tensor out
    assert isinstance(single, torch.Tensor) and torch.equal(single, b - a)


def test_callback_counts_every_model_call_of_both_phases():
    calls = []
    edit(model, _x0(), _sigmas(5), _cond(2), _cond(3), 1.0, param=PARAM, fixed_point=2,
         callback=lambda info: calls.append(info["i"]))
    assert calls == list(range(5 * 3 + 5))


def test_window_edits_only_the_first_steps():
    src, tgt, x0, sigmas = _cond(2), _cond(3), _x0(), _sigmas(10)
    out0, _ = edit(model, x0, sigmas, src, tgt, 0.0, param=PARAM)
    none, _ = edit(model, x0, sigmas, src, tgt, 2.0, param=PARAM, window=0.0)
    assert torch.equal(none, out0)
    conds = edit_conds(src, direction(src, tgt), 2.0, 10, window=0.3)
    assert [c is src for c in conds] == [False] * 3 + [True] * 7
    half, _ = edit(model, x0, sigmas, src, tgt, 1.0, param=PARAM, window=0.3)
    trajectory = run(invert, lambda x, s: model(x, s, src), x0, sigmas, param=PARAM)
    x = trajectory[-1]
    for i in range(10):                                      # hand-rolled Euler with the switch at step 3
        d = model(x, sigmas[i], tgt if i < 3 else src)
        x = d + (sigmas[i + 1] / sigmas[i]) * (x - d)
    torch.testing.assert_close(half, x, rtol=0, atol=1e-10)


def straight_x0(x, sigma, c, **_):
    """A straight-path flow (what rectified-flow distillation aims at, nimblediff.TINY_DIT_2RF): every sample is its
    noise z moved by the conditioning's mean, x0 = z + m(c), so x_s = z + (1 - s) m and E[x0 | x_s] = x_s + s m."""
    s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return x + s * _mean(*c)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_few_step_edit_is_exact_on_straight_paths(steps):
    """Hand-derived: inverting under the source lands on z = x0 - m(source) in any number of Euler steps, and
    regenerating under source + l (target - source) gives z + m(edited), i.e. x0 + l (m(target) - m(source)); the
    curved Gaussian flow of the other tests is not reproduced in so few steps."""
    src, tgt, x0, sigmas = _cond(2), _cond(3), _x0(), _sigmas(steps)
    for strength in (0.0, 1.0, 1.5):
        out, noise = edit(straight_x0, x0, sigmas, src, tgt, strength, param=PARAM)
        torch.testing.assert_close(noise, x0 - _mean(*src), rtol=0, atol=1e-12)
        torch.testing.assert_close(out, x0 + strength * (_mean(*tgt) - _mean(*src)), rtol=0, atol=1e-12)
    curved, _ = edit(model, x0, sigmas, src, src, 0.0, param=PARAM)
    assert (curved - x0).abs().max() > 1e-3


def test_core_errors_name_the_input():
    src, tgt = _cond(2), _cond(3)
    with pytest.raises(InvalidParameterError, match=r"stream 0: \(2, 3, 5\) vs \(2, 4, 5\)"):
        direction(src, (torch.zeros(2, 4, 5, dtype=torch.float64), tgt[1]))
    with pytest.raises(InvalidParameterError, match="2 streams, target 1"):
        direction(src, tgt[0])
    with pytest.raises(InvalidParameterError, match="strength=nan"):
        manipulate(src, direction(src, tgt), float("nan"))
    with pytest.raises(InvalidParameterError, match="window=1.5"):
        edit_conds(src, direction(src, tgt), 1.0, 4, window=1.5)
    with pytest.raises(InvalidParameterError, match="rectified-flow"):
        edit(model, _x0(), _sigmas(), src, tgt, 1.0, param=VP())


@pytest.mark.parametrize("arch", ["UNet2DConditionModel", "UNetModel (BaseModel)", "PixArtTransformer2DModel"])
def test_eim_refuses_models_without_a_joint_space(arch):
    with pytest.raises(NimbleDiffError, match=rf"MM-DiT .* got a {arch.split(' ')[0]}"):
        check_joint_model(arch)
    for ok in ("sd3", "flux", "SD3"):
        check_joint_model(ok)


# -------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    components = factories.tiny_sd3_components(0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0)   # given sigmas are then used as given
    ours = DiTEditPipeline(**components)
    stock = StableDiffusion3Pipeline(**components)
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ours, stock, image


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_pipeline_agrees_with_stock_sd3_sampling_our_inversion(sd3, strength):
    """strength 0: the stock pipeline under the source prompt from our inverted noise (the reconstruction);
    strength 1: under the target prompt (inversion + prompt swap)."""
    ours, stock, image = sd3
    src, tgt = ["a red circle", "a blue square"], ["a green circle", "a blue star"]
    kw = dict(num_inference_steps=5, max_sequence_length=8)
    inv = ours.invert(image, src, **kw)
    out = ours(image, prompt=tgt, source_prompt=src, strength=strength, output_type="latent", **kw).images
    ref = stock(prompt=src if strength == 0 else tgt, latents=inv.latents, sigmas=inv.sigmas[:-1],
                guidance_scale=1.0, output_type="latent", **kw).images
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_pipeline_round_trip_and_bad_input(sd3, tmp_path):
    ours, _, image = sd3
    inv = ours.invert(image, "a red circle", num_inference_steps=8, fixed_point=3, max_sequence_length=8,
                      report_psnr=True)
    assert inv.reconstruction_psnr > 30 and len(inv.trajectory) == 9
    with pytest.raises(InvalidParameterError, match=r"256x256 but this transformer supports up to 128x128"):
        ours(torch.rand(1, 3, 256, 256), prompt="a", source_prompt="b")
    with pytest.raises(InvalidParameterError, match="pass prompt="):
        ours(image, source_prompt="b")


def test_pipeline_refuses_a_unet_folder(tmp_path):
    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    factories.save_tiny_sd15(tmp_path / "sd15")
    with pytest.raises(NimbleDiffError, match=r"MM-DiT .* got a UNet \(StableDiffusionPipeline"):
        DiTEditPipeline.from_pretrained(tmp_path / "sd15")


def test_custom_pipeline_shim_names_the_class():
    from nimblediff.pipelines import custom_pipeline_path

    text = Path(custom_pipeline_path("dit_edit")).read_text()
    assert text.startswith("from nimblediff.pipelines.dit_edit import DiTEditPipeline")


@pytest.mark.slow
def test_custom_pipeline_shim_loads_the_tiny_dit(tmp_path):
    """diffusers' custom_pipeline path in a fresh interpreter gives our class on the shipped SD3 folder."""
    import os
    import subprocess
    import textwrap

    import nimblediff

    code = textwrap.dedent(f"""
        from diffusers import DiffusionPipeline
        import nimblediff.pipelines as nd
        from nimblediff.pipelines.dit_edit import DiTEditPipeline
        pipe = DiffusionPipeline.from_pretrained({nimblediff.TINY_DIT!r}, custom_pipeline=nd.custom_pipeline_path(
            "dit_edit"), trust_remote_code=True, text_encoder_3=None, tokenizer_3=None)
        assert isinstance(pipe, DiTEditPipeline), type(pipe)
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------- nodes
class OpenAISignatureMMDITWrapper(torch.nn.Module):     # named as ComfyUI's SD3 diffusion_model
    pass


class NimbleMMDiT(OpenAISignatureMMDITWrapper):          # the DiT loader's subclass (nodes/dit_loaders.py)
    pass


class UNetModel(torch.nn.Module):
    pass


class FakeBase(torch.nn.Module):
    """BaseModel's surface the nodes use: apply_model(x, sigma, c_crossattn, y) -> x0, encode_adm, latent in/out."""

    def __init__(self, net):
        super().__init__()
        self.diffusion_model = net
        with torch.inference_mode():              # as ComfyUI's loaders create weights
            self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.shift = torch.nn.Linear(1, 1, dtype=torch.float64)
            self.shift.weight.zero_()
            self.shift.bias.zero_()

    def apply_model(self, x, t, c_crossattn=None, y=None, **_):
        shift = self.shift(c_crossattn.double()[..., :1]).mean()          # 0, but on autograd's path via the tokens
        return (gaussian_x0(x.double(), t, c_crossattn.double(), y.double()) * self.gain + shift).to(x.dtype)

    def encode_adm(self, pooled_output=None, **_):
        return pooled_output

    def process_latent_in(self, x):
        return x

    def process_latent_out(self, x):
        return x


@pytest.fixture
def comfy():
    fake_comfy.install()
    yield
    fake_comfy.uninstall()


def _model(net=OpenAISignatureMMDITWrapper):
    base = FakeBase(net())
    patcher = fake_comfy.FakeModelPatcher(base, model_sampling=fake_comfy.CONST())
    patcher.get_model_object = lambda name: patcher.model_sampling
    return patcher


def _conditioning(c):
    return [[c[0], {"pooled_output": c[1]}]]


def test_semantic_edit_node_matches_core_reference(comfy):
    from nimblediff.nodes.dit_edit import DiTSemanticEdit

    src, tgt, neg, x0, sigmas = _cond(2), _cond(3), _cond(9), _x0(), _sigmas(10)
    node = DiTSemanticEdit()
    args = (_model(), _conditioning(src), _conditioning(tgt), _conditioning(neg), {"samples": x0}, sigmas)
    (zero,) = node.edit(*args, 0.0, 1.0, 1.0, 2)
    torch.testing.assert_close(zero["samples"].double(), _reference(x0, sigmas, src, src, 2), rtol=0, atol=1e-5)
    (one,) = node.edit(*args, 1.0, 1.0, 1.0, 0)
    torch.testing.assert_close(one["samples"].double(), _reference(x0, sigmas, src, tgt), rtol=0, atol=1e-5)
    # cfg 3: inversion unguided, regeneration guided against the negative
    (guided,) = node.edit(*args, 1.0, 3.0, 1.0, 0)
    trajectory = run(invert, lambda x, s: model(x, s, src), x0, sigmas, param=PARAM)

    def cfg3(x, s):
        u = model(x, s, neg)
        return u + 3.0 * (model(x, s, tgt) - u)

    ref = run(sample_euler, cfg3, trajectory[-1], sigmas, param=PARAM)
    torch.testing.assert_close(guided["samples"].double(), ref, rtol=0, atol=1e-5)


def test_semantic_edit_node_refuses_a_unet_and_mismatched_prompts(comfy):
    from nimblediff.nodes.dit_edit import DiTSemanticEdit, architecture

    assert architecture(_model(NimbleMMDiT)) == "sd3"

    src, tgt, x0 = _cond(2), _cond(3), _x0()
    with pytest.raises(NimbleDiffError, match=r"got a UNetModel \(FakeBase\)"):
        DiTSemanticEdit().edit(_model(UNetModel), _conditioning(src), _conditioning(tgt), _conditioning(src),
                               {"samples": x0}, _sigmas(), 1.0, 1.0, 1.0, 0)
    longer = (torch.zeros(2, 5, D, dtype=torch.float64), tgt[1])
    with pytest.raises(InvalidParameterError, match="same sequence length"):
        DiTSemanticEdit().edit(_model(), _conditioning(src), _conditioning(longer), _conditioning(src),
                               {"samples": x0}, _sigmas(), 1.0, 1.0, 1.0, 0)
    with pytest.raises(InvalidParameterError, match="2 conditioning entries"):
        DiTSemanticEdit().edit(_model(), _conditioning(src) * 2, _conditioning(tgt), _conditioning(src),
                               {"samples": x0}, _sigmas(), 1.0, 1.0, 1.0, 0)


def _active(entries, sigma):
    """ComfyUI's rule (comfy/samplers.py get_area_and_mult): an entry is skipped when sigma > timestep_start or
    sigma < timestep_end."""
    return [i for i, (_, d) in enumerate(entries)
            if not (sigma > d.get("timestep_start", float("inf")) or sigma < d.get("timestep_end", -float("inf")))]


def test_pti_node_tunes_per_step_conditioning_that_reconstructs_under_guidance(comfy):
    from nimblediff.nodes.dit_edit import PromptTuningInversion

    src, x0, sigmas = _cond(2), _x0(), _sigmas(6)
    neg = (_cond(9)[0], src[1])          # same pooled vector: guidance is then exactly compensable by the tokens
    cfg = 4.0
    with torch.inference_mode():                 # ComfyUI runs every node inside it (its CONDITIONING too)
        inputs = [_conditioning(tuple(t.clone() for t in c)) for c in (src, neg)]
        noise, tuned, recon = PromptTuningInversion().tune(_model(), *inputs, {"samples": x0}, sigmas, cfg, 60, 0.1,
                                                           2)
        tgt = _conditioning(_cond(3))
        _, _, edited = PromptTuningInversion().tune(_model(), *inputs, {"samples": x0}, sigmas, cfg, 60, 0.1, 2,
                                                    target=tgt, alpha=0.3)
    assert len(tuned) == 6
    for i, s in enumerate(sigmas[:-1].tolist()):
        assert _active(tuned, s) == [i]                      # exactly its own step's entry
    trajectory = run(invert, lambda x, s: model(x, s, src), x0, sigmas, param=PARAM, fixed_point=2)
    torch.testing.assert_close(noise["samples"].double(), trajectory[-1], rtol=0, atol=1e-5)

    def guided(x, s, c):
        u = model(x, s, neg)
        return u + cfg * (model(x, s, c) - u)

    assert all(not torch.equal(d["pooled_output"].double(), src[1]) for _, d in tuned)   # tuned together
    plain = run_per_step(guided, trajectory[-1], sigmas, [src] * 6, param=PARAM)
    pti = run_per_step(guided, trajectory[-1], sigmas, [(c.double(), d["pooled_output"].double()) for c, d in tuned],
                       param=PARAM)
    assert latent_psnr(pti, x0) > latent_psnr(plain, x0) + 10, (latent_psnr(pti, x0), latent_psnr(plain, x0))
    # 'edited': that sampling done in the node; without a target the reconstruction, with one the interpolation
    torch.testing.assert_close(recon["samples"].double(), pti, rtol=0, atol=1e-5)
    mixed = [(0.3 * c.double() + 0.7 * _cond(3)[0], 0.3 * d["pooled_output"].double() + 0.7 * _cond(3)[1])
             for c, d in tuned]
    torch.testing.assert_close(edited["samples"].double(), run_per_step(guided, trajectory[-1], sigmas, mixed,
                                                                        param=PARAM), rtol=0, atol=1e-5)
    with pytest.raises(InvalidParameterError, match=r"target is \(2, 4, 5\) \(pooled: False\)"):
        PromptTuningInversion().tune(_model(), *inputs, {"samples": x0}, sigmas, cfg, 1, 0.1, 0,
                                     target=[[torch.zeros(2, 4, D), {}]])
    with pytest.raises(InvalidParameterError, match="alpha=2"):
        PromptTuningInversion().tune(_model(), *inputs, {"samples": x0}, sigmas, cfg, 1, 0.1, 0, target=tgt,
                                     alpha=2)


def test_interpolate_conditioning_node(comfy):
    from nimblediff.nodes.dit_edit import InterpolateConditioning

    (a, p), (b, q) = _cond(2), _cond(3)
    tuned = [[a + i, {"pooled_output": p, "timestep_start": 1.0 - i / 4, "timestep_end": 0.75 - i / 4}]
             for i in range(3)]
    (mixed,) = InterpolateConditioning().interpolate(tuned, _conditioning((b, q)), 0.25)
    for i, (c, d) in enumerate(mixed):
        torch.testing.assert_close(c, 0.25 * (a + i) + 0.75 * b, rtol=0, atol=1e-12)
        torch.testing.assert_close(d.pop("pooled_output"), 0.25 * p + 0.75 * q, rtol=0, atol=1e-12)
        assert d == {k: v for k, v in tuned[i][1].items() if k != "pooled_output"} and d is not tuned[i][1]
    (tokens_only,) = InterpolateConditioning().interpolate(tuned, [[b, {}]], 0.25)   # target without a pooled
    assert all(d["pooled_output"] is p for _, d in tokens_only)
    (one,) = InterpolateConditioning().interpolate(tuned, _conditioning((b, q)), 1.0)
    assert all(torch.equal(c, t[0]) for (c, _), t in zip(one, tuned))
    with pytest.raises(InvalidParameterError, match=r"tuned entry 0 is \(2, 3, 5\) but target is \(2, 4, 5\)"):
        InterpolateConditioning().interpolate(tuned, [[torch.zeros(2, 4, 5), {}]], 0.5)
    with pytest.raises(InvalidParameterError, match="alpha=1.5"):
        InterpolateConditioning().interpolate(tuned, _conditioning((b, q)), 1.5)


def test_nodes_are_registered_with_schemas():
    import nimblediff.nodes as nodes

    for node_id in ("NimbleDiTSemanticEdit", "NimblePromptTuningInversion", "NimbleInterpolateConditioning"):
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        assert "required" in cls.INPUT_TYPES() and cls.DESCRIPTION
        assert node_id in nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert types.SimpleNamespace  # keep the import used
