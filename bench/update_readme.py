"""Copy benchmark result files into README.md (and the model card) between their markers.

    <!-- bench:NAME -->
    ...replaced by bench/results/NAME.md...
    <!-- /bench:NAME -->

Every table of figures in README.md comes from a bench run this way, never typed by hand: each bench writes
bench/results/NAME.md, whose first line names the exact command that produced it.

    python bench/update_readme.py            # rewrite the blocks
    python bench/update_readme.py --check    # exit 1 if a block differs from its result file
                                             # (the suite runs it: tests/test_readme_tables.py)
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "weights" / "tiny" / "MODEL_CARD.md", ROOT / "weights" / "tiny" / "MODEL_CARD_DIT.md")
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)
OPEN = re.compile(r"<!-- bench:([\w-]+) -->")


class StaleTables(Exception):
    pass


def result(name: str, results: Path) -> str:
    path = results / f"{name}.md"
    if not path.exists():
        raise StaleTables(f"a block names bench:{name} but {path} does not exist: run the bench that writes it "
                          f"(or remove the markers)")
    text = path.read_text().strip()
    first = text.splitlines()[0] if text else ""
    if not re.search(r"bench/\S+\.py", first):
        raise StaleTables(f"{path}: its first line must name the command that wrote it "
                          f"(e.g. Command: `python bench/{name}.py ...`), got {first!r}")
    return text


def render(text: str, results: Path, doc: Path) -> str:
    """`text` with every marked block replaced by its result file."""
    opened = OPEN.findall(text)
    closed = [m.group("name") for m in BLOCK.finditer(text)]
    if sorted(opened) != sorted(closed):
        bad = sorted(set(opened) - set(closed)) or opened
        raise StaleTables(f"{doc}: bench marker(s) {bad} without a matching <!-- /bench:NAME --> line")
    return BLOCK.sub(lambda m: f"<!-- bench:{m['name']} -->\n{result(m['name'], results)}\n<!-- /bench:{m['name']} -->",
                     text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is out of date")
    p.add_argument("--docs", nargs="*", type=Path, default=list(DOCS), help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    stale = []
    try:
        for doc in a.docs:
            if not doc.exists():
                continue
            old = doc.read_text()
            new = render(old, a.results, doc)
            if new == old:
                continue
            stale.append(doc)
            if a.check:
                diff = difflib.unified_diff(old.splitlines(), new.splitlines(), f"{doc} (now)",
                                            f"{doc} (from bench/results)", lineterm="", n=1)
                print("\n".join(list(diff)[:60]))
            else:
                doc.write_text(new)
                print(f"updated {doc}")
    except StaleTables as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check and stale:
        print(f"\n{', '.join(map(str, stale))}: benchmark tables differ from bench/results/*.md. Tables are "
              "regenerated, not edited: rerun the bench, then `python bench/update_readme.py`.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
