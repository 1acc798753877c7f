"""Diffusers surface of the LoRA operations (pipelines/adapters.py) against diffusers + PEFT on a tiny SD1.5 layout."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import lora_files  # noqa: E402

from nimblediff.core.adapters.delta import Diff  # noqa: E402
from nimblediff.core.adapters.rank import weight_shape  # noqa: E402
from nimblediff.errors import InvalidParameterError, NimbleDiffError  # noqa: E402
from nimblediff.pipelines import adapters as A  # noqa: E402
from nimblediff.weights.lora_formats import Target, read_lora  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return factories.tiny_sd15_pipeline(0, layout="sd15")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return lora_files.two_loras(pipe, folder)


@pytest.fixture(scope="module")
def added(pipe, files):
    """What diffusers' load_lora_weights + fuse_lora(1.0) adds to every UNet / text-encoder weight, per file."""
    out, unet0, te0 = {}, pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    for name, path in files.items():
        unet, te = lora_files.diffusers_fused(copy.deepcopy(pipe), path, scale=1.0)
        out[name] = ({k: v - unet0[k] for k, v in unet.items()}, {k: v - te0[k] for k, v in te.items()})
    return out


def test_stack_with_block_weights_matches_diffusers_and_unfuses(pipe, files, added):
    p = copy.deepcopy(pipe)
    handle = A.stack_loras(p, [files["a"], files["b"]], [0.8, -0.6], text_encoder_weights=[0.5, 1.0],
                           blocks=[None, {"output": 0.0, "input": 2.0}])
    (ua, ta), (ub, tb) = added["a"], added["b"]
    ours, ours_te = p.unet.state_dict(), p.text_encoder.state_dict()
    for k, w in pipe.unet.state_dict().items():
        factor = 0.0 if k.startswith(("up_blocks.", "conv_out", "conv_norm_out")) else \
            2.0 if k.startswith(("down_blocks.", "conv_in")) else 1.0         # by hand from the diffusers names
        torch.testing.assert_close(ours[k], w + 0.8 * ua[k] - 0.6 * factor * ub[k], rtol=0, atol=2e-6, msg=k)
    for k, w in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(ours_te[k], w + 0.5 * ta[k] + tb[k], rtol=0, atol=2e-6)
    handle.unfuse()
    for k, w in pipe.unet.state_dict().items():
        torch.testing.assert_close(ours[k], w, rtol=0, atol=1e-6)


def test_stack_validates_everything_before_the_first_change(pipe, files, tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(junk))
    p = copy.deepcopy(pipe)
    before = {k: v.clone() for k, v in p.unet.state_dict().items()}
    with pytest.raises(NimbleDiffError, match="foo.bar"):
        A.stack_loras(p, [files["a"], str(junk)])
    with pytest.raises(InvalidParameterError, match="weights has 1 entries for 2 LoRAs"):
        A.stack_loras(p, [files["a"], files["b"]], [1.0])
    assert all(torch.equal(v, before[k]) for k, v in p.unet.state_dict().items())


def test_to_peft_keeps_set_adapters_working_and_from_peft_round_trips(pipe, files):
    p, ref = copy.deepcopy(pipe), copy.deepcopy(pipe)
    deltas, _ = read_lora(files["b"], Target.from_modules(A.pipeline_modules(p)))
    assert A.to_peft(p, deltas, "style") == list(deltas)
    back = A.from_peft(p, "style")
    for k, d in deltas.items():
        torch.testing.assert_close(back[k].delta_weight(weight_shape(d)), d.delta_weight(weight_shape(d)),
                                   rtol=0, atol=1e-7)
    p.set_adapters(["style"], [0.7])                                  # diffusers' own API on our adapter
    A.stack_loras(ref, [deltas], [0.7])
    gen = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 77, 8, generator=gen), torch.tensor([500])
    with torch.no_grad():
        y_peft = p.unet(x, t, encoder_hidden_states=ctx).sample
        y_ours = ref.unet(x, t, encoder_hidden_states=ctx).sample
        assert not torch.allclose(y_ours, pipe.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-4)
    torch.testing.assert_close(y_peft, y_ours, rtol=0, atol=1e-5)
    bad = {next(iter(deltas)): Diff(torch.zeros(weight_shape(next(iter(deltas.values())))))}
    with pytest.raises(InvalidParameterError, match="not a plain LoRA"):
        A.to_peft(p, bad, "bad")


def test_extract_from_pipelines_recovers_the_fused_lora(pipe, files, added):
    tuned = copy.deepcopy(pipe)
    A.stack_loras(tuned, [files["a"]])
    deltas, report = A.extract_from_pipelines(pipe, tuned, rank=4)
    ua, _ = added["a"]
    changed = {f"unet.{k[:-7]}" for k, v in ua.items() if k.endswith(".weight") and v.abs().max() > 0}
    assert set(deltas) == changed and set(report.ranks.values()) == {4}
    for k, d in deltas.items():
        want = ua[f"{k[5:]}.weight"]
        torch.testing.assert_close(d.delta_weight(want.shape), want, rtol=0, atol=2e-5, msg=k)


def test_mixin_stack_and_unload():
    from diffusers import StableDiffusionPipeline

    class Pipe(StableDiffusionPipeline, A.LoRAOpsMixin):
        pass

    p = Pipe(**factories.tiny_sd15_components(0, layout="sd15"))
    base = {k: v.clone() for k, v in p.unet.state_dict().items()}
    lora = factories.random_lora({"unet": p.unet}, rank=2)
    from nimblediff.core.adapters.delta import LoRA

    p.stack_loras([{k: LoRA(*v) for k, v in lora.items()}], [1.0])
    assert any(not torch.equal(v, base[k]) for k, v in p.unet.state_dict().items())
    p.unload_loras()
    assert all(torch.allclose(v, base[k], atol=1e-6) for k, v in p.unet.state_dict().items())


def test_failed_stack_leaves_outputs_unchanged(pipe, files):
    """A valid first LoRA and a second whose text-encoder part has a NaN alpha: nothing of either is applied, so the
    UNet's and the text encoder's outputs are those computed before the call."""
    from nimblediff.core.adapters.delta import LoRA

    p = copy.deepcopy(pipe)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 77, 8, generator=gen)
    ids = torch.tensor([[0, 7, 1]])

    def outputs():
        with torch.no_grad():
            return p.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample, p.text_encoder(ids)[0]

    before = outputs()
    good = {k: LoRA(*v) for k, v in factories.random_lora(A.pipeline_modules(p), rank=2, seed=3).items()}
    te_key = next(k for k in good if k.startswith("text_encoder."))
    bad = {**good, te_key: LoRA(good[te_key].down, good[te_key].up, alpha=float("nan"))}
    with pytest.raises(NimbleDiffError, match=rf"{te_key}.*alpha=nan"):
        A.stack_loras(p, [files["a"], bad])
    after = outputs()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    A.stack_loras(p, [files["a"], good]).unfuse()  # the same stack without the NaN loads (the guard of the test)
