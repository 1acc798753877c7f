"""README's benchmark tables are copies of bench/results/*.md (bench/update_readme.py), never hand-edited."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def update_readme(load_bench):
    return load_bench("update_readme")


def test_readme_tables_match_bench_results(update_readme):
    """Fails when a table between <!-- bench:NAME --> markers differs from bench/results/NAME.md: rerun the bench
    and `python bench/update_readme.py` instead of editing the table."""
    assert update_readme.main(["--check"]) == 0


def test_readme_has_the_benchmark_blocks():
    text = (ROOT / "README.md").read_text()
    for name in ("pipeline_overhead", "lora_bench", "sampler_summary", "quality"):
        assert f"<!-- bench:{name} -->" in text and f"<!-- /bench:{name} -->" in text, name


RESULT = "Command: `python bench/x.py --quick` (quick mode)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.md").write_text(RESULT)
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- bench:x -->\nold table\n<!-- /bench:x -->\nafter\n")
    return tmp_path, doc


def test_update_then_check_passes_and_keeps_the_rest(tree, update_readme):
    root, doc = tree
    args = ["--docs", str(doc), "--results", str(root / "results")]
    assert update_readme.main(["--check", *args]) == 1                       # stale before the update
    assert update_readme.main(args) == 0
    assert doc.read_text() == "intro\n<!-- bench:x -->\n" + RESULT + "<!-- /bench:x -->\nafter\n"
    assert update_readme.main(["--check", *args]) == 0


@pytest.mark.parametrize("edit", [lambda t: t.replace("| 1 | 2 |", "| 1 | 3 |"),          # a hand-edited figure
                                  lambda t: t.replace("| 1 | 2 |\n", "")])               # a dropped row
def test_hand_edited_table_fails_the_check(tree, edit, update_readme):
    root, doc = tree
    args = ["--docs", str(doc), "--results", str(root / "results")]
    update_readme.main(args)
    doc.write_text(edit(doc.read_text()))
    assert update_readme.main(["--check", *args]) == 1


@pytest.mark.parametrize("setup", ["missing result", "no command line", "unclosed marker"])
def test_broken_inputs_are_errors(tree, setup, update_readme):
    root, doc = tree
    if setup == "missing result":
        (root / "results" / "x.md").unlink()
    elif setup == "no command line":
        (root / "results" / "x.md").write_text("| a | b |\n")
    else:
        doc.write_text("<!-- bench:x -->\nold\n")
    assert update_readme.main(["--check", "--docs", str(doc), "--results", str(root / "results")]) == 2
