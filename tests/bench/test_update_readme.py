"""README benchmark tables are regenerated from benchmarks/results/*.json."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_readme)

ROW = {"model": "ssdlite_mobiledet_cpu", "threads": 2, "size": 320, "params": 4157030,
       "network_macs": 443957440, "latency_ms": 57.9, "latency_p90_ms": 71.7}


def test_only_the_marked_section_is_rewritten_from_its_json(tmp_path):
    (tmp_path / "detectors.json").write_text(json.dumps([ROW]))
    readme = "intro\n<!-- bench:detectors -->\nstale table\n<!-- /bench:detectors -->\noutro\n" \
             "<!-- bench:video -->\nkept: no video.json\n<!-- /bench:video -->\n"
    new = update_readme.update(readme, tmp_path)
    assert "stale table" not in new and "| ssdlite_mobiledet_cpu | 4.16 | 0.444 | 57.9 | 71.7 |" in new
    assert new.startswith("intro\n<!-- bench:detectors -->\n") and "outro" in new
    assert "kept: no video.json" in new
    assert update_readme.update(new, tmp_path) == new  # idempotent


@pytest.mark.parametrize("document", ["README.md", "docs/benchmarks.md"])
def test_the_readme_tables_match_the_committed_results(document):
    text = (ROOT / document).read_text()
    assert update_readme.update(text, ROOT / "benchmarks" / "results") == text, \
        "run `python benchmarks/update_readme.py` (make bench does) after changing benchmarks/results"


def test_every_result_has_its_table_in_a_document():
    text = "".join((ROOT / d).read_text() for d in ("README.md", "docs/benchmarks.md"))
    missing = [name for name in update_readme.RENDER if f"<!-- bench:{name} -->" not in text]
    assert not missing, missing
