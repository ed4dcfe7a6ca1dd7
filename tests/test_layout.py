"""How the house is laid out: imports go one way, tasks alone know their families, the package
refers to nothing outside the repository, and there is one timing loop."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mobilezoo"
TASK_NAMES = ("classify", "detect", "video", "segment3d", "segment")
# Each package may import only those listed (errors and recipes are leaves everyone may use).
ALLOWED = {
    "layers": set(),
    "models": {"layers"},
    "data": set(),
    "recipes": set(),
    "engine": {"models", "recipes", "layers"},
    "tasks": {"engine", "models", "layers", "data", "recipes"},
    "deploy": {"tasks", "engine", "models", "layers", "recipes"},
    "bench": {"deploy", "tasks", "engine", "models", "layers", "recipes"},
    "nas": {"deploy", "tasks", "engine", "models", "layers", "data", "recipes", "bench"},
}
LEAVES = {"errors", "recipes", "__init__"}


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    """Top-level mobilezoo packages a module imports (relative or absolute)."""
    own = path.relative_to(PACKAGE).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(own[:-1])[: len(own) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                if not parts and node.names:  # `from .. import data`
                    parts = [node.names[0].name]
            elif node.module and node.module.startswith("mobilezoo."):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0].removesuffix(".py"))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mobilezoo.")}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    wrong = []
    for path in (PACKAGE / package).rglob("*.py"):
        for target in _imported_packages(path) - ALLOWED[package] - LEAVES - {package}:
            wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_command_line_or_the_demo():
    for path in _sources():
        if path.name in ("cli.py", "__main__.py", "demo.py"):
            continue
        assert not _imported_packages(path) & {"cli", "demo"}, path


_NAMES = "|".join(TASK_NAMES)
_SWITCH = re.compile(rf"""(==|!=)\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=)""")


def test_no_family_switch_outside_tasks():
    """Everything family-specific is asked of the task: nobody else compares a task's name."""
    hits = []
    for path in _sources():
        if path.relative_to(PACKAGE).parts[0] == "tasks":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _SWITCH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


_OUTSIDE = re.compile(r"§|\bspecs?/|DESIGN\.md|\.\./shared|\bissue\s*#?\d|SPEC-DEFAULT|\b\w+\.md §")


def test_nothing_refers_to_files_the_repository_lacks():
    texts = [*_sources(), *PACKAGE.rglob("*.yaml"), ROOT / "README.md", ROOT / "Makefile",
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "docs").rglob("*.md")]
    hits = []
    for path in texts:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_links_in_the_readme_and_docs_point_at_files_that_exist():
    missing = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if not re.match(r"[a-z]+://", target) and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, "\n".join(missing)


def test_one_timing_loop_in_the_package():
    users = sorted(str(p.relative_to(ROOT)) for p in _sources() if "perf_counter" in p.read_text())
    assert len(users) == 1, users
