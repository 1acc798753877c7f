"""Fuzz the weight loaders: corrupted and truncated safetensors files, pickle checkpoints, random keys, dtypes and
shapes, fed to every reader and to the fusing loaders (weights/safetensors_io, weights/lora_formats read_lora /
apply_lora, core/adapters/apply fuse, pipelines/loading check_pipeline_folder).

Invariants (the reference is the contract itself, not recorded output):
- only NimbleDiff's own error types (errors.py) escape;
- a load that raises leaves every parameter and buffer of the model byte-identical;
- the input file is never modified.

Profiles and case counts: tests/test_fuzz_support.py.
"""

import json
import pickle
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis")  # the [test] extra; `make report-newest` installs pytest alone
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import test_fuzz_support as fz  # noqa: E402

from nimblediff.core.adapters.apply import fuse  # noqa: E402
from nimblediff.core.adapters.delta import Diff, LoHa, LoKr, LoRA, Sparse  # noqa: E402
from nimblediff.errors import NimbleDiffError  # noqa: E402
from nimblediff.pipelines.loading import check_pipeline_folder  # noqa: E402
from nimblediff.weights.lora_formats import apply_lora, read_lora  # noqa: E402
from nimblediff.weights.safetensors_io import load_with_metadata, read_header  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8, torch.bool]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "XX", "",
             7, None]
ROLES = ["lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
         "lora.down.weight", "lora.up.weight", "lora_magnitude_vector", "dora_scale", "diff", "diff_b", "hada_w1_a",
         "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b",
         "lokr_w2_a", "lokr_w2_b", "lokr_t2", "sparse_indices", "sparse_values", "factor_u", "factor_v",
         "factor_add", "wd_for_diff", "weight", "bias"]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    fz.report(__name__)


@pytest.fixture(scope="module")
def model():
    mods = {"unet": factories.tiny_sd15_unet(0), "text_encoder": factories.tiny_clip_text_encoder(8, seed=2)}
    for m in mods.values():
        m.requires_grad_(False)
    return mods, fz.state_bytes(mods), {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in mods.items()}


@pytest.fixture(scope="module")
def base_lora(model):
    """A valid LoRA for the model, per layout: {layout: state dict}; the seeds the mutations start from."""
    mods = model[0]
    lora = factories.random_lora(mods, rank=2, seed=1, scale=0.3)
    return {layout: factories.lora_state_dict(lora, layout) for layout in ("peft", "kohya", "lora_dot")}


def _restore(model):
    mods, _, saved = model
    for c, m in mods.items():
        m.load_state_dict(saved[c])


def _check_load(model, fn, *args, **kwargs):
    """fn(*args) may succeed or raise a NimbleDiffError; on a raise the model must be byte-identical."""
    mods, before, _ = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, err = fz.only_ours(fn, *args, **kwargs)
    if err is not None:
        assert fz.state_bytes(mods) == before, f"a failed load changed the model: {err}"
    else:
        _restore(model)
    return result, err


# ----------------------------------------------------------------------------------------------- file bytes
def _safetensors_bytes(sd: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=4), max_leaves=12)


@st.composite
def corrupted(draw, base_lora):
    """Bytes of a safetensors LoRA, damaged one of several ways."""
    layout = draw(st.sampled_from(sorted(base_lora)))
    data = _safetensors_bytes(base_lora[layout], {"format": "pt"})
    how = draw(st.sampled_from(["truncate", "flip", "header_entry", "header_json", "header_len", "random", "meta"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        return bytes(out)
    header, body = _split(data)
    if how == "header_entry":
        key = draw(st.sampled_from([k for k in header if k != "__metadata__"]))
        entry = dict(header[key])
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra"]))
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(ST_DTYPES))
        elif field == "shape":
            entry["shape"] = draw(st.lists(st.integers(-3, 2**40), max_size=5) | json_values)
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-10, 2**62), min_size=0, max_size=3) | json_values)
        elif field == "drop":
            entry.pop(draw(st.sampled_from(sorted(entry))))
        else:
            entry[draw(st.text(max_size=5))] = draw(json_values)
        header[key] = entry
        return _join(header, body)
    if how == "header_json":
        raw = bytearray(json.dumps(header).encode())
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.sampled_from(list(b"{}[]\",:0\x00\xff")))
        return _join(bytes(raw), body)
    if how == "header_len":
        n = draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, len(data), len(data) - 8]) | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", n) + data[8:]
    if how == "meta":
        header["__metadata__"] = draw(json_values)
        return _join(header, body)
    return draw(st.binary(max_size=256))


def test_corrupted_safetensors_files(model, base_lora, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt")

    @given(data=corrupted(base_lora), suffix=st.sampled_from([".safetensors", ".SAFETENSORS", ".lora", ""]))
    def prop(data, suffix):
        path = folder / f"lora{suffix}"
        path.write_bytes(data)
        before = fz.digest(path)
        fz.only_ours(read_header, path)
        fz.only_ours(load_with_metadata, path)
        fz.only_ours(read_lora, path)
        _check_load(model, apply_lora, model[0], path)
        assert fz.digest(path) == before, "a loader modified its input file"
        fz.count("loader: corrupted safetensors file (4 readers)")

    prop()


# ------------------------------------------------------------------------------------------------- pickles
class _Evil:
    """Unpickling this runs code: weights_only=True must refuse it."""

    def __reduce__(self):
        return (Path.touch, (Path(_EVIL_MARK),))


_EVIL_MARK = ""


@st.composite
def pickles(draw):
    kind = draw(st.sampled_from(["tensors", "nested", "evil", "not_dict", "garbage", "truncated", "mixed"]))
    t = torch.randn(2, 2)
    if kind == "tensors":
        obj = {"a.lora_down.weight": t, "a.lora_up.weight": t}
    elif kind == "nested":
        obj = {"state_dict": {"x": t}, "epoch": 3}
    elif kind == "evil":
        obj = {"a": _Evil()}
    elif kind == "not_dict":
        obj = draw(st.sampled_from([[t], t, 3, "text", None]))
    elif kind == "mixed":
        obj = {"a": t, "b": draw(st.sampled_from([1, "s", None, [t]]))}
    else:
        return draw(st.binary(max_size=64))
    import io

    buf = io.BytesIO()
    if kind == "evil":
        pickle.dump(obj, buf)
    else:
        torch.save(obj, buf)
    data = buf.getvalue()
    return data[:len(data) // 2] if kind == "truncated" else data


def test_pickle_checkpoints(model, tmp_path_factory):
    """Pickles load only with weights_only=True: an object that would run code on unpickling is refused (and its
    code never runs), and anything but a dict of tensors is a WeightsFormatError."""
    global _EVIL_MARK
    folder = tmp_path_factory.mktemp("pickles")
    mark = folder / "pwned"
    _EVIL_MARK = str(mark)

    @given(data=pickles(), suffix=st.sampled_from([".ckpt", ".pt", ".pth", ".bin"]))
    def prop(data, suffix):
        path = folder / f"model{suffix}"
        path.write_bytes(data)
        before = fz.digest(path)
        sd, err = fz.only_ours(load_with_metadata, path)
        if err is None:
            assert all(isinstance(v, torch.Tensor) for v in sd[0].values())
        fz.only_ours(read_lora, path)
        _check_load(model, apply_lora, model[0], path)
        assert not mark.exists(), "unpickling ran code: the checkpoint was not loaded with weights_only=True"
        assert fz.digest(path) == before
        fz.count("loader: pickle checkpoint (3 readers)")

    prop()


# ------------------------------------------------------------------------------------------- state dicts
def _tensor(draw, like: torch.Tensor | None):
    dtype = draw(st.sampled_from(DTYPES))
    if like is not None and draw(st.booleans()):
        shape = list(like.shape)
        if shape and draw(st.booleans()):
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = draw(st.integers(0, 12))
        elif draw(st.booleans()):
            shape = shape + [1] if draw(st.booleans()) else shape[1:]
    else:
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
    t = torch.randn(shape) * draw(st.sampled_from([0.01, 1.0, 1e4, 1e30]))
    special = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), -float("inf")]))
    if special is not None and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = special
    if dtype.is_floating_point:
        return t.to(dtype)
    if dtype == torch.bool:
        return t > 0
    return t.nan_to_num(0, 0, 0).clamp(-100, 100).to(dtype)


@st.composite
def state_dicts(draw, base_lora):
    """A LoRA state dict with some keys renamed, retyped, reshaped, dropped or added."""
    layout = draw(st.sampled_from(sorted(base_lora)))
    sd = dict(base_lora[layout])
    keys = sorted(sd)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["retype", "reshape", "drop", "role", "random_key", "prefix", "clone_module"]))
        key = draw(st.sampled_from(keys))
        if op in ("retype", "reshape"):
            sd[key] = _tensor(draw, sd.get(key))
        elif op == "drop":
            sd.pop(key, None)
        elif op == "role":
            module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
            sd[f"{module}.{draw(st.sampled_from(ROLES))}"] = _tensor(draw, sd.get(key))
        elif op == "random_key":
            name = draw(st.text(st.sampled_from("abcdefg_.0123456789"), max_size=24))
            sd[name + draw(st.sampled_from(["", ".", "."] + ROLES))] = _tensor(draw, None)
        elif op == "prefix":
            prefix = draw(st.sampled_from(["unet.", "text_encoder.", "transformer.", "lora_unet_", "lora_te_",
                                           "diffusion_model.", "text_encoders.clip_l.transformer.", "", "lycoris_"]))
            sd[prefix + key.split(".", 1)[-1]] = sd.pop(key, _tensor(draw, None))
        else:
            module = key.rsplit(".", 2)[0]
            sd[f"{module}.{draw(st.sampled_from(['lokr_w1', 'hada_w1_a', 'sparse_indices', 'factor_u']))}"] = \
                _tensor(draw, None)
    return sd


def test_random_state_dicts(model, base_lora):
    @given(sd=state_dicts(base_lora), strength=st.sampled_from([1.0, 0.5, -2.0, 0.0, 1e38, float("nan"), 3]))
    def prop(sd, strength):
        fz.only_ours(read_lora, sd)
        _check_load(model, apply_lora, model[0], sd, strength)
        fz.count("loader: random LoRA state dict (read + apply)")

    prop()


def test_random_state_dict_files(model, base_lora, tmp_path_factory):
    """The same through a file: what a user's safetensors holds (dtypes safetensors can store)."""
    folder = tmp_path_factory.mktemp("sd_files")

    @given(sd=state_dicts(base_lora))
    def prop(sd):
        path = folder / "lora.safetensors"
        path.write_bytes(_safetensors_bytes(sd))
        before = fz.digest(path)
        _check_load(model, apply_lora, model[0], path)
        assert fz.digest(path) == before
        fz.count("loader: random LoRA safetensors file (apply)")

    prop()


# ------------------------------------------------------------------------------------------ canonical deltas
@st.composite
def deltas(draw, keys_shapes):
    keys = draw(st.lists(st.sampled_from(sorted(keys_shapes)) | st.text(max_size=12), min_size=1, max_size=4))
    out = {}
    for key in keys:
        shape = keys_shapes.get(key, (4, 4))
        out_f, in_f = shape[0], (shape[1] if len(shape) > 1 else 1)
        dim = lambda base: draw(st.sampled_from([base, base, 1, 0, base + 1, 3]))  # noqa: E731
        r = draw(st.integers(0, 3))
        kind = draw(st.sampled_from(["lora", "diff", "loha", "lokr", "sparse"]))
        mk = lambda *s: _tensor(draw, torch.zeros(s))  # noqa: E731
        alpha = draw(st.sampled_from([None, 1.0, 0.0, float("nan"), float("inf"), "x", torch.ones(2)]))
        if kind == "lora":
            out[key] = LoRA(mk(r, dim(in_f)), mk(dim(out_f), r), alpha)
        elif kind == "diff":
            out[key] = Diff(mk(*[dim(s) for s in shape]), draw(st.sampled_from([None, mk(dim(out_f))])))
        elif kind == "loha":
            out[key] = LoHa(mk(dim(out_f), r), mk(r, dim(in_f)), mk(dim(out_f), r), mk(r, dim(in_f)), alpha)
        elif kind == "lokr":
            out[key] = LoKr(mk(dim(1), dim(1)), mk(dim(out_f), dim(in_f)), alpha)
        else:
            n = draw(st.integers(0, 5))
            idx = torch.tensor(draw(st.lists(st.integers(-3, out_f * in_f + 3), min_size=n, max_size=n)),
                               dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.float32])))
            out[key] = Sparse(idx, mk(draw(st.sampled_from([n, n, n + 1]))))
    return out


def test_random_deltas_fuse(model):
    mods = model[0]
    shapes = {f"{c}.{n}": tuple(m.weight.shape) for c, root in mods.items()
              for n, m in getattr(root, "text_model", root).named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    @given(ds=deltas(shapes), strength=st.sampled_from([1.0, -0.5, 1e38, float("inf"), True, "1", None]))
    def prop(ds, strength):
        _check_load(model, fuse, mods, ds, strength)
        fz.count("loader: canonical deltas (core fuse)")

    prop()


# ------------------------------------------------------------------------------------------ pipeline folders
@st.composite
def folders(draw, root: Path):
    """A path (string) to something that may or may not look like a diffusers folder."""
    kind = draw(st.sampled_from(["text", "dir", "file", "index_dir", "index_bad"]))
    if kind == "text":
        return draw(st.text(max_size=30) | st.sampled_from(["owner/name", "./x", "~/nothing", "a/b/c", "\x00", ".."]))
    sub = root / f"case{draw(st.integers(0, 3))}"
    sub.mkdir(exist_ok=True)
    if kind == "file":
        (sub / "f").write_bytes(draw(st.binary(max_size=8)))
        return str(sub / "f")
    if kind == "index_dir":
        (sub / "model_index.json").mkdir(exist_ok=True) if not (sub / "model_index.json").is_file() else None
    if kind == "index_bad" and not (sub / "model_index.json").is_dir():
        (sub / "model_index.json").write_bytes(draw(st.binary(max_size=16)))
    return str(sub)


def test_pipeline_folder_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")

    @given(path=folders(root), local_only=st.booleans())
    def prop(path, local_only):
        fz.only_ours(check_pipeline_folder, path, local_only=local_only, name="--model")
        fz.count("loader: pipeline folder check")

    prop()


# ------------------------------------------------------------------------- cases the fuzzing found (regressions)
def _found_cases(key, shape):
    out_f, in_f = shape[0], shape[1]
    big = 200_000  # factors of a few MB whose product would be 40e9 elements: refused from the shapes alone
    return {
        # _check_finite: torch's infinity norm of an empty tensor raised RuntimeError
        "empty LoHa factor": LoHa(torch.zeros(out_f, 0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)),
        # the LoRA bound looked up the max of an integer factor that was never computed: KeyError
        "integer LoRA factors": LoRA(torch.ones(2, in_f, dtype=torch.int8), torch.ones(out_f, 2, dtype=torch.int8)),
        "giant LoHa product": LoHa(torch.ones(big, 1), torch.ones(1, big), torch.ones(big, 1), torch.ones(1, big)),
        "giant LoKr product": LoKr(torch.ones(1000, 1000), torch.ones(300, 300)),
    }


@pytest.mark.parametrize("case", ["empty LoHa factor", "integer LoRA factors", "giant LoHa product",
                                  "giant LoKr product"])
def test_cases_found_by_fuzzing(model, case, monkeypatch):
    def no_kron(*args):
        raise AssertionError("the Kronecker product was computed before its size was checked")

    monkeypatch.setattr(torch, "kron", no_kron)
    mods = model[0]
    key = "text_encoder.encoder.layers.0.mlp.fc1"
    weight = mods["text_encoder"].get_submodule("encoder.layers.0.mlp.fc1").weight
    delta = _found_cases(key, tuple(weight.shape))[case]
    _, err = _check_load(model, fuse, mods, {key: delta})
    assert isinstance(err, NimbleDiffError), f"{case}: loaded without an error"


# ------------------------------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    """A small real GGUF file: an SD1.5-layout UNet (tiny widths, LDM keys as ComfyUI-GGUF writes them), Q8_0 where
    the rows allow it."""
    from nimblediff.weights.gguf_io import to_original, write_gguf

    unet = factories.tiny_sd15_layout_unet(0, block_out_channels=(32, 32, 32, 32))
    path = tmp_path_factory.mktemp("gguf") / "unet.gguf"
    write_gguf(path, to_original(unet.state_dict(), "sd15", unet.config), "sd15", "Q8_0")
    return path.read_bytes()


def test_corrupted_gguf_files(gguf_bytes, tmp_path_factory):
    from nimblediff.weights.gguf_io import read_gguf

    folder = tmp_path_factory.mktemp("gguf_corrupt")

    @given(how=st.sampled_from(["truncate", "flip", "random"]), data=st.data())
    def prop(how, data):
        if how == "truncate":
            raw = gguf_bytes[:data.draw(st.integers(0, len(gguf_bytes) - 1))]
        elif how == "flip":
            raw = bytearray(gguf_bytes)
            for _ in range(data.draw(st.integers(1, 8))):
                # the header and tensor table are the fragile part: aim most flips at the first 4 KiB
                i = data.draw(st.integers(0, min(4096, len(raw) - 1)) | st.integers(0, len(raw) - 1))
                raw[i] = data.draw(st.integers(0, 255))
            raw = bytes(raw)
        else:
            raw = b"GGUF" + data.draw(st.binary(max_size=128))
        path = folder / "unet.gguf"
        path.write_bytes(raw)
        before = fz.digest(path)
        f, err = fz.only_ours(read_gguf, path)
        if err is None:
            for t in f.tensors.values():       # a file that reads must also dequantize, or say why not
                fz.only_ours(t.dequantize) if hasattr(t, "dequantize") else None
        assert fz.digest(path) == before
        fz.count("loader: corrupted GGUF file (read_gguf)")

    prop()
