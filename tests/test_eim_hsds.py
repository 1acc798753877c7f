"""EIM's HSDS direction refinement (core/editing/hsds.py) against hand-derived optima, and its two surfaces.

- core: on a model whose prediction is (c1 + c2, k c2^2) the HSDS objective, with the edit term matched exactly,
  reduces to f(u) = 1/2 (u - t2^2)^2 + 2 mu u^2 in u = delta2^2, so delta2* = t2 / sqrt(1 + 4 mu) and
  delta1* = t1 + t2 - delta2* (worked by hand); on a model affine in c (test_eim.py's Gaussian flow) the Hessian
  term is zero and the plain difference is already optimal; steps 0 returns the direction itself;
- pipeline: a tiny random SD3 with hsds_steps > 0 at strength 0 still gives the reconstruction, and equals the core
  edit with the core-refined direction;
- node: the optional inputs default to off (old workflows), and hsds_steps > 0 runs under inference_mode.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from nimblediff.core.editing.eim import direction, edit
from nimblediff.core.editing.hsds import objective, refine_direction
from nimblediff.core.parameterization import VP, Flow
from nimblediff.errors import InvalidParameterError

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402
import factories  # noqa: E402
import test_eim as eim_cases  # noqa: E402  (its analytic Gaussian flow denoiser and ComfyUI stubs)

torch.set_num_threads(1)
PARAM = Flow()
K = 2.0                                    # weight of the collateral (even) output


def quadratic(x, sigma, c, **_):
    """x0-prediction 0.5 x + (c1 + c2, K c2^2) per image: c1 and c2 both drive the edit output, only c2 also
    drives a second output, and that one is even in c2 (the kind of change HSDS's Hessian term sees)."""
    f = torch.stack([c[..., 0] + c[..., 1], K * c[..., 1] ** 2], -1)              # (B, 2)
    return 0.5 * x + f.reshape(-1, 2, 1, 1)


@pytest.mark.parametrize("mu", [0.25, 1.0, 4.0])
def test_refined_direction_reaches_the_hand_derived_optimum(mu):
    t1, t2 = 0.3, 0.8
    x0 = torch.randn(1, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    source = torch.zeros(1, 2, dtype=torch.float64)
    delta0 = torch.tensor([[t1, t2]], dtype=torch.float64)
    d = refine_direction(quadratic, x0, source, delta0, param=PARAM, steps=300, lr=0.05, curvature=mu,
                         generator=torch.Generator().manual_seed(1))
    d2 = t2 / math.sqrt(1 + 4 * mu)
    torch.testing.assert_close(d, torch.tensor([[t1 + t2 - d2, d2]], dtype=torch.float64), rtol=0, atol=3e-3)
    # and the objective went down from the plain difference (which pays 2 mu K^2 t2^4 / 2 for its curvature)
    xs = [(0.5, x0)]
    targets, sources = [quadratic(x0, 0.5, delta0)], [quadratic(x0, 0.5, source)]
    assert objective(quadratic, xs, source, d, targets, sources, mu) < \
        objective(quadratic, xs, source, delta0, targets, sources, mu)


def test_affine_model_keeps_the_plain_difference_and_steps_zero_is_identity():
    src, tgt, x0 = eim_cases._cond(2), eim_cases._cond(3), eim_cases._x0()
    delta = direction(src, tgt)
    assert refine_direction(eim_cases.model, x0, src, delta, param=PARAM, steps=0) is delta
    d = refine_direction(eim_cases.model, x0, src, delta, param=PARAM, steps=5, lr=0.05, curvature=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert isinstance(d, tuple) and len(d) == 2
    for a, b in zip(d, delta):              # zero gradient at delta_0: Adam does not move (up to rounding)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_strength_zero_with_a_refined_direction_is_still_the_reconstruction():
    src, tgt, x0, sigmas = eim_cases._cond(2), eim_cases._cond(3), eim_cases._x0(), eim_cases._sigmas(8)
    delta = refine_direction(quadratic_tokens, x0, src, direction(src, tgt), param=PARAM, steps=4,
                             generator=torch.Generator().manual_seed(0))
    plain, _ = edit(quadratic_tokens, x0, sigmas, src, tgt, 0.0, param=PARAM)
    refined, _ = edit(quadratic_tokens, x0, sigmas, src, tgt, 0.0, param=PARAM, delta=delta)
    torch.testing.assert_close(refined, plain, rtol=0, atol=0)
    moved, _ = edit(quadratic_tokens, x0, sigmas, src, tgt, 1.0, param=PARAM, delta=delta)
    swap, _ = edit(quadratic_tokens, x0, sigmas, src, tgt, 1.0, param=PARAM)
    assert not torch.allclose(moved, swap)     # the refinement does change the edit on a curved model


def quadratic_tokens(x, sigma, c, **_):
    """test_eim's Gaussian flow denoiser plus a term even in the tokens, so HSDS has something to remove."""
    tokens, pooled = c
    return eim_cases.gaussian_x0(x, sigma, tokens, pooled) + 0.3 * (tokens ** 2).mean((1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=-1), r"hsds steps=-1: need an integer >= 0"),
    (dict(steps=2.5), r"hsds steps=2.5"),
    (dict(lr=0.0), r"hsds lr=0.0: need a finite number > 0"),
    (dict(lr=float("nan")), r"hsds lr=nan"),
    (dict(curvature=-1.0), r"hsds curvature=-1.0: need a finite number >= 0"),
    (dict(levels=[0.0, 0.5]), r"hsds levels=\[0.0, 0.5\]: need one or more flow noise levels in \(0, 1\]"),
    (dict(levels=[]), r"hsds levels=\[\]"),
    (dict(param=VP()), r"rectified flow .* kind 'vp'"),
])
def test_bad_parameters_name_the_input(kw, match):
    src, tgt, x0 = eim_cases._cond(2), eim_cases._cond(3), eim_cases._x0()
    args = {"param": PARAM, **kw}
    with pytest.raises(InvalidParameterError, match=match):
        refine_direction(eim_cases.model, x0, src, direction(src, tgt), **args)
    with pytest.raises(InvalidParameterError, match="delta has 1 streams, source 2"):
        refine_direction(eim_cases.model, x0, src, (direction(src, tgt)[0],), param=PARAM)


# -------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_hsds_option():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nimblediff.pipelines.dit_edit import DiTEditPipeline

    components = factories.tiny_sd3_components(0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = DiTEditPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a blue star", source_prompt="a red circle", num_inference_steps=3, max_sequence_length=8,
              output_type="latent")
    hs = dict(hsds_steps=2, hsds_lr=0.05, hsds_levels=(0.5,))
    zero = pipe(image, strength=0.0, **kw, **hs, generator=torch.Generator().manual_seed(0)).images
    plain_zero = pipe(image, strength=0.0, **kw).images
    torch.testing.assert_close(zero, plain_zero, rtol=0, atol=0)
    # strength 1: the core edit along the core-refined direction (the pipeline adds no math of its own)
    out = pipe(image, strength=1.0, **kw, **hs, generator=torch.Generator().manual_seed(0)).images
    param = pipe.editing_param()
    x0 = pipe.encode_image(image)
    src, _ = pipe.embeds("a red circle", 1, max_sequence_length=8)
    tgt, _ = pipe.embeds("a blue star", 1, max_sequence_length=8)
    model = pipe.denoiser(param)
    delta = refine_direction(model, x0, src, direction(src, tgt), (0.5,), param=param, steps=2, lr=0.05,
                             generator=torch.Generator().manual_seed(0))
    ref, _ = edit(model, x0, pipe._sigmas(param, 3, 1.0), src, tgt, 1.0, param=param, delta=delta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="hsds lr=-1"):
        pipe(image, strength=1.0, hsds_steps=1, hsds_lr=-1, **kw)


# ----------------------------------------------------------------------------------------------------- nodes
@pytest.fixture
def comfy():
    fake_comfy.install()
    yield
    fake_comfy.uninstall()


def test_node_hsds_inputs_are_optional_and_run_under_inference_mode(comfy):
    from nimblediff.nodes.dit_edit import DiTSemanticEdit

    spec = DiTSemanticEdit.INPUT_TYPES()
    assert list(spec["optional"]) == ["hsds_steps", "hsds_lr", "hsds_curvature", "hsds_seed"]
    assert spec["optional"]["hsds_steps"][1]["default"] == 0          # off: old workflows edit as before
    src, tgt, x0, sigmas = eim_cases._cond(2), eim_cases._cond(3), eim_cases._x0(), eim_cases._sigmas(6)
    with torch.inference_mode():                 # as ComfyUI runs nodes
        args = (eim_cases._model(), eim_cases._conditioning(src), eim_cases._conditioning(tgt),
                eim_cases._conditioning(src), {"samples": x0}, sigmas, 1.0, 1.0, 1.0, 0)
        (plain,) = DiTSemanticEdit().edit(*args)
        (refined,) = DiTSemanticEdit().edit(*args, hsds_steps=3, hsds_curvature=1.0, hsds_seed=5)
    # the test model is affine in c: HSDS keeps delta_0, so the edit is the plain one
    torch.testing.assert_close(refined["samples"], plain["samples"], rtol=0, atol=1e-5)
    with pytest.raises(InvalidParameterError, match="hsds curvature=-2"):
        DiTSemanticEdit().edit(*args, hsds_steps=1, hsds_curvature=-2.0)
