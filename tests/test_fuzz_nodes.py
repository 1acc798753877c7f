"""Fuzz the ComfyUI nodes' inputs (with the stub comfy modules of tests/fake_comfy.py): file names from workflow JSON
(model folders, LoRA names, output file names), absurd sizes, and the free-text inputs (sampler options, block
weights, embedded schedules).

Invariants: only NimbleDiff's own error types escape; a file name never reaches a path outside the models / output
folder it names (checked against a real file placed outside, which must never be returned, read or written); an
absurd size is refused before memory is allocated. Profiles and counts: tests/test_fuzz_support.py.
"""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")  # the [test] extra; `make report-newest` installs pytest alone
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fake_comfy  # noqa: E402
import test_fuzz_support as fz  # noqa: E402

from nimblediff.core.limits import MAX_LATENT_ELEMENTS  # noqa: E402
from nimblediff.errors import InvalidParameterError, NimbleDiffError  # noqa: E402
from nimblediff.weights.lora_ops import output_path  # noqa: E402
from nimblediff.weights.paths import inside  # noqa: E402

# names a workflow could carry: traversal in both spellings, absolute and drive paths, NUL bytes, plain names
ESCAPES = ["..", "../outside", "../outside/model", "a/../../outside", "..\\outside", "/etc/passwd", "C:\\x",
           "C:x", "\\\\server\\share\\x", "//server/x", "~/x", "a/./../..", "\x00", "ok\x00/../x", "", " ", ".", "./",
           "model", "sub/model", "sub\\model", "model/", "./model", "a" * 300]
names = st.sampled_from(ESCAPES) | st.text(st.sampled_from("./\\~:ab_-\x00 "), max_size=16) | st.text(max_size=12) \
    | st.builds(lambda a, b: a + b, st.sampled_from(ESCAPES), st.sampled_from(ESCAPES))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    fz.report(__name__)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """models/diffusers and models/loras inside a base folder, and a folder outside them that looks like a model."""
    base = tmp_path_factory.mktemp("comfy")
    diffusers, loras, outside = base / "models" / "diffusers", base / "models" / "loras", base / "models" / "outside"
    for folder in (diffusers / "model" / "unet", diffusers / "sub" / "model" / "unet", loras, outside / "unet"):
        folder.mkdir(parents=True)
    for folder in (diffusers / "model", diffusers / "sub" / "model", outside):
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "config.json").write_text("{}")
    (outside / "secret.safetensors").write_bytes(b"do not touch")
    return types.SimpleNamespace(base=base, diffusers=diffusers, loras=loras, outside=outside)


@pytest.fixture(scope="module")
def comfy(roots):
    fake_comfy.install()
    folder_paths = sys.modules["folder_paths"]
    folder_paths.get_folder_paths = lambda kind: {"diffusers": [str(roots.diffusers)],
                                                  "loras": [str(roots.loras)]}.get(kind, [])
    yield folder_paths
    fake_comfy.uninstall()


def _within(path, folder) -> bool:
    """Lexically and after resolving symlinks, path is folder or below it."""
    path, folder = Path(path), Path(folder)
    return os.path.commonpath([os.path.normpath(path), os.path.normpath(folder)]) == os.path.normpath(folder) and \
        os.path.commonpath([path.resolve(), folder.resolve()]) == str(folder.resolve())


def test_file_names_stay_inside(roots):
    @given(name=names)
    def prop(name):
        path, err = fz.only_ours(inside, roots.loras, name, "lora_name")
        if err is None:
            assert _within(path, roots.loras), f"{name!r} -> {path}"
        fz.count("node input: file name (weights.paths.inside)")

    prop()


def test_output_file_names(roots):
    """The file nodes' `filename` input: a path inside models/loras or an error; nothing is created."""
    before = fz.tree(roots.base)

    @given(name=names, overwrite=st.booleans())
    def prop(name, overwrite):
        path, err = fz.only_ours(output_path, roots.loras, name, overwrite=overwrite,
                                 inputs=[roots.outside / "secret.safetensors"])
        if err is None:
            assert _within(path, roots.loras), f"{name!r} -> {path}"
        fz.count("node input: output filename (lora_ops.output_path)")

    prop()
    assert fz.tree(roots.base) == before


def test_model_folder_names(comfy, roots):
    """NimbleDiffusersCheckpointLoader's `model`: a folder under models/diffusers, never the one outside it."""
    from nimblediff.nodes.loaders import EMBEDDED_CHOICE, list_models, resolve_model

    assert "model" in list_models() and "sub/model" in list_models()

    @given(name=names | st.sampled_from([EMBEDDED_CHOICE, "model", "sub/model"]))
    def prop(name):
        path, err = fz.only_ours(resolve_model, name)
        if err is None and name != EMBEDDED_CHOICE:
            assert _within(path, roots.diffusers), f"{name!r} -> {path}"
        fz.count("node input: model folder name (loaders.resolve_model)")

    prop()


class _VAE:
    latent_channels = 4
    downscale_ratio = 8


sizes = st.integers(-2, 20) | st.sampled_from([8, 64, 512, 16384, 16385, 10**6, 2**31, 2**63]) | \
    st.sampled_from([None, 1.5, "64", True, float("nan")])


def test_empty_latent_sizes(comfy):
    """Sizes come from workflow JSON (the schema's min/max are the client's business): absurd ones are refused
    before torch allocates anything."""
    from nimblediff.nodes.loaders import NimbleEmptyLatent

    @given(width=sizes, height=sizes, batch=sizes)
    def prop(width, height, batch):
        out, err = fz.only_ours(NimbleEmptyLatent().generate, _VAE(), width, height, batch)
        if err is None:
            latent = out[0]
            assert latent["samples"].shape == (batch, 4, height // 8, width // 8)
            assert latent["samples"].numel() <= MAX_LATENT_ELEMENTS
        fz.count("node: NimbleEmptyLatent sizes")

    prop()
    with pytest.raises(InvalidParameterError, match="GiB"):      # the schema's own maxima together: 17 TB of zeros
        NimbleEmptyLatent().generate(_VAE(), 16384, 16384, 4096)


option_text = st.text(st.sampled_from("abcdefghmnoprstuvwxyz_=,.[]()0123456789-e \"'"), max_size=40) | \
    st.sampled_from(["order=3", "beta=0.8", "coeffs=[[], [0.5]]", "gains=[0.1]", "eta=nan", "s_noise=inf",
                     "order=99999999", "order=-1", "gamma=2", "coeffs=[[[]]]", "coeffs={}", "x=1", "=", ",,", "[", "]"])


def test_sampler_options(comfy):
    from nimblediff.core.sampling import SAMPLERS
    from nimblediff.nodes.sampling import FewStepSampler

    @given(name=st.sampled_from(sorted(SAMPLERS)), gamma=st.floats(allow_nan=True) | st.sampled_from([0.3, 0.0, 1.0]),
           options=option_text)
    def prop(name, gamma, options):
        fz.only_ours(FewStepSampler().build, name, gamma, options)
        fz.count("node: FewStepSampler options")

    prop()


widget_values = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**63, 2**63) | st.booleans() \
    | st.sampled_from(["hb", "ghvb", "anneal", "cfg", "product", "", "x", None, [], {}])


def test_sampler_typed_options(comfy):
    """The typed option widgets: ComfyUI checks min / max, but an API prompt carries any JSON (NaN, huge integers,
    strings where numbers go); each value reaches the sampler's own checks or is refused by ours."""
    from nimblediff.core.sampling import SAMPLERS
    from nimblediff.nodes.sampling import TYPED_OPTIONS, FewStepSampler

    @given(name=st.sampled_from(sorted(SAMPLERS)), typed=st.dictionaries(st.sampled_from(sorted(TYPED_OPTIONS)),
                                                                          widget_values, max_size=4),
           options=st.sampled_from(["", "order=3", "beta=0.8", "coeffs=[[], [0.5]]", "eta=2"]))
    def prop(name, typed, options):
        fz.only_ours(FewStepSampler().build, name, 0.3, options, **typed)
        fz.count("node: FewStepSampler typed option widgets")

    prop()


def _write_schedule(path, sigma):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_type": "vp", "sampler": "euler", "nfe": 2, "sigmas": [14.6, sigma, 0.0],
                                "created_by": "test"}))


def test_schedule_file_paths(comfy, roots):
    """ScheduleFile's `path` from a workflow: a schedule inside ComfyUI's input / output folder, a shipped one, or a
    NimbleDiffError; the schedule placed outside them (sigma 2.0) is never read, whatever the spelling."""
    from nimblediff.nodes.sampling import ScheduleFile

    comfy.get_input_directory = lambda: str(roots.base / "input")
    comfy.get_output_directory = lambda: str(roots.base / "output")
    _write_schedule(roots.base / "input" / "model", 1.0)                 # `names` spells these
    _write_schedule(roots.base / "output" / "sub" / "model", 1.0)
    _write_schedule(roots.outside / "outside", 2.0)
    _write_schedule(roots.base / "outside", 2.0)                          # ../outside from input/ and output/
    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), fake_comfy.EPS(torch.linspace(0.03, 14.6, 1000)))

    @given(name=names | st.sampled_from(["model", "sub/model", "../outside", str(roots.base / "outside"),
                                         "nimblediff-tiny-fit4 (embedded)", "../x (embedded)", " (embedded)"]))
    def prop(name):
        out, err = fz.only_ours(ScheduleFile().load, patcher, name)
        if err is None:
            assert float(out[0][1]) != 2.0, f"{name!r} read the schedule outside the input / output folders"
        fz.count("node input: ScheduleFile path")

    prop()
    assert float(ScheduleFile().load(patcher, "model")[0][1]) == 1.0


def test_skip_layers_config_paths(comfy, roots, monkeypatch):
    """SkipLayers' `config_path`: the config it opens is inside ComfyUI's input / output folder, or the node raises
    a NimbleDiffError first."""
    from nimblediff.errors import InvalidParameterError
    from nimblediff.nodes import caching

    comfy.get_input_directory = lambda: str(roots.base / "input")
    comfy.get_output_directory = lambda: str(roots.base / "output")
    (roots.base / "input").mkdir(exist_ok=True)
    (roots.base / "input" / "model").write_text("{}")
    (roots.base / "outside").write_text("{}")
    opened = []

    def spy(path, unet):
        opened.append(path)
        assert _within(path, roots.base / "input") or _within(path, roots.base / "output"), path
        raise InvalidParameterError("spy: not a real config")

    monkeypatch.setattr(caching.laptop, "load_config", spy)
    monkeypatch.setattr(caching, "detect_layout", lambda unet: None)
    model = fake_comfy.FakeModelPatcher(types.SimpleNamespace(diffusion_model=torch.nn.Identity()))

    @given(name=names | st.sampled_from(["model", "../outside", str(roots.base / "outside")]))
    def prop(name):
        fz.only_ours(caching.SkipLayersModel().patch, model, name)
        fz.count("node input: SkipLayers config_path")

    prop()
    assert opened, "no case reached the config reader: the property checked nothing"


def test_block_weight_specs():
    from nimblediff.nodes.adapter_ops import parse_block_spec

    @given(spec=st.text(max_size=40) | option_text)
    def prop(spec):
        out, err = fz.only_ours(parse_block_spec, spec)
        if err is None:
            assert all(isinstance(v, float) and v == v for v in out.values())
        fz.count("node: LoRABlockWeights blocks spec")

    prop()


schedules = st.fixed_dictionaries({}, optional={
    "model_type": st.sampled_from(["vp", "flow", "x", 3]),
    "sampler": st.sampled_from(["euler", "fitted", "lcm", "nope", None]),
    "sigmas": st.lists(st.floats(allow_nan=True) | st.integers(-5, 20), max_size=6) | st.sampled_from(
        [[14.6, 1.0, 0.0], [], "x", None]),
    "options": st.dictionaries(st.sampled_from(["coeffs", "gains", "beta", "x"]),
                               st.lists(st.lists(st.floats(-2, 2), max_size=3), max_size=4) | st.floats()),
    "nfe": st.integers(-1, 5),
})


def test_embedded_schedules(comfy):
    import json

    from nimblediff.nodes.sampling import ScheduleFile

    patcher = fake_comfy.FakeModelPatcher(types.SimpleNamespace(), fake_comfy.EPS(torch.linspace(0.03, 14.6, 1000)))

    @given(text=schedules.map(json.dumps) | st.text(max_size=30))
    def prop(text):
        fz.only_ours(ScheduleFile().load, patcher, "not/there.json", text if text.strip() else "{}")
        fz.count("node: ScheduleFile embedded schedule_json")

    prop()


def test_lora_names(comfy, roots):
    """lora_name from a workflow (every LoRA node reads it through nodes/adapters.lora_path): a file in models/loras
    or a NimbleDiffError, never the file outside, even with a folder_paths that joins names naively."""
    from nimblediff.nodes.adapters import lora_path

    (roots.loras / "style.safetensors").write_bytes(b"x")

    def naive(kind, name):               # what an old ComfyUI did: join, check, no normalisation
        path = os.path.join(comfy.get_folder_paths(kind)[0], name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
        return path

    comfy.get_full_path_or_raise = naive

    @given(name=names | st.sampled_from(["style.safetensors", "../outside/secret.safetensors",
                                         "sub/../../outside/secret.safetensors"]))
    def prop(name):
        path, err = fz.only_ours(lora_path, name)
        if err is None:
            assert _within(path, roots.loras), f"{name!r} -> {path}"
        fz.count("node input: lora_name (adapters.lora_path)")

    prop()
    assert lora_path("style.safetensors") == str(roots.loras / "style.safetensors")
