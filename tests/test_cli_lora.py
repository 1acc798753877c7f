"""`nimblediff lora convert | resize | prune | merge | extract` against an independent reader (diffusers
load_lora_weights + fuse_lora) and the core functions the commands must only wrap."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402
import lora_files  # noqa: E402

from nimblediff.cli import main  # noqa: E402
from nimblediff.core.adapters.merge import merge  # noqa: E402
from nimblediff.core.adapters.rank import prune_to_budget, resize_lora, weight_shape  # noqa: E402
from nimblediff.weights.lora_formats import read_lora  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return factories.tiny_sd15_pipeline(0, layout="sd15")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    return lora_files.two_loras(pipe, folder)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["lora", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def dense(d):
    return d.delta_weight(weight_shape(d))


def assert_same_deltas(ours, ref, atol=1e-6):
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(dense(ours[k]), dense(ref[k]), rtol=0, atol=atol, msg=k)


def test_convert_round_trip_loads_in_diffusers_to_the_same_weights(capsys, pipe, files, tmp_path):
    """peft -> kohya -> comfyui -> peft with the CLI; diffusers fuses the kohya file and the round-tripped file to the
    weights it fuses from the original (diffusers cannot read ComfyUI's LDM-named layout, hence the round trip)."""
    kohya, comfy, back = tmp_path / "k.safetensors", tmp_path / "c.safetensors", tmp_path / "p.safetensors"
    assert run(capsys, "convert", files["a"], kohya, "--layout", "kohya")[0] == 0
    assert run(capsys, "convert", kohya, comfy, "--layout", "comfyui")[0] == 0
    rc, out, _ = run(capsys, "convert", comfy, back, "--layout", "peft")
    assert rc == 0 and f"wrote {back}" in out and "peft layout, 208 layers" in out
    ref_unet, ref_te = lora_files.diffusers_fused(copy.deepcopy(pipe), files["a"], scale=0.7)
    base = pipe.unet.state_dict()
    assert sum(not torch.equal(base[k], v) for k, v in ref_unet.items()) > 20
    for path in (kohya, back):
        unet, te = lora_files.diffusers_fused(copy.deepcopy(pipe), str(path), scale=0.7)
        for k, v in ref_unet.items():
            torch.testing.assert_close(unet[k], v, rtol=0, atol=1e-6, msg=f"{path.name}: {k}")
        for k, v in ref_te.items():
            torch.testing.assert_close(te[k], v, rtol=0, atol=1e-6, msg=f"{path.name}: {k}")


@pytest.mark.parametrize("method, extra", [("dare_linear", ["--density", "0.6", "--seed", "5", "--rank", "3"]),
                                           ("ties", ["--density", "0.5"])])
def test_merge_equals_core_merge(capsys, files, tmp_path, method, extra):
    out_path = tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "merge", out_path, files["a"], files["b"], "--weights", "0.7", "-0.4",
                       "--method", method, *extra)
    assert rc == 0, err
    rank = int(extra[extra.index("--rank") + 1]) if "--rank" in extra else None
    density = float(extra[extra.index("--density") + 1])
    seed = int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0
    a, b = read_lora(files["a"])[0], read_lora(files["b"])[0]
    expected, _ = merge([a, b], [0.7, -0.4], method, density=density, seed=seed, rank=rank)
    assert_same_deltas(read_lora(out_path)[0], expected, atol=1e-5)
    assert f"{method} merge of 2 LoRAs: 208 layers" in out and ("full differences" in out) == (rank is None)


def test_merge_refuses_loras_that_match_no_module(capsys, files, tmp_path):
    """Issue 17: a LoRA whose modules exist in no SD1.5 model, or share none with the other LoRA, was merged into a
    file anyway; now the merge names the file and what matched, and writes nothing."""
    from safetensors.torch import save_file

    from nimblediff.weights.lora_write import save_lora

    g = torch.Generator().manual_seed(0)
    stray = tmp_path / "stray.safetensors"
    save_file({f"unet.head.layers.{i}.proj.lora_{ab}.weight": torch.randn(*shape, generator=g)
               for i in range(3) for ab, shape in (("A", (4, 8)), ("B", (16, 4)))}, str(stray))
    a = read_lora(files["a"])[0]
    unet_only, text_only = tmp_path / "unet.safetensors", tmp_path / "text.safetensors"
    save_lora({k: d for k, d in a.items() if k.startswith("unet.")}, unet_only, "peft")
    save_lora({k: d for k, d in a.items() if k.startswith("text_encoder.")}, text_only, "peft")
    out_path = tmp_path / "m.safetensors"
    for loras, message in (([stray, files["b"]], f"{stray}: none of its 3 modules is a module of a"),
                           ([unet_only, text_only], f"{unet_only}: none of its 198 modules")):
        rc, _, err = run(capsys, "merge", out_path, *loras, "--method", "ties", "--density", "0.5", "--rank", "2")
        assert rc == 2 and message in err, err
        assert "unet.head.layers.0.proj" in err or "text_encoder.encoder.layers.0.mlp.fc1" in err   # what it has
        assert not out_path.exists()


def test_merged_file_metadata_names_the_rank_it_holds(capsys, files, tmp_path):
    """Issue 17: a linear merge of ranks 4 + 2 under --rank 16 holds tensors of rank 6 (4 where a layer allows no
    more); the metadata said rank=16."""
    from safetensors import safe_open

    out_path = tmp_path / "m.safetensors"
    rc, _, err = run(capsys, "merge", out_path, files["a"], files["b"], "--rank", "16", "--layout", "kohya")
    assert rc == 0, err
    with safe_open(str(out_path), "pt") as f:
        metadata = f.metadata()
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")}
    params = dict(p.split("=", 1) for p in metadata["nimblediff_params"].split(", "))
    assert max(ranks) == 6 and params["max_rank"] == "16"
    assert params["rank"] == (f"{min(ranks)}..{max(ranks)}" if len(ranks) > 1 else str(max(ranks)))
    assert metadata["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(max(ranks)))


def test_resize_and_prune_equal_core(capsys, files, tmp_path):
    a = read_lora(files["a"])[0]
    rc, out, _ = run(capsys, "resize", files["a"], tmp_path / "r.safetensors", "--rank", "3", "--sv-fro", "0.9")
    expected, report = resize_lora(a, rank=3, sv_fro=0.9)
    assert rc == 0 and report.summary() in out
    assert_same_deltas(read_lora(tmp_path / "r.safetensors")[0], expected)
    rc, out, _ = run(capsys, "prune", files["a"], tmp_path / "p.safetensors", "--max-bytes", "20000",
                     "--layout", "kohya")
    expected, report = prune_to_budget(a, max_bytes=20000, dtype=torch.float32)
    assert rc == 0 and report.summary() in out and report.nbytes(torch.float32) <= 20000
    assert_same_deltas(read_lora(tmp_path / "p.safetensors")[0], expected)


def test_extract_from_diffusers_folders_recovers_the_fused_lora(capsys, pipe, files, tmp_path):
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    pipe.save_pretrained(str(base_dir), safe_serialization=True)
    tuned = copy.deepcopy(pipe)
    tuned.load_lora_weights(files["a"], adapter_name="a")
    tuned.fuse_lora(lora_scale=1.0)
    tuned.unload_lora_weights()
    tuned.save_pretrained(str(tuned_dir), safe_serialization=True)
    out_path = tmp_path / "x.safetensors"
    rc, out, err = run(capsys, "extract", base_dir, tuned_dir, out_path, "--rank", "4",
                       "--components", "unet,text_encoder", "--layout", "comfyui")
    assert rc == 0, err
    assert "unet:" in out and "text_encoder:" in out and "ranks 4..4" in out
    got = read_lora(out_path)[0]
    want = {}
    for comp in ("unet", "text_encoder"):
        base = getattr(pipe, comp).state_dict()
        want.update({f"{comp}.{k.removesuffix('.weight')}": v - base[k]
                     for k, v in getattr(tuned, comp).state_dict().items() if k.endswith(".weight")})
    changed = {k for k, v in want.items() if v.abs().max() > 0}
    assert set(got) == changed and len(changed) == 208
    for k in changed:
        torch.testing.assert_close(dense(got[k]).reshape(want[k].shape), want[k], rtol=0, atol=2e-5, msg=k)


def test_refuses_kinds_it_cannot_write_instead_of_dropping_them(capsys, pipe, tmp_path):
    """A LoHa layer and a DoRA magnitude (kohya layout): the writers hold LoRAs and full differences only."""
    from safetensors.torch import save_file

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    out_f, in_f = pipe.unet.get_submodule(name).weight.shape
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    key = "lora_unet_" + name.replace(".", "_")
    save_file({f"{key}.hada_w1_a": rnd(out_f, 2), f"{key}.hada_w1_b": rnd(2, in_f), f"{key}.hada_w2_a": rnd(out_f, 2),
               f"{key}.hada_w2_b": rnd(2, in_f), f"{key}.alpha": torch.tensor(2.0)}, str(tmp_path / "loha.safetensors"))
    save_file({f"{key}.lora_down.weight": rnd(2, in_f), f"{key}.lora_up.weight": rnd(out_f, 2),
               f"{key}.alpha": torch.tensor(2.0), f"{key}.dora_scale": rnd(out_f, 1).abs() + 1},
              str(tmp_path / "dora.safetensors"))
    for src, message in (("loha.safetensors", "holds a LoHa adapter"), ("dora.safetensors", "1 DoRA magnitudes")):
        rc, _, err = run(capsys, "convert", tmp_path / src, tmp_path / "out.safetensors", "--layout", "kohya")
        assert rc == 2 and message in err, err
        assert not (tmp_path / "out.safetensors").exists()


def test_refuses_to_overwrite_and_names_bad_inputs(capsys, files, tmp_path):
    out_path = tmp_path / "o.safetensors"
    assert run(capsys, "resize", files["a"], out_path, "--rank", "2")[0] == 0
    before = out_path.read_bytes()
    rc, _, err = run(capsys, "resize", files["a"], out_path, "--rank", "1")
    assert rc == 2 and f"{out_path}: exists; pass --overwrite" in err and out_path.read_bytes() == before
    assert run(capsys, "resize", files["a"], out_path, "--rank", "1", "--overwrite")[0] == 0
    assert out_path.read_bytes() != before
    rc, _, err = run(capsys, "prune", files["a"], files["a"], "--fraction", "0.5", "--overwrite")
    assert rc == 2 and "is also an input" in err                     # never over an input, even with --overwrite
    cases = [
        (["convert", tmp_path / "missing.safetensors", tmp_path / "x.safetensors", "--layout", "kohya"],
         "missing.safetensors: no such file"),
        (["resize", files["a"], tmp_path / "y.safetensors"], "nothing given"),
        (["resize", files["a"], tmp_path / "y.safetensors", "--rank", "99"], "rank=99 is larger than layer"),
        (["prune", files["a"], tmp_path / "y.safetensors", "--fraction", "1.5"], "fraction=1.5"),
        (["merge", tmp_path / "y.safetensors", files["a"], files["b"], "--weights", "1"], "--weights has 1 values"),
        (["merge", tmp_path / "y.safetensors", files["a"], "--layout", "peft"], "peft layout cannot hold"),
        (["extract", tmp_path, tmp_path, tmp_path / "y.safetensors"], "no diffusion_pytorch_model.safetensors"),
    ]
    for argv, message in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and message in err, (argv, err)
        assert not (tmp_path / "y.safetensors").exists()
    with pytest.raises(SystemExit):                                   # argparse: --layout is required
        main(["lora", "convert", str(files["a"]), str(tmp_path / "z.safetensors")])
