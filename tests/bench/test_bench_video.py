"""The video suite: rows per model and precision, ratios to the eager reference, one-line clip errors."""
import pytest

from mobilezoo.bench.suites import video
from mobilezoo.errors import UserError


def test_rows_carry_latency_peak_fraction_and_the_ratio_to_the_eager_reference():
    rows = video.benchmark(["squeezetime_mini", "eager:squeezetime_mini"], [], clip=(16, 32),
                          threads=1, iters=3, rounds=1)
    got = {(r["model"], r["precision"]): r for r in rows}
    assert set(got) == {("squeezetime_mini", "fp32"), ("squeezetime_mini", "bf16"),
                        ("eager:squeezetime_mini", "fp32")}  # the reference runs as trained: fp32 only
    ref = got[("eager:squeezetime_mini", "fp32")]
    assert ref["source"] == "eager" and ref["latency_vs_reference"] == 1.0
    for r in rows:
        assert (r["frames"], r["side"]) == (16, 32) and r["macs"] == ref["macs"] > 0
        assert r["latency_vs_reference"] == pytest.approx(r["latency_ms"] / ref["latency_ms"], abs=2e-3)
        assert r["gmacs_per_s"] == pytest.approx(r["macs"] / r["latency_ms"] / 1e6, rel=1e-2, abs=0.01)  # rounded
        assert r["peak_fraction"] == pytest.approx(2 * r["gmacs_per_s"] / r["peak_gflops"], rel=0.05, abs=2e-3)
    assert "eager:squeezetime_mini (reference)" in video.format_markdown(rows)


@pytest.mark.parametrize("text", ["16", "16x", "axb", "16x224x224"])
def test_a_bad_clip_names_the_value(text):
    with pytest.raises(UserError, match=text):
        video.parse_clip(text)
