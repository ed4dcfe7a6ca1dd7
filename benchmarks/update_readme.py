"""Regenerate the benchmark tables of the README and docs/benchmarks.md from benchmarks/results/*.json.

    python benchmarks/update_readme.py [--check]

Each table lives between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in README.md or
docs/benchmarks.md and is rendered from `benchmarks/results/NAME.json` by the same formatter that
printed it. A result file that is missing leaves its section as it is. `--check` exits 1 if either
file is out of date.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")  # the files that hold marked tables
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _moat(result: dict) -> str:
    from moat_vs_timm import render
    text = render(result["rows"], result["goals"], result["meta"])
    return text.split("\n", 2)[2].strip()  # without its title: the README gives the section heading


def _runtimes(result: dict) -> str:
    from mobilezoo.bench.suites.runtimes import format_markdown, summarize
    # The summary is recomputed from the rows, so results written before a summary column existed show it too.
    return format_markdown({**result, "summary": summarize(result["rows"])})


def _detectors(rows: list) -> str:
    from mobilezoo.bench.suites.detect import format_markdown
    return format_markdown(rows)


def _video(rows: list) -> str:
    from mobilezoo.bench.suites.video import format_markdown
    return format_markdown(rows)


def _memory(result: dict) -> str:
    from revunet_memory import format_markdown
    return format_markdown(result)


def _search(result: dict) -> str:
    from search_vs_random import format_markdown
    return format_markdown(result)


RENDER = {"runtimes": _runtimes, "moat_vs_timm": _moat, "detectors": _detectors, "video": _video,
          "revunet_memory": _memory, "search_vs_random": _search}


def update(readme: str, results: Path) -> str:
    """`readme` with every marked section whose JSON exists re-rendered."""
    for name, render in RENDER.items():
        path = results / f"{name}.json"
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if not path.is_file() or start not in readme:
            continue
        body = render(json.loads(path.read_text()))
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        block = f"{start}\n{body}\n{end}"
        readme = pattern.sub(lambda m, block=block: block, readme)
    return readme


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a document is not up to date")
    p.add_argument("--readme", type=Path, action="append",
                   help="a document to update (repeatable; default README.md and docs/benchmarks.md)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    stale = 0
    for doc in args.readme or DOCUMENTS:
        old = doc.read_text()
        new = update(old, args.results)
        stale += new != old
        if args.check:
            print(f"{doc}: {'up to date' if new == old else 'benchmark tables are out of date'}")
        else:
            doc.write_text(new)
            print(f"{doc}: {'updated' if new != old else 'already up to date'}")
    return int(args.check and stale > 0)


if __name__ == "__main__":
    sys.exit(main())
