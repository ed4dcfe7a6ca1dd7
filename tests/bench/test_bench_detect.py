"""The detect suite (end to end): rows, ratios and network MACs against published figures."""
import pytest

from mobilezoo.bench.suites.detect import benchmark, format_markdown
from mobilezoo.errors import UserError

TV = "tv:ssdlite320_mobilenet_v3_large"


def test_detector_rows_and_ratios():
    rows = benchmark(["ssdlite_mobiledet_cpu"], [TV], threads=1, iters=2, rounds=1)
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
    with pytest.raises(UserError, match="tiny_moat_0: not a detect model"):
        benchmark(["tiny_moat_0"], [], iters=1, rounds=1)


def test_rejects_a_peer_of_another_task():
    with pytest.raises(UserError, match="tv:r2plus1d_18: not a detect model"):
        benchmark(["ssdlite_mobiledet_cpu"], ["tv:r2plus1d_18"], iters=1, rounds=1)
