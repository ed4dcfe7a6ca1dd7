"""`mobilezoo demo --quick` writes the whole demo report from a real (tiny) training run."""
import json

import pytest

from mobilezoo.cli import main
from mobilezoo.deploy.export import describe_parity as parity_sentence


@pytest.mark.slow  # ~60-110 s since the demo also converts to LiteRT: slow, to keep `make test` under 10 minutes
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
    # OpenVINO (installed by make): timed in fp32 and bf16, its NNCF INT8 file also evaluated
    assert {"OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8"} <= set(results["classify"]["latency_ms"])
    ov = int8["rows"]["OpenVINO int8"]
    assert ov["count"] == 128 and int8["rows"]["OpenVINO bf16"]["metric"] is None
    assert f"OpenVINO INT8 (NNCF, `model.openvino-int8.xml`): top1 {ov['metric']:.4f}" in report
    assert (run / "model.openvino-int8.xml").is_file()
    # LiteRT (installed by make): fp32 timed, its full-integer INT8 file evaluated
    assert {"LiteRT fp32", "LiteRT int8"} <= set(results["classify"]["latency_ms"])
    lite = int8["rows"]["LiteRT int8"]
    assert lite["count"] == 128 and int8["rows"]["LiteRT fp32"]["metric"] is None
    assert f"LiteRT INT8 (full-integer, `model.int8.tflite`): top1 {lite['metric']:.4f}" in report
    assert (run / "model.tflite").is_file() and (run / "model.int8.tflite").is_file()
    onnx_line = next(ln for ln in report.splitlines() if ln.startswith("ONNX export"))
    parity = results["classify"]["onnx_parity"]
    assert "{" not in onnx_line and "passed" in onnx_line  # a sentence, not a printed dict
    assert f"{parity['max_abs_diff']:.1e}" in onnx_line
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="classify/predictions.png"' in html


def test_demo_unknown_task_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--task", "segmentation", "--out", str(tmp_path)]) == 2
    assert "segment3d" in capsys.readouterr().err  # the valid names are listed


@pytest.mark.slow  # ~90 s: four tasks trained, exported, quantized and timed
def test_demo_quick_runs_the_other_tasks_on_their_data(tmp_path, monkeypatch):
    """Every task's quick settings fit its data (the video task's batch once exceeded its subset), and the
    detector's lane trains side by side with the other sections' lane."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out)]
    assert main([*args, "--task", "segment", "--task", "detect", "--task", "segment3d", "--task", "video"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["detect", "segment", "segment3d", "video"]  # the report in the demo's order
    expected = {"detect": ("map", 8), "segment": ("miou", 4), "segment3d": ("dice", 2), "video": ("top1", 8)}
    for name, (metric, count) in expected.items():
        int8 = results[name]["int8"]
        assert int8["metric"] == metric and int8["rows"]["fp32"]["count"] == count, name
        assert (out / name / "model.int8.onnx").is_file()
    detect, first_other = results["detect"]["trained_from_to_s"], results["segment"]["trained_from_to_s"]
    assert detect[0] < first_other[1] and first_other[0] < detect[1]  # trained at the same time
    other = [results[n]["trained_from_to_s"] for n in ("segment", "segment3d", "video")]
    assert all(a[1] <= b[0] for a, b in zip(other, other[1:]))  # one lane: one after another
    assert "2 lanes side by side" in (out / "report.md").read_text() and "detect; segment, segment3d, video" in \
        (out / "report.md").read_text()


def test_demo_error_in_a_lane_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A section that fails in its lane's process stops the demo with its one-line error, not a traceback."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "detect").write_text("a file where the detector's run folder goes")
    assert main(["demo", "--quick", "--out", str(out), "--task", "detect", "--task", "video"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilezoo demo: error:") and str(out / "detect") in err and "\n" not in err
    assert not (out / "report.md").exists()


def test_parity_sentence_of_a_network():
    text = parity_sentence({"task": "classify", "samples": 2, "max_abs_diff": 3.1e-06,
                            "max_abs_output": 12.5, "tolerance": 0.0001125})
    assert "{" not in text and "'" not in text
    assert "2 real inputs" in text and "3.1e-06" in text and "1.1e-04" in text and "passed" in text


@pytest.mark.parametrize("compared", [23, 0])
def test_parity_sentence_of_a_detector(compared):
    parity = {"task": "detect", "mode": "raw", "samples": 1, "max_abs_diff": 2.0e-05, "max_abs_output": 40.0,
              "tolerance": 0.00014, "compared": compared, "matched": 1.0,
              "min_iou": 0.99991 if compared else None, "max_score_diff": 4e-07 if compared else None,
              "score_thresh": 0.05}
    text = parity_sentence(parity)
    assert "{" not in text and "None" not in text
    assert "1 real image:" in text and "2.0e-05" in text
    if compared:
        assert "all 23 detections" in text and "0.9999" in text
    else:
        assert "none were compared" in text


def test_parity_sentence_when_unchecked():
    assert "not checked" in parity_sentence(None)
