"""The memory experiment (benchmarks/revunet_memory.py): real peaks in fresh processes, and the search
on synthetic peaks."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mobilezoo.layers.reversible import ReversibleSequence

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("revunet_memory", ROOT / "benchmarks" / "revunet_memory.py")
revunet_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(revunet_memory)
PLAIN, REVERSIBLE, SEGRESNET = revunet_memory.PLAIN, revunet_memory.REVERSIBLE, revunet_memory.SEGRESNET
_FlopCounter, answer_line = revunet_memory._FlopCounter, revunet_memory.answer_line
build_model, depth_blocks = revunet_memory.build_model, revunet_memory.depth_blocks
find_largest, format_markdown = revunet_memory.find_largest, revunet_memory.format_markdown
interpolated, measure_step = revunet_memory.interpolated, revunet_memory.measure_step
memory_benchmark, recompute_estimate = revunet_memory.memory_benchmark, revunet_memory.recompute_estimate

TINY = dict(channels=(16, 32), threads=1, timeout=120)  # 2 levels: crops divisible by 2


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not hasattr(os, "fork"), reason="needs Linux")
def test_measured_peaks_grow_with_crop_and_stay_flat_in_couplings_when_reversible():
    peak = {}
    for model, crop, m in ((PLAIN, 16, 1), (PLAIN, 24, 1), (PLAIN, 24, 4), (REVERSIBLE, 24, 1), (REVERSIBLE, 24, 4)):
        row = measure_step(model, crop, encoder_blocks=(m, m), decoder_blocks=(m,), **TINY)
        assert row["model"] == model and row["crop"] == crop and row["step_s"] > 0, row
        peak[model, crop, m] = row["peak_mib"]
    # 24^3 holds 3.4x the voxels of 16^3; measured: plain 20 -> 61 MiB
    assert peak[PLAIN, 24, 1] > 2 * peak[PLAIN, 16, 1] > 0, peak
    # at 24^3, measured: reversible 23 -> 26 MiB for 4x the couplings, plain 61 -> 212 MiB
    rev_growth = peak[REVERSIBLE, 24, 4] - peak[REVERSIBLE, 24, 1]
    plain_growth = peak[PLAIN, 24, 4] - peak[PLAIN, 24, 1]
    assert plain_growth > 2 * peak[PLAIN, 24, 1], peak
    assert rev_growth < 0.2 * plain_growth, peak
    assert peak[REVERSIBLE, 24, 1] < peak[PLAIN, 24, 1], peak


def test_a_run_past_its_memory_limit_reports_an_error_instead_of_a_peak():
    row = measure_step(PLAIN, 24, encoder_blocks=(4, 4), decoder_blocks=(4,), limit_mib=5, **TINY)
    # the same configuration peaks at ~210 MiB (test above): the 5 MiB cap stops it at an allocation
    assert row["peak_mib"] is None and "can't allocate memory" in row["error"] and row["limit_mib"] == 5


@pytest.mark.parametrize("n", range(7))
def test_find_largest_returns_the_boundary_from_any_guess(n):
    for boundary in range(-1, n):
        for guess in (None, *range(n)):
            probes = []
            fits = lambda i, probes=probes, boundary=boundary: probes.append(i) or i <= boundary
            assert find_largest(n, fits, guess) == boundary
            assert len(probes) == len(set(probes)) <= 2 + max(1, n).bit_length()
            if guess == boundary and 0 <= boundary < n - 1:
                assert probes == [guess, guess + 1]  # a right guess costs two probes


def fake_measure(model, crop, channels=None, encoder_blocks=None, decoder_blocks=None, limit_mib=None,
                 steps=1, **_):
    """Synthetic peaks: plain 1000 MiB at 128^3 with the default widths and 11 couplings, linear in
    volume, width and couplings; reversible 300 MiB there, same laws; SegResNet 500 MiB."""
    vol = (crop / 128) ** 3
    if model == SEGRESNET:
        peak, row = 500 * vol, {}
    else:
        channels, encoder_blocks, decoder_blocks = (channels or (16, 32, 64, 128), encoder_blocks or (1, 1, 2, 4),
                                                    decoder_blocks or (1, 1, 1))
        n = sum(encoder_blocks) + sum(decoder_blocks)
        peak = (1000 if model == PLAIN else 300) * vol * channels[0] / 16 * n / 11
        row = dict(channels=list(channels), encoder_blocks=list(encoder_blocks), decoder_blocks=list(decoder_blocks))
    row.update(model=model, crop=crop, params=1000, first_step_s=1.0, step_s=1.3 if model == REVERSIBLE else 1.0,
               min_step_s=1.2 if model == REVERSIBLE else 1.0)
    if limit_mib is not None and peak > limit_mib:
        return {**row, "peak_mib": None, "error": "over the limit"}
    return {**row, "peak_mib": peak}


def test_the_question_is_answered_from_the_measurements():
    result = memory_benchmark(ref_crop=128, measure=fake_measure, device="fake", flop_estimate=False)
    a = result["answer"]
    assert a["reference"]["peak_mib"] == pytest.approx(1000)
    # 300 (s/128)^3 <= 1000: s <= 191.6, so 184^3 (2.97x) fits and 192^3 (1012 MiB) does not
    assert a["crop"]["side"] == 184 and a["crop"]["volume_x"] == pytest.approx((184 / 128) ** 3, abs=1e-3)
    assert a["crop"]["next"]["crop"] == 192 and not a["crop"]["largest_tried"]
    # 300 w <= 1000: x3 fits, x4 does not
    assert a["width"]["channels_x"] == 3 and a["width"]["channels"] == [48, 96, 192, 384]
    # 300 n / 11 <= 1000: 33 couplings (x3) fit, 44 (x4) do not
    assert a["depth"]["couplings"] == 33 and a["depth"]["depth_x"] == pytest.approx(3.0)
    assert a["depth"]["encoder_blocks"] == [3, 3, 6, 12] and a["depth"]["next"]["couplings"] == 44
    assert a["beats_paper"] == {"volume": False, "channels": True, "depth": True}
    assert a["segresnet_at_reference"]["peak_mib"] == pytest.approx(500)
    assert result["overhead"]["ratio"] == pytest.approx(1.3) and result["overhead"]["ratio_of_fastest"] == 1.2
    # the synthetic peaks are linear, so the crossing between the last fit and the first failure is exact
    est = interpolated(result)
    assert est["volume_x"] == pytest.approx(10 / 3, abs=0.01) and est["channels_x"] == pytest.approx(10 / 3, abs=0.01)
    assert est["couplings"] == 37 and not any(est["extrapolated"].values())
    # every probe the search measured at the reference crop is a reversible one, and few were needed
    probes = [r for r in result["rows"] if r["purpose"] == "search"]
    assert {r["model"] for r in probes} == {REVERSIBLE} and len(probes) <= 8
    line = answer_line(result)
    assert line == ("At the plain net's 128^3 memory (1,000 MiB) the reversible net fits: crop 184^3 "
                    "(= 2.97x volume), channels x3, couplings x3.00 (33 instead of 11).")
    md = format_markdown(result)
    assert line in md and "Reference crop: 128^3" in md and "1.30x" in md


def test_largest_tried_is_reported_when_everything_fits():
    result = memory_benchmark(ref_crop=64, depths=(1.25, 2), widths=(2,), max_crop=80, measure=_cheap_rev,
                              device="fake", flop_estimate=False)
    a = result["answer"]
    assert a["crop"]["side"] == 80 and a["crop"]["largest_tried"]
    assert a["width"]["channels_x"] == 2 and a["depth"]["couplings"] == 22 and a["depth"]["largest_tried"]
    assert "or more (largest tried)" in answer_line(result)
    # past the largest probe: on the line through the reference (3.75 MiB) and the largest probe; the
    # budget is the plain twin's 125 MiB, so 3.75 w = 125 and 3.75 n / 11 = 125
    est = interpolated(result)
    assert est["extrapolated"] == {"volume": True, "channels": True, "couplings": True}
    assert est["channels_x"] == pytest.approx(100 / 3, abs=0.01) and est["couplings"] == 367


def _cheap_rev(model, crop, **kw):
    """The synthetic law with a reversible net 10x lighter than its twin."""
    row = fake_measure(model, crop, **kw)
    if model == REVERSIBLE and row["peak_mib"] is not None:
        row["peak_mib"] /= 10
    return row


def test_depth_multipliers_round_half_up():
    assert depth_blocks(1) == ((1, 1, 2, 4), (1, 1, 1))
    assert depth_blocks(1.25) == ((1, 1, 3, 5), (1, 1, 1))
    assert depth_blocks(2) == ((2, 2, 4, 8), (2, 2, 2))


def test_recompute_estimate_is_one_extra_forward_of_the_couplings():
    est = recompute_estimate(crop=8)
    model = build_model(REVERSIBLE)
    x = torch.randn(1, 4, 8, 8, 8)
    counted = []

    def count(seq, inputs, output):  # the couplings of this sequence, run once more under the counter
        h = inputs[0]
        with _FlopCounter() as c, torch.no_grad():
            for block in seq.blocks:
                h = block(h)
        counted.append(c.total)

    seqs = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    hooks = [s.register_forward_hook(count) for s in seqs]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(counted) == 7 and est["recompute_gflop"] == pytest.approx(sum(counted) / 1e9, abs=1e-4)
    # 62% of this network's forward FLOPs are in couplings: 1 + 0.62 / 3 = 1.21x, below RevNet's 4/3
    assert 0.5 < est["recompute_fraction"] < 0.7 and est["ratio"] == pytest.approx(1 + est["recompute_fraction"] / 3,
                                                                                    abs=1e-3)
