"""`nimblediff generate --prompts FILE`: one image per prompt, data-parallel under `accelerate launch`.

References: the pipeline run on each prompt alone with its own generator (seed + index), which is what the command
promises each image equals; and the single-process run of the command itself, which two CPU processes started by
`accelerate launch` (gloo) must reproduce byte for byte.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nimblediff import TINY_FLASH_LORA, TINY_MODEL
from nimblediff.cli import main

PROMPTS = ["a red circle in the center", "a yellow triangle on the right", "", "a red star at the top",
           "a small red square on the left and a blue star on the right", "a purple circle on the right"]


def _prompt_file(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")     # the blank line is skipped: 5 prompts
    return path


def _images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_each_image_is_its_prompt_alone_with_its_own_seed(tmp_path, capsys):
    """Batches of 2 over 5 prompts: image i equals the pipeline on prompt i alone with generator seed + i."""
    from nimblediff.pipelines import FewStepPipeline

    prompts = _prompt_file(tmp_path)
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--batch-size", "2",
                 "--steps", "2", "--seed", "7", "--threads", "1"]) == 0
    got = _images(tmp_path / "out")
    assert len(got) == 5
    pipe = FewStepPipeline.from_pretrained(TINY_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_acceleration_lora(TINY_FLASH_LORA, recipe="nimblediff-tiny-flash")
    for i, prompt in enumerate(p for p in PROMPTS if p):
        ref = np.asarray(pipe([prompt], num_inference_steps=2, generator=[torch.Generator().manual_seed(7 + i)])
                         .images[0])
        # batched and alone differ only by float summation order: at most one level of 255 on a few pixels
        assert np.abs(got[i].astype(int) - ref.astype(int)).max() <= 1, f"image {i} ({prompt!r})"


def test_refusals_come_before_any_work(tmp_path, capsys):
    prompts = _prompt_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "00003.png").write_bytes(b"user's file")
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(out)]) == 2
    assert "00003.png: exists" in capsys.readouterr().err
    assert (out / "00003.png").read_bytes() == b"user's file" and len(list(out.iterdir())) == 1
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(["generate", "--prompts", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "o2")]) == 2
    assert main(["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "o3"), "--size", "16384",
                 "--batch-size", "4096"]) == 2
    assert "GiB" in capsys.readouterr().err
    (tmp_path / "odd.txt").write_text("a zorblax in space\n")
    assert main(["generate", "--prompts", str(tmp_path / "odd.txt"), "--out-dir", str(tmp_path / "o4")]) == 2
    assert not any((tmp_path / d).exists() for d in ("o2", "o3", "o4"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_same_images_as_one(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) against the single-process run: identical PNG files."""
    prompts = _prompt_file(tmp_path)
    common = ["generate", "--prompts", str(prompts), "--batch-size", "2", "--steps", "2", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "nimblediff", *common, "--out-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without a GPU the command's PartialState
    # forms a gloo group on the CPU (with --cpu, accelerate would start one process only)
    multi = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", str(_free_port()), "-m", "nimblediff", *common, "--out-dir",
                            str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "2 processes" in multi.stdout
    one, two = sorted((tmp_path / "one").glob("*.png")), sorted((tmp_path / "two").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] == [f"{i:05d}.png" for i in range(5)]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
