"""End-to-end detector benchmark: rows, ratios and network MACs against published figures."""
import pytest

from mobilezoo.deploy.bench_detect import detector_benchmark, format_markdown

TV = "tv:ssdlite320_mobilenet_v3_large"


def test_detector_rows_and_ratios():
    rows = detector_benchmark(["ssdlite_mobiledet_cpu"], [TV], threads=1, iters=2, rounds=1)
    ours, tv = rows
    assert ours["model"] == "ssdlite_mobiledet_cpu" and tv["model"] == TV
    assert tv["latency_vs_ssdlite320_mobilenet_v3_large"] == pytest.approx(1.0)
    assert ours["latency_vs_ssdlite320_mobilenet_v3_large"] == pytest.approx(
        ours["latency_ms"] / tv["latency_ms"])
    assert 0 < ours["latency_ms"] <= ours["latency_p90_ms"]
    # network MACs at 320: 0.45 G for MobileDet-CPU (TF config), 0.58 G for torchvision's model
    assert ours["network_macs"] / 1e9 == pytest.approx(0.45, rel=0.02)
    assert tv["network_macs"] / 1e9 == pytest.approx(0.58, rel=0.03)
    assert tv["params"] == 3_440_060  # torchvision's documented num_params for this model
    assert len(format_markdown(rows).splitlines()) == 4


def test_rejects_a_classifier():
    with pytest.raises(ValueError, match="tiny_moat_0: not a detector"):
        detector_benchmark(["tiny_moat_0"], [], iters=1, rounds=1)
