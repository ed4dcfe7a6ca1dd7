"""Latency cost model: exact recovery of a known linear latency function, save/load, reports."""
import json
import random

import numpy as np
import pytest

from mobilezoo.errors import UserError
from mobilezoo.nas.latency import LatencyModel, analytic, features, fit_report, plot_fit, position_options
from mobilezoo.nas.space import Block, SearchSpace, canonical, layer_plan, sample

SMALL = SearchSpace("small", ("ibn", "fused"), (0.5, 1.0),
                    skeleton=(Block(2, 1, 16), Block(1, 1, 16), Block(2, 2, 24), Block(2, 2, 32),
                              Block(1, 1, 48), Block(2, 2, 64), Block(2, 1, 80), Block(1, 1, 96)))


def _true_latency(space, seed):
    """A random linear function of the one-hot (op, in width, out width) features of each layer."""
    rng = np.random.default_rng(seed)
    tables = [{f: float(rng.uniform(0.1, 3.0)) for f in opts} for opts in position_options(space)]

    def latency(choices):
        plan = layer_plan(space, canonical(space, choices))
        return 4.0 + sum(t[(p["op"], p["in"], p["out"])] for t, p in zip(tables, plan))
    return latency


def test_recovers_a_known_linear_latency_function_exactly():
    f = _true_latency(SMALL, 0)
    rng = random.Random(1)
    train = [sample(SMALL, rng) for _ in range(600)]
    test = [sample(SMALL, rng) for _ in range(40)]
    model = LatencyModel.fit(SMALL, train, [f(c) for c in train], ridge=0)
    err = max(abs(model.predict(c) - f(c)) for c in test)
    assert err < 1e-8


def test_ridge_fit_is_close_with_few_samples_and_round_trips(tmp_path):
    # A MAC-driven latency (different per-op speeds, per-conv overhead) plus small per-layer quirks:
    # fewer measurements than one-hot features, yet the fit generalises.
    quirks = _true_latency(SMALL, 2)
    speed = np.array([3.0, 5.0, 9.0, 0.7, 0.4])

    def f(c):
        cost = sum(analytic(SMALL, p, x, 320) for p, x in enumerate(features(SMALL, c)))
        return float(cost @ speed) + 0.05 * quirks(c)
    rng = random.Random(3)
    train = [sample(SMALL, rng) for _ in range(150)]
    test = [sample(SMALL, rng) for _ in range(40)]
    model = LatencyModel.fit(SMALL, train, [f(c) for c in train], ridge="auto")
    rep = fit_report([f(c) for c in test], [model.predict(c) for c in test])
    assert rep["r2"] > 0.95 and rep["mae_pct"] < 5
    path = model.save(tmp_path / "lat.json")
    again = LatencyModel.load(path)
    assert [again.predict(c) for c in test] == [model.predict(c) for c in test]


def test_fit_report_and_plot(tmp_path):
    rep = fit_report([10.0, 20.0, 30.0], [12.0, 20.0, 28.0])
    assert rep["r2"] == pytest.approx(1 - 8 / 200) and rep["mae_ms"] == pytest.approx(4 / 3)
    assert rep["mae_pct"] == pytest.approx(100 * (4 / 3) / 20)
    png = plot_fit([1, 2], [1.1, 2.1], [3], [2.9], tmp_path / "fit.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_model_files_name_the_problem(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match="cannot read latency model"):
        LatencyModel.load(p)
    p.write_text(json.dumps({"format": "mobilezoo-latency-model-1", "space": SMALL.to_dict(), "tables": []}))
    with pytest.raises(UserError, match="'intercept_ms'"):
        LatencyModel.load(p)
    p.write_text(json.dumps({"format": "mobilezoo-latency-model-1", "space": SMALL.to_dict(),
                             "intercept_ms": 1.0, "tables": [{}]}))
    with pytest.raises(UserError, match="1 layer tables"):
        LatencyModel.load(p)


def test_onnxruntime_latency_times_the_same_network_as_torch():
    """The ORT runner's graph computes the detector network of the architecture (its raw outputs)."""
    import torch

    from mobilezoo.models.ssdlite import ssdlite_mobiledet
    from mobilezoo.nas.latency import _ort_runner, measure_latency
    from mobilezoo.nas.space import get_space, to_arch
    space = get_space("ibn_fused_tucker")
    arch = to_arch(space, sample(space, random.Random(3)))
    torch.manual_seed(0)
    model = ssdlite_mobiledet(arch, num_classes=90).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        boxes, logits, _ = model.head_outputs(x)
        ort_boxes, ort_logits = _ort_runner(model, x, threads=1)()
    np.testing.assert_allclose(ort_boxes, boxes.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_logits, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert measure_latency(arch, "onnxruntime", threads=1, size=96, iters=2, warmup=1) > 0
