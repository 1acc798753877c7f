"""Fuzz the `nimblediff` command (cli.main) with generated command lines over real, corrupt, missing and repeated
files: lora inspect / convert / resize / prune / merge, workflow validate / to-ui, and the refusals of schedule search
and demo (absurd sizes, missing model, existing output) that must come before any model is loaded.

Invariants: main returns an exit code or argparse exits (SystemExit); no other exception escapes; no file outside
the output folder is created or changed (inputs included, even when named as the output); no temporary file is left
behind. Profiles and counts: tests/test_fuzz_support.py.
"""

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")  # the [test] extra; `make report-newest` installs pytest alone
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_fuzz_support as fz  # noqa: E402

from nimblediff import TINY_FLASH_LORA, TINY_MODEL  # noqa: E402
from nimblediff.cli import main  # noqa: E402
from nimblediff.workflow_check import TEMPLATES, WORKFLOWS  # noqa: E402

NUMBERS = ["0", "1", "2", "-1", "0.5", "1e9", "999999999999", "nan", "inf", "-0", "abc", ""]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    fz.report(__name__)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """in/: a small real LoRA of NimbleDiff-Tiny (8 modules of the shipped Flash LoRA, peft and kohya layouts), a
    corrupt and a truncated copy, a workflow of each format, a text file; out/: where outputs may go."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("cli")
    inputs = root / "in"
    inputs.mkdir()
    sd = load_file(TINY_FLASH_LORA)
    modules = sorted({k.rsplit(".", 2)[0] for k in sd})[:8]
    save_file({k: v for k, v in sd.items() if k.rsplit(".", 2)[0] in modules}, inputs / "small.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["lora", "convert", str(inputs / "small.safetensors"), str(inputs / "kohya.safetensors"),
                     "--layout", "kohya"]) == 0
    data = (inputs / "small.safetensors").read_bytes()
    (inputs / "corrupt.safetensors").write_bytes(data[:8] + b"{" + data[9:])
    (inputs / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    shutil.copy(sorted((WORKFLOWS / "api").glob("*.json"))[0], inputs / "api.json")
    shutil.copy(sorted(TEMPLATES.glob("*.json"))[0], inputs / "ui.json")
    (inputs / "notes.txt").write_text("not json")
    (root / "out").mkdir()
    return root


def _in_files(work):
    names = ["small.safetensors", "kohya.safetensors", "corrupt.safetensors", "truncated.safetensors", "api.json",
             "ui.json", "notes.txt", "missing.safetensors"]
    return [str(work / "in" / n) for n in names] + [str(work / "in"), str(work / "out" / "o.safetensors")]


@st.composite
def command_lines(draw, work):
    ins, outs = _in_files(work), [str(work / "out" / n) for n in ("o.safetensors", "sub/p.safetensors", "q.json",
                                                                  "o")]
    lora_in = st.sampled_from(ins)

    def out(inputs):  # an output path, or one of the command's own inputs: that must survive, even with --overwrite
        return st.sampled_from(outs + list(inputs))
    num = st.sampled_from(NUMBERS) | st.integers(-3, 40).map(str) | st.floats(-2, 2).map(str)
    cmd = draw(st.sampled_from(["inspect", "convert", "resize", "prune", "merge", "validate", "to-ui", "search",
                                "demo", "generate"]))
    flags = []
    if cmd == "inspect":
        argv = ["lora", "inspect", draw(lora_in)]
    elif cmd == "convert":
        src = draw(lora_in)
        argv = ["lora", "convert", src, draw(out([src])), "--layout",
                draw(st.sampled_from(["peft", "kohya", "comfyui", "bogus"]))]
    elif cmd == "resize":
        src = draw(lora_in)
        argv = ["lora", "resize", src, draw(out([src]))]
        flags = [draw(st.sampled_from(["--rank", "--sv-ratio", "--sv-fro", "--sv-cumulative", "--energy"])), draw(num)]
    elif cmd == "prune":
        src = draw(lora_in)
        argv = ["lora", "prune", src, draw(out([src]))]
        flags = [draw(st.sampled_from(["--fraction", "--params", "--max-bytes"])), draw(num)]
        flags += draw(st.sampled_from([[], ["--min-rank", draw(num)], ["--score", draw(st.sampled_from(
            ["relative", "energy", "sv", "x"]))]]))
    elif cmd == "merge":
        loras = draw(st.lists(lora_in, min_size=1, max_size=3))
        argv = ["lora", "merge", draw(out(loras)), *loras, "--method", draw(st.sampled_from(
            ["linear", "ties", "dare_linear", "magnitude_prune", "cat", "svd"]))]
        flags = draw(st.sampled_from([[], ["--rank", draw(num)], ["--density", draw(num)],
                                      ["--weights", *[draw(num) for _ in range(draw(st.integers(1, 3)))]]]))
    elif cmd == "validate":
        argv = ["workflow", "validate", *draw(st.lists(st.sampled_from(ins), max_size=3))]
    elif cmd == "to-ui":
        src = draw(st.sampled_from(ins))
        argv = ["workflow", "to-ui", src, draw(out([src]))]
    elif cmd == "search":
        # every line carries at least one reason to refuse before the model is loaded (the search itself is slow)
        bad = draw(st.sampled_from([["--size", draw(st.sampled_from(["0", "-64", "100000000", "1e3"]))],
                                    ["--batch", draw(st.sampled_from(["0", "100000000", "-1"]))],
                                    ["--model", str(work / "in")], ["--nfe", "0"],
                                    ["--out", ins[0]]]))
        argv = ["schedule", "search", *bad, "--out", draw(st.sampled_from([ins[0], str(work / "out" / "s.json")])) if "--out" not in bad else
                ins[1]]
    elif cmd == "generate":
        # prompt files that are missing, a folder, or words the tiny model does not know; absurd sizes
        argv = ["generate", "--prompts", draw(st.sampled_from([ins[6], ins[7], ins[8], ins[4]])), "--out-dir",
                draw(st.sampled_from([str(work / "out"), str(work / "out" / "g")])),
                *draw(st.sampled_from([[], ["--size", "100000"], ["--batch-size", "0"], ["--steps", "-1"]]))]
    else:
        bad = draw(st.sampled_from([["--out", ins[0]], ["--prompt", "a zorblax in space"], ["--steps", "0"],
                                    ["--scale", "-1"], ["--threads", "x"]]))
        argv = ["demo", *bad, "--out", ins[0] if bad[0] != "--out" else ins[1]]
    if draw(st.booleans()):
        flags += draw(st.sampled_from([["--overwrite"], ["--dtype", draw(st.sampled_from(["fp16", "bf16", "fp32",
                                                                                           "fp8"]))],
                                       ["--model", draw(st.sampled_from([TINY_MODEL, str(work / "in"), "nope"]))],
                                       ["-q"]]))
    if cmd in ("search", "demo", "generate") and ("--overwrite" in flags or "--model" in flags):
        flags = []                        # keep the refusal the line was built around (the search itself is slow)
    return argv + flags


def test_command_lines(work):
    outside = {p: d for p, d in fz.tree(work).items() if not p.startswith("out")}

    @given(argv=command_lines(work))
    def prop(argv):
        if os.environ.get("NIMBLEDIFF_FUZZ_TRACE"):      # the last line names a case that hangs or crashes
            with open(os.environ["NIMBLEDIFF_FUZZ_TRACE"], "a") as fh:
                fh.write(json.dumps(argv) + "\n")
        shutil.rmtree(work / "out")       # each case starts from an empty output folder (cases stay independent)
        (work / "out").mkdir()
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(work / "out")            # relative defaults (schedule.json, out/demo.png) land in the output folder
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except SystemExit as exit_:       # argparse: a usage error
            code = exit_.code
        finally:
            os.chdir(cwd)
        assert isinstance(code, int), (argv, code)
        if code == 2 and "error" not in err.getvalue():
            pytest.fail(f"{argv}: exit 2 without an error message")
        now = fz.tree(work)
        assert {p: d for p, d in now.items() if not p.startswith("out")} == outside, f"{argv} changed an input"
        assert not [p for p in now if p.endswith(".tmp")], f"{argv} left a temporary file"
        fz.count(f"cli: {argv[0]} {argv[1] if not argv[1].startswith('-') else ''}".strip())

    prop()
