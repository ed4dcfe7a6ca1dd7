"""`mobilezoo demo --quick` writes the whole demo report from a real (tiny) training run."""
import json

from mobilezoo.cli import main


def test_demo_quick_classify_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--task", "classify", "--out", str(out)]) == 0
    run = out / "classify"
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "curves.png", "confusion.png",
                 "predictions.png", "model.onnx"):
        assert (run / name).is_file(), name
    report = (out / "report.md").read_text()
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"top-1 {100 * last['val_top1']:.2f}%" in report  # the report quotes the measured accuracy
    assert "classify/confusion.png" in report and "classify/predictions.png" in report  # links fixed up
    assert "latency.png" in report and (out / "latency.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["classify"]["latency_ms"]) >= {"PyTorch fp32 eager", "ONNX Runtime fp32", "ONNX Runtime int8"}
    int8 = results["classify"]["int8"]  # both ONNX files evaluated on the whole val split
    assert int8["rows"]["fp32"]["count"] == 128 and int8["metric"] == "top1"
    assert f"{int8['rows']['int8']['metric']:.4f} (INT8)" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="classify/predictions.png"' in html


def test_demo_unknown_task_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--task", "segmentation", "--out", str(tmp_path)]) == 2
    assert "segment3d" in capsys.readouterr().err  # the valid names are listed


def test_demo_quick_runs_the_other_tasks_on_their_data(tmp_path, monkeypatch):
    """Every task's quick settings fit its data (the video task's batch once exceeded its subset)."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out)]
    assert main([*args, "--task", "detect", "--task", "segment3d", "--task", "video"]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = {"detect": ("map", 8), "segment3d": ("dice", 2), "video": ("top1", 8)}
    for name, (metric, count) in expected.items():
        int8 = results[name]["int8"]
        assert int8["metric"] == metric and int8["rows"]["fp32"]["count"] == count, name
        assert (out / name / "model.int8.onnx").is_file()
