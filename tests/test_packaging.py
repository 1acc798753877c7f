"""A non-editable install (pip, comfy-cli, the Comfy Registry) ships exactly the packages pyproject lists: every
folder of the package with an __init__.py must be listed, or `pip install .` installs a pack that fails to import."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", ".venv", ".venv-newest", "runs", "out", "build", "bench"}


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"nimblediff"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (rel.parts[0] in SKIP or rel.parts[0].startswith(".")):
            continue
        found.add(".".join(("nimblediff", *rel.parts)))
    assert found - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {found - listed}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {listed - found}"
