"""`nimblediff schedule search` on a tiny diffusers folder writes a schedule the loader accepts."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import factories  # noqa: E402

from nimblediff.cli import main  # noqa: E402
from nimblediff.core.schedule_search import load_schedule  # noqa: E402


def test_schedule_search_cli_writes_loadable_json(tmp_path):
    factories.save_tiny_sd15(tmp_path / "model")
    out = tmp_path / "s.json"
    args = ["schedule", "search", "--model", str(tmp_path / "model"), "--nfe", "3", "--batch", "2",
            "--size", "16", "--grid", "24", "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    data = load_schedule(out, model_type="vp")
    assert data["nfe"] == 3 and len(data["sigmas"]) == 4 and float(data["sigmas"][-1]) == 0.0
    assert main(args) == 2          # refuses to overwrite without --overwrite


def test_fit_cli_differentiates_through_the_unet(tmp_path):
    """--method fit trains the solver through a real (tiny) UNet: starting from DDIM (all weights zero), the saved
    weights have moved, so gradients flowed through the UNet and its timestep embedding."""
    factories.save_tiny_sd15(tmp_path / "model")
    out = tmp_path / "fit.json"
    args = ["schedule", "search", "--model", str(tmp_path / "model"), "--method", "fit", "--nfe", "3",
            "--batch", "2", "--size", "16", "--iterations", "4", "--prior-shift", "--cfg", "3", "--out", str(out),
            "--prompt", "a cat", "--prompt", "a red dog",
            "--threads", "1"]
    assert main(args) == 0
    data = load_schedule(out, model_type="vp")
    assert data["sampler"] == "fitted" and data["options"]["prior_shift"] is True
    assert len(data["options"]["coeffs"]) == 3 and len(data["options"]["gains"]) == 2
    assert any(c != 0 for step in data["options"]["coeffs"] for c in step)     # gradients reached the weights


def test_fit_cli_time_shift_and_start(tmp_path, capsys):
    """--time-shift and --fit-start reach the fit through a real UNet: the file holds one shift per step, moved
    from zero (gradients reached the noise level the UNet is asked at), and a first sigma at or below the model's
    top; a negative --tail is refused by name."""
    factories.save_tiny_sd15(tmp_path / "model")
    out = tmp_path / "fit.json"
    args = ["schedule", "search", "--model", str(tmp_path / "model"), "--method", "fit", "--nfe", "3",
            "--batch", "2", "--size", "16", "--iterations", "4", "--time-shift", "--fit-start", "--tail", "3",
            "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    data = load_schedule(out, model_type="vp")
    shifts = data["options"]["shifts"]
    assert len(shifts) == 3 and any(abs(v) > 1e-4 for v in shifts)
    from nimblediff.core.parameterization import VP

    assert float(data["sigmas"][0]) <= VP().sigma_max * (1 + 1e-6)
    with pytest.raises(SystemExit):
        main(args[:-4] + ["--tail", "-1", "--out", str(tmp_path / "x.json")])
    assert "--tail" in capsys.readouterr().err
