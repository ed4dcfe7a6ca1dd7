"""The searched-vs-random benchmark's own logic: matched-latency draws and the verdict on its goals."""
import importlib.util
from pathlib import Path

import pytest

from mobilezoo.nas import LatencyModel

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("search_vs_random", ROOT / "benchmarks" / "search_vs_random.py")
svr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(svr)
LATENCY_MODEL = ROOT / "benchmarks" / "results" / "latency_model_torch.json"


def test_random_draws_are_matched_in_predicted_latency_and_reproducible():
    lat = LatencyModel.load(LATENCY_MODEL)
    drawn = svr.matched_random(lat, 30.0, 0.1, 8, seed=0)
    assert len(drawn) == 8 and len({tuple(c) for c in drawn}) == 8
    assert all(27.0 <= lat.predict(c) <= 33.0 for c in drawn)
    assert svr.matched_random(lat, 30.0, 0.1, 8, seed=0) == drawn
    assert svr.matched_random(lat, 30.0, 0.1, 8, seed=1) != drawn
    with pytest.raises(SystemExit, match="within 10% of 1.0 ms"):
        svr.matched_random(lat, 1.0, 0.1, 8, seed=0, max_draws=500)


def _row(name, map_, ms):
    return {"name": name, "map": map_, "ap50": map_ + 0.2, "predicted_ms": ms, "measured_ms": ms, "epochs": 12,
            "trained_on": "cpu"}


def test_summary_counts_beaten_architectures_and_checks_the_latency_goal():
    rows = [_row("searched", 0.40, 31.5)] + [_row(f"random_{i}", m, ms) for i, (m, ms) in
                                             enumerate([(0.30, 30), (0.45, 29), (0.39, 36), (0.41, 31)])]
    s = svr.summarize(rows, target_ms=30.0)
    assert (s["beaten"], s["of"], s["goal_beaten_met"]) == (2, 4, False)
    assert s["searched_latency_error"] == pytest.approx(0.05) and s["goal_latency_met"]
    assert s["random_matched"] == 3  # 36 ms is 14% off the searched 31.5 ms
    rows[0]["measured_ms"] = 34.0  # 13% over the target
    assert not svr.summarize(rows, 30.0)["goal_latency_met"]
    meta = {"target_ms": 30.0, "space": "s", "steps": 10, "latency_model": "m.json", "runtime": "torch",
            "threads": 2, "tolerance": 0.1, "recipe": "r"}
    text = svr.format_markdown({"meta": meta, "rows": rows, "summary": s})
    assert "| **searched** | 31.5 | 34.0 | 0.400 |" in text and "beats 2 of 4" in text


def test_merge_keeps_rows_trained_elsewhere_and_refuses_other_settings():
    meta = {"target_ms": 30.0, "steps": 1500, "recipe": "r", "set": []}
    old = {"meta": meta, "rows": [_row("searched", 0.1, 30), _row("random_0", 0.3, 30)]}
    new = {"meta": {**meta, "steps": 800, "search_args": "--samples-per-step 4"}, "rows": [_row("searched", 0.4, 31)]}
    merged = svr.merge(old, new)
    assert [(r["name"], r["map"]) for r in merged["rows"]] == [("searched", 0.4), ("random_0", 0.3)]
    with pytest.raises(SystemExit, match="other settings"):
        svr.merge(old, {**new, "meta": {**meta, "set": ["optim.lr=0.1"]}})


def test_latency_is_the_fastest_of_interleaved_rounds(monkeypatch):
    lat = LatencyModel.load(LATENCY_MODEL)
    calls = iter([30.0, 40.0, 33.0, 28.0, 31.0, 45.0])  # rounds x rows, row order within a round
    monkeypatch.setattr(svr, "measure_latency", lambda *a, **k: next(calls))
    choices = svr.matched_random(lat, 30.0, 0.1, 2, seed=0)
    result = {"rows": [{"name": "searched", "choices": choices[0]}, {"name": "random_0", "choices": choices[1]}]}
    rows = svr.add_latency(result, lat, rounds=3)["rows"]
    assert rows[0]["measured_rounds_ms"] == [30.0, 33.0, 31.0] and rows[0]["measured_ms"] == 30.0
    assert rows[1]["measured_rounds_ms"] == [40.0, 28.0, 45.0] and rows[1]["measured_ms"] == 28.0
