"""`mobilezoo demo --quick` writes the whole demo report from a real (tiny) training run."""
import json

from mobilezoo.cli import main


def test_demo_quick_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    run = out / "classify"
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "curves.png", "confusion.png"):
        assert (run / name).is_file(), name
    preds = json.loads((run / "predictions.json").read_text())
    assert len(preds) == 10  # one sample image per digit class
    assert {p["file"].split("/")[-2] for p in preds} == {str(d) for d in range(10)}
    report = (out / "report.md").read_text()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{100 * last['val_top1']:.2f}%" in report  # the report quotes the measured accuracy
    assert "classify/confusion.png" in report
