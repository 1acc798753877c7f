"""Test session settings, and the loader of bench/ scripts."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# The tests run tiny models: a second intra-op thread only adds wake-up latency, and on a shared 2-core machine a
# spinning OpenMP thread that gets preempted made small-op tests up to 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Back to one thread after every test: a CLI test runs with its own --threads, which is process-global."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_bench():
    """load_bench(stem): bench/<stem>.py as the module bench_<stem> (bench/ is a folder of scripts, not a package),
    registered in sys.modules, since dataclasses look their module up by name."""
    bench = Path(__file__).resolve().parents[1] / "bench"

    def load(stem: str):
        name = f"bench_{stem}"
        spec = importlib.util.spec_from_file_location(name, bench / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return load


_REPORTED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "gguf", "tokenizers",
             "huggingface_hub", "numpy")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def _v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return "nimblediff deps: " + ", ".join(f"{n} {_v(n)}" for n in _REPORTED)


def pytest_report_header(config):
    """Name the dependency set the suite ran on (constraints.txt pins the tested one)."""
    return _versions()


def pytest_terminal_summary(terminalreporter):
    """Again at the end, where `pytest -q` (make test) prints it too."""
    terminalreporter.write_line(_versions())
