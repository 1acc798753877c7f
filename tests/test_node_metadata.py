"""What a ComfyUI user (and the Comfy Registry) sees of the pack besides the computation: a description on every node,
a tooltip on every input, LoRA strength ranges as wide as ComfyUI's own LoraLoader, registry metadata without
placeholders, and requirements.txt naming the same packages as pyproject.toml.

Read through NODE_CLASS_MAPPINGS / INPUT_TYPES, as ComfyUI's /object_info does.
"""

import re
from pathlib import Path

import pytest

from nimblediff.nodes import NODE_CLASS_MAPPINGS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# ComfyUI's LoraLoader: strength_model / strength_clip FLOAT in [-100, 100], step 0.01
COMFY_LORA_STRENGTH = (-100.0, 100.0)


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            yield name, value


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_has_a_description(node_id):
    desc = getattr(NODE_CLASS_MAPPINGS[node_id], "DESCRIPTION", None)
    assert isinstance(desc, str) and len(desc.strip()) >= 20, f"{node_id}: DESCRIPTION missing or too short"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_input_has_a_tooltip(node_id):
    missing = [name for name, value in _inputs(NODE_CLASS_MAPPINGS[node_id])
               if len(value) < 2 or not isinstance(value[1], dict) or not str(value[1].get("tooltip", "")).strip()]
    assert not missing, f"{node_id}: inputs without a tooltip: {missing}"


def test_lora_strengths_span_comfyuis_range():
    """Strength and merge-weight widgets reach as far as ComfyUI's own LoraLoader, so a workflow that works there
    (e.g. strength 12) is not refused by ours."""
    pattern = re.compile(r"^(strength_(model|clip)(_\d)?|weight_\d)$")
    found = []
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        for name, value in _inputs(cls):
            if pattern.match(name) and value[0] == "FLOAT":
                found.append(node_id)
                assert (value[1].get("min"), value[1].get("max")) == COMFY_LORA_STRENGTH, f"{node_id}.{name}"
    assert {"NimbleLoRALoader", "NimbleLoRAStack", "NimbleLoRAMerge"} <= set(found)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_metadata_has_no_placeholders():
    data = _pyproject()
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert str(comfy.get(key, "")).strip(), f"[tool.comfy] {key} is empty"
    urls = [comfy["Icon"], *data["project"]["urls"].values()]
    for url in urls:
        assert url.startswith("https://") and not re.search(r"example\.|your[-_]|todo|xxx|<", url, re.I), url
    assert comfy["Icon"].endswith("/icon.png") and (ROOT / "icon.png").is_file()
    assert (ROOT / data["project"]["license-files"][0]).is_file()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_name_the_same_packages_as_pyproject():
    """requirements.txt (ComfyUI-Manager / comfy-cli installs into ComfyUI's Python, which has torch) lists every
    runtime dependency of pyproject.toml but torch."""
    declared = {_name(d) for d in _pyproject()["project"]["dependencies"]} - {"torch"}
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {_name(line) for line in lines if line}
    assert listed == declared
