"""The front door as a new user meets it: the CLI and the pipeline on the shipped model, bad input included.

Each test here stands for one item a fresh-clone user hit (issue 17); each failed before its fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nimblediff
from nimblediff import cli
from nimblediff.errors import InvalidParameterError, WeightsFormatError

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402


def _cli(*args, cwd=None):
    """The command as a user runs it: a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "nimblediff", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_pipe():
    from nimblediff.pipelines import FewStepPipeline

    pipe = FewStepPipeline.from_pretrained(nimblediff.TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# 1. one dtype policy ------------------------------------------------------------------------------------------------
def test_stock_pipeline_loads_the_shipped_model_in_one_dtype():
    """The shipped folder is fp16 on disk; diffusers loads the UNet/VAE in float32, transformers 5 the text encoder
    in the dtype its config names. They must agree, or the first matmul fails."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(nimblediff.TINY_MODEL)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", num_inference_steps=1, guidance_scale=1, output_type="latent")


def test_fewstep_pipeline_casts_a_disagreeing_text_encoder_and_says_so(tmp_path, caplog):
    pipe = factories.tiny_sd15_pipeline()
    pipe.text_encoder.to(torch.float16)
    pipe.save_pretrained(tmp_path / "mixed")                # text_encoder/config.json now says float16
    config = json.loads((tmp_path / "mixed" / "text_encoder" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    from nimblediff.pipelines import FewStepPipeline

    with caplog.at_level("WARNING"):
        loaded = FewStepPipeline.from_pretrained(tmp_path / "mixed")
    assert loaded.text_encoder.dtype == loaded.unet.dtype == torch.float32
    assert "text_encoder float16" in caplog.text
    loaded.set_progress_bar_config(disable=True)
    loaded("a cat", num_inference_steps=1, output_type="latent")


def test_dtype_argument_applies_to_every_component(tiny_pipe):
    from nimblediff.pipelines import FewStepPipeline

    pipe = FewStepPipeline.from_pretrained(nimblediff.TINY_MODEL, dtype=torch.bfloat16)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.bfloat16}


def test_missing_or_wrong_model_folder_is_named(tmp_path):
    from nimblediff.pipelines import FewStepPipeline

    with pytest.raises(WeightsFormatError, match="no such folder"):
        FewStepPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsFormatError, match="model_index.json"):
        FewStepPipeline.from_pretrained(tmp_path / "empty")
    done = _cli("schedule", "search", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json"))
    assert done.returncode == 2 and "no such folder" in done.stderr and "Traceback" not in done.stderr


# 2. schedule search on the default model ---------------------------------------------------------------------------
def test_schedule_search_runs_on_the_default_model_with_progress(tmp_path):
    out = tmp_path / "s.json"
    done = _cli("schedule", "search", "--method", "boss", "--nfe", "2", "--grid", "6", "--batch", "1",
                "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "100%" in done.stderr                         # the bar reaches its end: the work estimate is whole
    assert json.loads(out.read_text())["nfe"] == 2


@pytest.mark.parametrize("propagate", [True, False])
def test_boss_work_estimate_counts_the_model_calls(propagate):
    """The progress bar's total is the number of batched model calls boss_costs makes (hand-counted by a wrapper)."""
    from nimblediff.core import schedule_search as ss
    from nimblediff.core.parameterization import VP

    param = VP()
    calls = []

    def denoiser(x, sigma):
        calls.append(len(x))
        return x * 0.5

    x = torch.randn(2, 3)
    seen = []
    ss.boss_costs(denoiser, param, x=x, grid_size=10, propagate=propagate,
                  progress=lambda done, total: seen.append((done, total)))
    batches = sum(calls) / len(x)
    total = seen[-1][1]
    assert seen[-1][0] == total
    assert abs(total - batches) <= 0.1 * batches, (total, batches)


# 4. threads ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("load,cores,expected", [(0.0, 2, 2), (1.0, 2, 1), (0.6, 2, 1), (3.5, 2, 1), (0.1, 4, 4),
                                                 (1.9, 4, 2)])
def test_auto_threads_leave_busy_cores_alone(monkeypatch, load, cores, expected):
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cli._free_cores()[1] == expected


# 5, 6, 8, 9. CLI input checks, overwrites and noise -----------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "-1"], "--steps"),
    (["demo", "--threads", "0"], "--threads"),
])
def test_bad_numbers_are_refused_before_any_work(args, message):
    done = _cli(*args)
    assert done.returncode == 2 and message in done.stderr
    assert "recipe" not in done.stderr and "Traceback" not in done.stderr


def test_pipeline_refuses_zero_steps(tiny_pipe):
    with pytest.raises(InvalidParameterError, match="num_inference_steps=0"):
        tiny_pipe("a red circle", num_inference_steps=0)


def test_workflow_commands_name_bad_files(tmp_path):
    text = tmp_path / "notes.json"
    text.write_text("this is not json")
    other = tmp_path / "list.json"
    other.write_text("[1, 2, 3]")
    done = _cli("workflow", "to-ui", str(text), str(tmp_path / "ui.json"))
    assert done.returncode == 2 and "not JSON" in done.stderr and "Traceback" not in done.stderr
    done = _cli("workflow", "validate", str(other))
    assert done.returncode == 1 and "not a ComfyUI workflow" in done.stdout and "Traceback" not in done.stderr
    ui = Path(nimblediff.__file__).parent / "example_workflows" / "nimblediff_flash_t2i.json"
    done = _cli("workflow", "to-ui", str(ui), str(tmp_path / "ui.json"))
    assert done.returncode == 2 and "already in the UI format" in done.stderr


def test_demo_refuses_to_replace_a_file_and_is_quiet(tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    done = _cli("demo", "--out", str(out), "--threads", "1")
    assert done.returncode == 2 and "--overwrite" in done.stderr and out.read_bytes() == b"precious"
    done = _cli("demo", "--out", str(out), "--threads", "1", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"noise on stderr: {done.stderr[:2000]}"      # no warnings, no loading bars
    assert "6 images" in done.stdout
    quiet = _cli("demo", "--out", str(out), "--threads", "1", "--overwrite", "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_lora_inspect_prints_a_summary_not_a_dataclass():
    done = _cli("lora", "inspect", nimblediff.TINY_FLASH_LORA)
    assert done.returncode == 0 and "LoRAReport(" not in done.stdout
    assert "124 modules" in done.stdout and "peft" in done.stdout


def test_help_texts_match_the_commands():
    parser = cli.build_parser()
    top = parser.format_help()
    assert "train" not in top                      # no training subcommand, so the help does not promise one
    demo = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)._name_parser_map["demo"]
    assert f"{len(cli.DEMO_PROMPTS)} demo prompts" in demo.format_help()


# 10. the flagship picture shows what its captions say ---------------------------------------------------------------
def _scene(caption):
    """The labels a caption of the tiny grammar states (size left free where unsaid)."""
    from nimblediff.tiny import data

    background = "gray"
    if " on a " in caption:
        caption, background = caption.rsplit(" on a ", 1)
        background = background.removesuffix(" background")
    labels = []
    for phrase in caption.split(" and "):
        words = phrase.split()
        position = next(p for p, text in data.POSITION_PHRASES.items() if phrase.endswith(text))
        size = next((w for w in words if w in data.SIZES), "small")
        colour = next(w for w in words if w in data.COLOURS)
        shape = next(w for w in words if w in data.SHAPES)
        labels.append(data.ShapeLabel(shape, colour, position, size))
    return data.Scene(tuple(labels), background, caption, tuple((0, 0, 0, (0, 0, 0)) for _ in labels))


def test_demo_images_show_their_prompts(tiny_pipe):
    """Rendered as the demo renders them (Flash LoRA, 4 steps, seed i for image i), the evaluator (trained on real
    renders, independent of the generator) reads each prompt's shape, colour and position from each image."""
    from nimblediff.tiny import evaluate

    tiny_pipe.load_acceleration_lora(nimblediff.TINY_FLASH_LORA, recipe="nimblediff-tiny-flash")
    try:
        generators = [torch.Generator().manual_seed(i) for i in range(len(cli.DEMO_PROMPTS))]
        images = tiny_pipe(cli.DEMO_PROMPTS, num_inference_steps=4, generator=generators, output_type="np").images
    finally:
        tiny_pipe.unload_loras()
    images = (np.asarray(images) * 255).round().astype(np.uint8)
    net = evaluate.load_evaluator()
    for prompt, image in zip(cli.DEMO_PROMPTS, images):
        scores, _ = evaluate.evaluate(image[None], [_scene(prompt)], net)
        wrong = [k for k in ("shape", "colour", "position", "count") if scores[k] < 1]
        assert not wrong, f"demo image for {prompt!r} gets {wrong} wrong"
