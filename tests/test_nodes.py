"""ComfyUI nodes called with ComfyUI-shaped inputs (stub comfy modules; the real server is test_comfyui_real.py)."""

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import fake_comfy  # noqa: E402
import lora_files  # noqa: E402
from analytic import GaussianData  # noqa: E402

from nimblediff.core import schedules  # noqa: E402
from nimblediff.core.parameterization import VP  # noqa: E402
from nimblediff.core.sampling import SAMPLERS, noise_from_seed, run  # noqa: E402


@pytest.fixture
def comfy(tmp_path):
    fake_comfy.install(input_dir=tmp_path)       # schedule files are read by name inside ComfyUI's input folder
    yield
    fake_comfy.uninstall()


def _vp_model_sampling():
    return fake_comfy.EPS(VP().sigmas.float())


def test_sampler_node_runs_core_sampler_with_comfy_seed(comfy):
    from nimblediff.nodes.sampling import FewStepSampler

    ms = _vp_model_sampling()
    data = GaussianData()
    model = fake_comfy.GuidedModel(data.denoiser(VP()), ms)
    sigmas = schedules.make_sigmas("lcm", 4, VP()).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ksampler = FewStepSampler().build("lcm", 0.3)[0]
    out = ksampler.sampler_function(model, x, sigmas, extra_args={"seed": 7}, callback=None, disable=True)
    ref = run(SAMPLERS["lcm"], data.denoiser(VP()), x, sigmas, param=VP(), noise=noise_from_seed(x, 7))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_tcd_node_finite_for_every_gamma(comfy, gamma):
    """Other ComfyUI TCD ports produce NaN for gamma > 0; ours stays finite."""
    from nimblediff.nodes.sampling import FewStepSampler

    ms = _vp_model_sampling()
    model = fake_comfy.GuidedModel(GaussianData().denoiser(VP()), ms)
    sigmas = schedules.make_sigmas("lcm", 4, VP()).float()
    x = torch.randn(1, 4, 8, 8) * sigmas[0]
    out = FewStepSampler().build("tcd", gamma)[0].sampler_function(model, x, sigmas, extra_args={"seed": 1})
    assert torch.isfinite(out).all()


def test_schedule_node_matches_diffusers_lcm_timesteps(comfy):
    from diffusers import LCMScheduler

    from nimblediff.nodes.sampling import FewStepSchedule

    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    sigmas = FewStepSchedule().build(model, "lcm", 4, 1.0)[0]
    lcm = LCMScheduler()
    lcm.set_timesteps(4)
    acp = lcm.alphas_cumprod[lcm.timesteps]
    expected = torch.cat([((1 - acp) / acp).sqrt(), torch.zeros(1)])
    torch.testing.assert_close(sigmas, expected.float(), rtol=1e-5, atol=1e-6)
    half = FewStepSchedule().build(model, "lcm", 2, 0.5)[0]
    torch.testing.assert_close(half, FewStepSchedule().build(model, "lcm", 4, 1.0)[0][-3:])


def _comfy_model_and_clip(pipe):
    """A ComfyUI-like MODEL/CLIP over the pipeline's weights, keyed as ComfyUI keys them (LDM names)."""
    ldm = factories.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config, prefix="diffusion_model.")
    te = {f"clip_l.transformer.text_model.{k.removeprefix('text_model.')}": v
          for k, v in pipe.text_encoder.state_dict().items()}
    unet_config = {"model_channels": pipe.unet.config.block_out_channels[0], "channel_mult": [1, 2, 2, 2],
                   "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                   "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1}
    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(state_dict=lambda: ldm), _vp_model_sampling(),
                                        unet_config)
    clip = fake_comfy.FakeCLIP(types.SimpleNamespace(state_dict=lambda: te))
    return model, clip, ldm, te


def test_lora_loader_node_matches_diffusers_fuse(comfy, tmp_path):
    """Patched weights ComfyUI would compute from our patches == diffusers load_lora_weights + fuse_lora."""
    import copy

    from nimblediff.nodes.adapters import LoRALoader

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    path = lora_files.write_peft_lora(pipe, tmp_path)
    fake_comfy.install({"style.safetensors": path})
    model, clip, ldm, te = _comfy_model_and_clip(pipe)
    new_model, new_clip, report = LoRALoader().load(model, clip, "style.safetensors", 0.8, 0.5)
    assert model.patches == {} and clip.patcher.patches == {}          # the input MODEL/CLIP are untouched

    ref_unet, ref_te = lora_files.diffusers_fused(copy.deepcopy(pipe), path, scale=0.8)
    ref_ldm = factories.unet_to_ldm(ref_unet, pipe.unet.config, prefix="diffusion_model.")
    ours = new_model.patched_state_dict()
    changed = [k for k in ldm if not torch.equal(ldm[k], ref_ldm[k])]
    assert len(changed) > 20
    for k in ldm:
        torch.testing.assert_close(ours[k], ref_ldm[k], rtol=0, atol=1e-6)
    # text encoder at strength 0.5: reference at 0.5 from the same file
    _, ref_te = lora_files.diffusers_fused(copy.deepcopy(pipe), path, scale=0.5)
    ours_te = new_clip.patcher.patched_state_dict()
    for k, v in ref_te.items():
        torch.testing.assert_close(ours_te[f"clip_l.transformer.text_model.{k}"], v, rtol=0, atol=1e-6)
    assert "unet" in report


def test_acceleration_lora_node_outputs_recipe(comfy, tmp_path):
    from nimblediff.nodes.adapters import AccelerationLoRA

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    fake_comfy.install({"flash.safetensors": lora_files.write_peft_lora(pipe, tmp_path)})
    model, clip, _, _ = _comfy_model_and_clip(pipe)
    m, c, sampler, sigmas, cfg, info = AccelerationLoRA().load(model, clip, "flash.safetensors", "flash-sd15",
                                                               1.0, 1.0, 4)
    assert cfg == 1.0 and len(sigmas) == 5 and "flash-sd15" in info
    assert m.patches and sampler.sampler_function is not None


def test_lora_loader_rejects_unrelated_file(comfy, tmp_path):
    from safetensors.torch import save_file

    from nimblediff.errors import NimbleDiffError
    from nimblediff.nodes.adapters import LoRALoader

    save_file({"foo.bar": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    fake_comfy.install({"junk.safetensors": str(tmp_path / "junk.safetensors")})
    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    model, clip, _, _ = _comfy_model_and_clip(pipe)
    with pytest.raises(NimbleDiffError, match="foo.bar"):
        LoRALoader().load(model, clip, "junk.safetensors", 1.0, 1.0)
    assert model.patches == {}


def test_every_node_declares_a_complete_schema():
    import nimblediff

    for node_id, cls in nimblediff.NODE_CLASS_MAPPINGS.items():
        assert node_id in nimblediff.NODE_DISPLAY_NAME_MAPPINGS
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY.startswith("NimbleDiff")


def test_lora_for_another_base_names_both_architectures(comfy, tmp_path):
    from nimblediff.errors import AdapterMismatchError
    from nimblediff.nodes.adapters import LoRALoader

    sdxl = factories.tiny_sdxl_pipeline(0)
    lora = factories.random_lora({"unet": sdxl.unet}, rank=2)
    from safetensors.torch import save_file

    save_file(factories.lora_state_dict(lora, "kohya", unet_config=sdxl.unet.config),
              str(tmp_path / "xl.safetensors"))
    fake_comfy.install({"xl.safetensors": str(tmp_path / "xl.safetensors")})
    model, clip, _, _ = _comfy_model_and_clip(factories.tiny_sd15_pipeline(0, layout="sd15"))
    with pytest.raises(AdapterMismatchError, match="sdxl.*sd15|sd15.*sdxl"):
        LoRALoader().load(model, clip, "xl.safetensors", 1.0, 1.0)
    assert model.patches == {}


def test_loha_file_patches_comfy_model_like_hand_math(comfy, tmp_path):
    """A LyCORIS LoHa layer becomes one dense ComfyUI diff: W + s * (w1a w1b) * (w2a w2b) * alpha / rank."""
    from safetensors.torch import save_file

    from nimblediff.nodes.adapters import LoRALoader

    pipe = factories.tiny_sd15_pipeline(0, layout="sd15")
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    w = pipe.unet.get_submodule(module).weight
    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(shape, generator=g) for n, shape in
         (("hada_w1_a", (w.shape[0], 2)), ("hada_w1_b", (2, w.shape[1])),
          ("hada_w2_a", (w.shape[0], 2)), ("hada_w2_b", (2, w.shape[1])))}
    prefix = "lora_unet_" + module.replace(".", "_")
    save_file({**{f"{prefix}.{n}": v for n, v in t.items()}, f"{prefix}.alpha": torch.tensor(1.0)},
              str(tmp_path / "loha.safetensors"))
    fake_comfy.install({"loha.safetensors": str(tmp_path / "loha.safetensors")})
    model, clip, ldm, _ = _comfy_model_and_clip(pipe)
    new_model, _, _ = LoRALoader().load(model, clip, "loha.safetensors", 0.7, 1.0)
    expected = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (1.0 / 2)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(new_model.patched_state_dict()[key], ldm[key] + 0.7 * expected, rtol=1e-6, atol=1e-6)


def test_sampler_options_string_reaches_the_sampler(comfy):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSampler, parse_sampler_options

    assert parse_sampler_options("deis", "order=3") == {"order": 3}
    with pytest.raises(InvalidParameterError, match="deis takes"):
        parse_sampler_options("deis", "beta=0.5")
    ms = _vp_model_sampling()
    data = GaussianData()
    sigmas = schedules.make_sigmas("trailing", 6, VP()).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    model = fake_comfy.GuidedModel(data.denoiser(VP()), ms)
    out = FewStepSampler().build("deis", 0.3, "order=3")[0].sampler_function(model, x, sigmas, extra_args={})
    ref = run(SAMPLERS["deis"], data.denoiser(VP()), x, sigmas, param=VP(), order=3)
    torch.testing.assert_close(out, ref)


def test_schedule_file_node_checks_model_type(comfy, tmp_path):
    from nimblediff.core.schedule_search import save_schedule
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import ScheduleFile

    save_schedule(tmp_path / "s.json", {"model_type": "flow", "sampler": "euler", "nfe": 2,
                                        "sigmas": [1.0, 0.5, 0.0], "created_by": "test"})
    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    with pytest.raises(InvalidParameterError, match="flow"):
        ScheduleFile().load(model, "s.json")


def test_schedule_file_node_gives_the_fitted_sampler(comfy, tmp_path):
    """A fitted solver's file yields its sigmas and a SAMPLER carrying its coefficients: the graph's result equals
    run() with the file's options."""
    from nimblediff.core.gmm import GaussianMixture
    from nimblediff.core.schedule_search import fit_solver, save_schedule
    from nimblediff.nodes.sampling import ScheduleFile, param_from_model_sampling

    ms = _vp_model_sampling()
    param = param_from_model_sampling(ms)
    den = GaussianMixture.random(dim=16).denoiser(param)
    cal = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * param.sigma_max
    fit = fit_solver(den, param, 3, x=cal, iterations=5, prior_shift=True)
    save_schedule(tmp_path / "fit.json", fit)
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), ms)
    sigmas, sampler = ScheduleFile().load(patcher, "fit.json")
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    model = fake_comfy.GuidedModel(lambda x, s, **_: den(x.reshape(len(x), -1), s).reshape(x.shape), ms)
    out = sampler.sampler_function(model, x, sigmas, extra_args={})
    ref = run(SAMPLERS["fitted"], lambda x, s: den(x.reshape(len(x), -1), s).reshape(x.shape), x, sigmas,
              param=param, **fit["options"])
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, run(SAMPLERS["fitted"], lambda x, s: den(x.reshape(len(x), -1), s).reshape(
        x.shape), x, sigmas, param=param))            # the options did reach the sampler


def test_schedule_node_reads_a_schedule_embedded_in_the_workflow(comfy, tmp_path):
    from nimblediff.core.schedule_search import save_schedule
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import ScheduleFile

    save_schedule(tmp_path / "s.json", {"model_type": "vp", "sampler": "dpmpp_2m", "nfe": 2, "options": {"beta": 0.8},
                                        "sigmas": [14.6, 1.5, 0.0], "created_by": "test"})
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    sigmas, sampler = ScheduleFile().load(patcher, "not/there.json", (tmp_path / "s.json").read_text())
    assert sigmas.tolist() == pytest.approx([14.6, 1.5, 0.0])
    with pytest.raises(InvalidParameterError, match="not JSON"):
        ScheduleFile().load(patcher, "not/there.json", "{sigmas: [1, 0]")
    with pytest.raises(InvalidParameterError, match="not/there.json"):
        ScheduleFile().load(patcher, "not/there.json", "  ")


# ------------------------------------------------------------------ sampler options are checked when the node runs
@pytest.mark.parametrize("sampler, options, named", [
    ("dpmpp_2m", "beta=nan", "beta"),                 # NaN passes `0 < beta <= 1`-style widget checks elsewhere
    ("dpmpp_2m", "beta=1.5", "beta"),
    ("ghvb", "beta=inf", "beta"),
    ("deis", "order=5", "order"),
    ("deis", "order=2.5", "order"),
    ("deis", "lower_order_final=maybe", "lower_order_final"),
    ("plms", "momentum=nesterov", "momentum"),
    ("scott", "eta=-1", "eta"),
    ("scott", "substeps=-2", "substeps"),
    ("pc", "snr=nan", "snr"),
    ("fkc", "ess_threshold=2", "ess_threshold"),
    ("fkc", "guidance=nan", "guidance"),
    ("fkc", "mode=sum", "mode"),
    ("fitted", "coeffs=0.5", "coeffs"),               # was split into the characters '0', '.', '5'
    ("fitted", "coeffs=[[], [0.5]], gains=[0.1, 0.2, 0.3]", "gains"),
])
def test_sampler_node_refuses_bad_options_naming_them(comfy, sampler, options, named):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSampler

    with pytest.raises(InvalidParameterError, match=named):
        FewStepSampler().build(sampler, 0.3, options)


@pytest.mark.parametrize("gamma", [float("nan"), 1.5, -0.1])
def test_tcd_gamma_out_of_range_fails_at_the_node(comfy, gamma):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSampler

    with pytest.raises(InvalidParameterError, match="gamma"):
        FewStepSampler().build("tcd", gamma)


def test_every_sampler_builds_with_its_default_options(comfy):
    """The checks refuse nothing the samplers accept: every sampler's defaults (fitted needs coefficients)."""
    from nimblediff.core.sampling import SAMPLER_OPTIONS
    from nimblediff.nodes.sampling import FewStepSampler, make_sampler

    for name in SAMPLERS:
        if name != "fitted":
            FewStepSampler().build(name, 0.3)
            make_sampler(name, **SAMPLER_OPTIONS[name])
    FewStepSampler().build("fitted", 0.3, "coeffs=[[]]")          # a 1-step fit has no past predictions to mix


def test_fitted_sampler_without_coefficients_names_the_schedule_file_node(comfy, tmp_path):
    """Without coeffs the fitted sampler is plain DDIM: refused, with where the coefficients come from."""
    from nimblediff.core.schedule_search import save_schedule
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSampler, ScheduleFile

    with pytest.raises(InvalidParameterError, match="coeffs.*Schedule from File"):
        FewStepSampler().build("fitted", 0.3)
    save_schedule(tmp_path / "s.json", {"model_type": "vp", "sampler": "fitted", "nfe": 2,
                                        "sigmas": [14.6, 1.5, 0.0], "created_by": "test"})
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    with pytest.raises(InvalidParameterError, match="coeffs"):
        ScheduleFile().load(patcher, "s.json")


def test_fitted_coefficients_in_the_options_string_reach_the_sampler(comfy):
    """JSON lists in the options string (commas inside brackets) equal the same options given to run()."""
    from nimblediff.nodes.sampling import FewStepSampler, parse_sampler_options

    text = "coeffs=[[], [-0.3], [-0.5, 0.1]], gains=[0.25, 0.5], prior_shift=true, shifts=[-0.4, 0, 0.2]"
    coeffs, gains, shifts = [[], [-0.3], [-0.5, 0.1]], [0.25, 0.5], [-0.4, 0, 0.2]
    assert parse_sampler_options("fitted", text) == {"coeffs": coeffs, "gains": gains, "prior_shift": True,
                                                     "shifts": shifts}
    ms = _vp_model_sampling()
    data = GaussianData()
    sigmas = schedules.make_sigmas("trailing", 3, VP()).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    model = fake_comfy.GuidedModel(data.denoiser(VP()), ms)
    out = FewStepSampler().build("fitted", 0.3, text)[0].sampler_function(model, x, sigmas, extra_args={})
    ref = run(SAMPLERS["fitted"], data.denoiser(VP()), x, sigmas, param=VP(), coeffs=coeffs, gains=gains,
              prior_shift=True, shifts=shifts)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, run(SAMPLERS["fitted"], data.denoiser(VP()), x, sigmas, param=VP()))


def test_gamma_given_to_another_sampler_is_logged_and_tooltip_says_tcd_only(comfy, caplog):
    from nimblediff.nodes.sampling import FewStepSampler

    spec = FewStepSampler.INPUT_TYPES()["required"]["gamma"][1]
    assert "tcd only" in spec["tooltip"]
    with caplog.at_level("WARNING", logger="nimblediff"):
        FewStepSampler().build("lcm", spec["default"])
    assert not caplog.records
    with caplog.at_level("WARNING", logger="nimblediff"):
        FewStepSampler().build("lcm", 0.7)
    assert any("gamma=0.7" in r.getMessage() and "tcd" in r.getMessage() for r in caplog.records)


def test_schedule_denoise_widget_minimum_is_a_valid_denoise(comfy):
    """The widget's lowest value must run: denoise = 0 keeps no step at all. The LCM grid has only 50 timesteps, so
    a low denoise there is an error naming denoise."""
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSchedule

    spec = FewStepSchedule.INPUT_TYPES()["required"]["denoise"][1]
    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    sigmas = FewStepSchedule().build(model, "trailing", 4, spec["min"])[0]
    full = schedules.make_sigmas("trailing", int(4 / spec["min"]), VP())
    torch.testing.assert_close(sigmas, full[-5:].float())
    assert sigmas[-1] == 0 and sigmas[0] < 0.5                   # the last, low-noise steps
    with pytest.raises(InvalidParameterError, match="denoise=0.05 with steps=4.*80-step lcm"):
        FewStepSchedule().build(model, "lcm", 4, 0.05)


def test_sampling_nodes_have_a_tooltip_on_every_input():
    from nimblediff.nodes import sampling

    for node_id, (cls, _) in sampling.NODES.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in spec.get(section, {}).items():
                assert len(value) > 1 and value[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


@pytest.mark.parametrize("ratio, size, expected", [(4, 64, 16), (8, 512, 64), (2, 48, 24)])
def test_empty_latent_node_follows_the_vae_ratio(comfy, ratio, size, expected):
    """EmptyLatentImage always divides by 8; ours by the VAE's ratio, so the decoded image has the asked size."""
    from nimblediff.nodes.loaders import NimbleEmptyLatent

    vae = types.SimpleNamespace(downscale_ratio=ratio, latent_channels=4,
                                spacial_compression_encode=lambda: ratio)
    latent = NimbleEmptyLatent().generate(vae, size, size, 3)[0]["samples"]
    assert latent.shape == (3, 4, expected, expected) and not latent.any()


def test_empty_latent_node_names_a_size_the_vae_cannot_make(comfy):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.loaders import NimbleEmptyLatent

    vae = types.SimpleNamespace(downscale_ratio=8, latent_channels=4)
    with pytest.raises(InvalidParameterError, match="height=100.*96 or 104"):
        NimbleEmptyLatent().generate(vae, 64, 100, 1)


# ---------------------------------------------------------------- typed option widgets (the options text is legacy)
@pytest.mark.parametrize("sampler, typed, text", [
    ("deis", {"order": 3, "lower_order_final": False}, "order=3, lower_order_final=false"),
    ("ghvb", {"order": 2, "beta": 0.5}, "order=2, beta=0.5"),
    ("plms", {"momentum": "ghvb", "beta": 0.7}, "momentum=ghvb, beta=0.7"),
    ("scott", {"eta": 0.5, "substeps": 1}, "eta=0.5, substeps=1"),
    ("pc", {"snr": 0.05, "corrector_steps": 2}, "snr=0.05, corrector_steps=2"),
    ("dpmpp_2m", {"beta": 0.9}, "beta=0.9"),
])
def test_typed_option_widgets_equal_the_same_options_given_to_run(comfy, sampler, typed, text):
    """Each typed widget reaches the sampler as the option of the same name (reference: run() with the options)."""
    from nimblediff.nodes.sampling import FewStepSampler, parse_sampler_options

    ms = _vp_model_sampling()
    data = GaussianData()
    sigmas = schedules.make_sigmas("trailing", 5, VP()).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    model = fake_comfy.GuidedModel(data.denoiser(VP()), ms)
    extra = {"seed": 3} if sampler in ("scott", "pc") else {}
    out = FewStepSampler().build(sampler, 0.3, "", **typed)[0].sampler_function(model, x, sigmas, extra_args=extra)
    noise = noise_from_seed(x, 3) if extra else None
    ref = run(SAMPLERS[sampler], data.denoiser(VP()), x, sigmas, param=VP(), **({"noise": noise} if noise else {}),
              **typed)
    torch.testing.assert_close(out, ref)
    assert parse_sampler_options(sampler, text) == typed                 # the legacy text says the same
    legacy = FewStepSampler().build(sampler, 0.3, text)[0].sampler_function(model, x, sigmas, extra_args=extra)
    torch.testing.assert_close(legacy, ref)


def test_typed_widgets_default_to_each_samplers_own_defaults(comfy):
    """order / beta at 0 mean the chosen sampler's default (deis order 2, ghvb beta 0.8); every other widget's default
    is the default of the one sampler that reads it."""
    from nimblediff.core.sampling import SAMPLER_OPTIONS
    from nimblediff.nodes.sampling import AUTO_OPTIONS, TYPED_OPTIONS, FewStepSampler

    names = {n for opts in SAMPLER_OPTIONS.values() for n in opts} - {"gamma", "coeffs", "gains", "prior_shift",
                                                                            "shifts"}
    assert set(TYPED_OPTIONS) == names
    for name, (_, spec) in TYPED_OPTIONS.items():
        owners = [s for s, opts in SAMPLER_OPTIONS.items() if name in opts]
        if name in AUTO_OPTIONS:
            assert spec["default"] == 0 and len({SAMPLER_OPTIONS[s][name] for s in owners}) > 1
        else:
            assert {SAMPLER_OPTIONS[s][name] for s in owners} == {spec["default"]}, name
    ms = _vp_model_sampling()
    sigmas = schedules.make_sigmas("trailing", 4, VP()).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    data = GaussianData()
    model = fake_comfy.GuidedModel(data.denoiser(VP()), ms)
    defaults = {name: spec["default"] for name, (_, spec) in TYPED_OPTIONS.items()}
    for sampler in ("deis", "ghvb", "plms"):
        out = FewStepSampler().build(sampler, 0.3, "", **defaults)[0].sampler_function(model, x, sigmas,
                                                                                       extra_args={})
        torch.testing.assert_close(out, run(SAMPLERS[sampler], data.denoiser(VP()), x, sigmas, param=VP()))


def test_typed_widget_and_options_text_must_agree(comfy, caplog):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import FewStepSampler

    FewStepSampler().build("deis", 0.3, "order=3", order=3)                 # the same value twice is fine
    FewStepSampler().build("deis", 0.3, "order=3", order=0)                 # an untouched widget defers to the text
    with pytest.raises(InvalidParameterError, match="order is given twice"):
        FewStepSampler().build("deis", 0.3, "order=3", order=1)
    with pytest.raises(InvalidParameterError, match="order"):
        FewStepSampler().build("deis", 0.3, "", order=4)                      # deis takes 1-3: the sampler says so
    with caplog.at_level("WARNING", logger="nimblediff"):
        FewStepSampler().build("lcm", 0.3, "", eta=0.2)
    assert "lcm ignores eta=0.2 (read by scott)" in caplog.text


def test_saved_workflow_widget_values_still_map_to_the_same_inputs():
    """UI workflows store widget values by position: the first three stay sampler_name, gamma, options, and the
    typed options come after them, so a workflow saved before they existed loads unchanged."""
    from nimblediff.nodes.sampling import TYPED_OPTIONS, FewStepSampler

    spec = FewStepSampler.INPUT_TYPES()
    assert [*spec["required"], *spec["optional"]] == ["sampler_name", "gamma", "options", *TYPED_OPTIONS]


@pytest.mark.parametrize("name", ["../s.json", "/etc/passwd", "..\\s.json", "C:\\s.json", "a/../../s.json", ""])
def test_schedule_file_path_stays_inside_comfyuis_folders(comfy, tmp_path, name):
    """A workflow's `path` is a name inside ComfyUI's input / output folder: traversal and absolute paths are refused
    even when the file they name exists (it does: s.json beside the input folder)."""
    from nimblediff.core.schedule_search import save_schedule
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import ScheduleFile

    inner = tmp_path / "input"
    inner.mkdir()
    fake_comfy.install(input_dir=inner)
    save_schedule(tmp_path / "s.json", {"model_type": "vp", "sampler": "euler", "nfe": 2,
                                        "sigmas": [14.6, 1.5, 0.0], "created_by": "test"})
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    with pytest.raises(InvalidParameterError, match="path="):
        ScheduleFile().load(patcher, name.replace("/etc/passwd", str(tmp_path / "s.json")))


def test_schedule_file_reads_the_shipped_schedules_by_name(comfy):
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes.sampling import ScheduleFile, embedded_schedules

    assert "nimblediff-tiny-fit4 (embedded)" in embedded_schedules()
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), _vp_model_sampling())
    sigmas, _ = ScheduleFile().load(patcher, "nimblediff-tiny-fit4 (embedded)")
    assert sigmas[-1] == 0 and len(sigmas) >= 2
    with pytest.raises(InvalidParameterError, match="no such shipped schedule"):
        ScheduleFile().load(patcher, "../nimblediff-tiny-fit4 (embedded)")
