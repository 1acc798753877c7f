"""Every Python block and CLI line of README.md and the model card runs, as a user would run it.

Each example runs in a fresh interpreter, from a folder laid out like the repository root (the shipped `weights/`
and `workflows/` linked in), so a README that stops working fails CI. `path/to/...` placeholders are replaced by
small real files built here; nothing else in the text is changed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": ROOT / "README.md", "MODEL_CARD.md": ROOT / "weights" / "tiny" / "MODEL_CARD.md",
        "MODEL_CARD_DIT.md": ROOT / "weights" / "tiny" / "MODEL_CARD_DIT.md"}
# Lines the suite does not run, each with the reason a reader can check: training takes hours, make re-enters
# this very suite (the demo line below stands for `make demo`, whose recipe test_make_demo_is_the_cli_demo checks).
NOT_RUN = {
    "make demo": "runs `python -m nimblediff demo`, which the CLI block runs",
    "make test": "is this suite",
    "python -m nimblediff.tiny.train": "retrains the model (hours)",
    "python -m nimblediff.tiny.evaluate": "retrains the evaluator",
    "python -m nimblediff.tiny.package": "repackages the shipped model (needs the training runs)",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(doc: str, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in FENCE.findall(DOCS[doc].read_text()) if lang in languages]


def commands(doc: str) -> list[str]:
    """The command lines of a document's bash / unlabelled blocks, comments stripped, in order."""
    lines = []
    for body in blocks(doc, ("bash", "sh", "")):
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A folder that looks like the repository root to the examples, plus the files `path/to/...` stands for."""
    import torch

    from nimblediff.pipelines import FewStepPipeline
    from tests.lora_files import write_peft_lora

    root = tmp_path_factory.mktemp("user")
    for name in ("weights", "workflows"):
        (root / name).symlink_to(ROOT / name)
    (root / "out").mkdir()
    mine = root / "mine"
    mine.mkdir()
    pipe = FewStepPipeline.from_pretrained(ROOT / "weights" / "tiny" / "nimblediff-tiny", dtype=torch.float32)
    style = write_peft_lora(pipe, mine, rank=4, seed=3, text_encoder=False, name="style-lora.safetensors")
    pipe.load_lora(ROOT / "weights" / "tiny" / "nimblediff-tiny-flash-lora.safetensors")   # a "fine-tuned" copy
    pipe.save_pretrained(mine / "tuned")
    subs = {"path/to/stable-diffusion-v1-5": str(ROOT / "weights" / "tiny" / "nimblediff-tiny"),
            "path/to/style-lora.safetensors": style,
            "path/to/base-folder": str(ROOT / "weights" / "tiny" / "nimblediff-tiny"),
            "path/to/tuned-folder": str(mine / "tuned"),
            "path/to/sd3-quanto-int8/transformer": str(ROOT / "tests" / "data" / "quanto" / "int8")}
    return root, subs


def _substitute(text: str, subs: dict) -> str:
    for placeholder, real in subs.items():
        text = text.replace(placeholder, real)
    left = re.findall(r"path/to/[\w./-]+", text)
    assert not left, f"placeholders with no stand-in in tests/test_readme_examples.py: {left}"
    return text


def _run(argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)} if not _installed() else dict(os.environ)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nimblediff") is not None


PY_BLOCKS = [(doc, i) for doc in DOCS for i, _ in enumerate(blocks(doc, ("python",)))]
CLI_DOCS = [doc for doc in DOCS if commands(doc)]


@pytest.mark.parametrize("doc,index", PY_BLOCKS, ids=[f"{d}-python{i}" for d, i in PY_BLOCKS])
def test_python_block_runs(doc, index, user_dir):
    root, subs = user_dir
    code = _substitute(blocks(doc, ("python",))[index], subs)
    done = _run([sys.executable, "-c", code], cwd=root)
    assert done.returncode == 0, f"{doc} python block {index} failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("doc", CLI_DOCS)
def test_cli_lines_run(doc, user_dir):
    """Every CLI line in order (later lines read what earlier ones wrote), each in a fresh interpreter."""
    root, subs = user_dir
    for line in commands(doc):
        skip = next((why for prefix, why in NOT_RUN.items() if line.startswith(prefix)), None)
        if skip:
            continue
        argv = shlex.split(_substitute(line, subs))
        if argv[0] == "nimblediff":
            argv = [sys.executable, "-m", "nimblediff", *argv[1:]]
        elif argv[:2] == ["python", "-m"] or argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        else:
            pytest.fail(f"{doc}: {line!r} is neither a nimblediff command nor listed in NOT_RUN")
        done = _run(argv, cwd=root)
        assert done.returncode == 0, f"{doc}: {line}\n--- stdout:\n{done.stdout[-2000:]}\n--- stderr:\n" \
                                     f"{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"{doc}: {line} printed a traceback:\n{done.stderr[-3000:]}"


def test_every_cli_subcommand_appears_in_the_readme():
    """The README's CLI block names every command the parser has, so none goes untested."""
    import argparse

    from nimblediff.cli import build_parser

    paths = []

    def walk(p, prefix):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            paths.append(prefix)
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{prefix} {name}")

    walk(build_parser(), "nimblediff")
    readme = "\n".join(commands("README.md"))
    missing = [p for p in paths if not re.search(re.escape(p) + r"(\s|$)", readme, re.M)]
    assert not missing, f"CLI commands with no README example: {missing}"


def test_make_demo_is_the_cli_demo():
    """`make demo` (not run here: it builds a venv) runs the same demo command the README's CLI block runs."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "-m nimblediff demo" in recipe
    assert any(line.startswith("nimblediff demo") for line in commands("README.md"))
