"""The classify suite: one measured row, model specs, ratios against the peer and the Markdown table (fast)."""
import pytest
import torch

from mobilezoo import create_model
from mobilezoo.bench.specs import parse_spec
from mobilezoo.bench.suites.classify import add_ratios, format_markdown, measure
from mobilezoo.errors import UserError

FAST = dict(img_size=64, threads=1, batch=2, warmup=1, iters=3, batch_iters=2)


@pytest.fixture(scope="module")
def row():
    return measure("tiny_moat_0", precision="fp32", **FAST)


def test_measure_row_fields(row):
    params = sum(p.numel() for p in create_model("tiny_moat_0").parameters())
    assert row["name"] == "tiny_moat_0" and row["source"] == "mobilezoo" and row["spec"] == "tiny_moat_0"
    assert row["precision"] == "fp32" and row["img_size"] == 64 and row["threads"] == 1
    assert row["batch"] == 2 and row["latency_runs"] == 3 and row["batch_runs"] == 2
    assert isinstance(row["params"], int) and row["params"] == params
    assert isinstance(row["macs"], int) and row["macs"] > 0
    assert 0 < row["latency_ms"] <= row["latency_p90_ms"]
    assert row["throughput"] > 0
    assert row["gmacs_per_s"] == pytest.approx(row["macs"] * row["throughput"] / 1e9, rel=1e-3, abs=1e-3)
    assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0


def test_measure_restores_threads_and_bf16_runs():
    before = torch.get_num_threads()
    r = measure("tiny_moat_0", precision="bf16", **FAST)
    assert torch.get_num_threads() == before
    assert r["precision"] == "bf16" and r["latency_ms"] > 0


def test_macs_match_a_hand_count_of_a_conv():
    from mobilezoo.deploy.profile import count_macs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(1, 3, 16, 16)) == 8 * 3 * 9 * 16 * 16


def test_parse_specs():
    peer = parse_spec("timm:mobilevit_xs@256")
    assert (peer.name, peer.source, peer.size) == ("mobilevit_xs", "timm", (256, 256))
    assert peer.sample_shape() == (3, 256, 256) and peer.sample_shape(quick=True) == (3, 96, 96)
    assert parse_spec("timm:efficientnet_b0").size is None
    assert parse_spec("timm:coatnet_0_224@224x192").size == (224, 192)
    ours = parse_spec("tiny_moat_0")
    assert (ours.name, ours.source, ours.size, ours.task) == ("tiny_moat_0", "mobilezoo", None, "classify")
    assert peer.task == "classify" and not peer.ours and ours.ours
    assert parse_spec("eager:tiny_moat_0").source == "eager"


@pytest.mark.parametrize("spec", ["timm:no_such_net_xyz", "no_such_moat", "onnx:tiny_moat_0", "tiny_moat_0@"])
def test_unknown_spec_raises_naming_it(spec):
    with pytest.raises(UserError, match=spec):
        parse_spec(spec)
    with pytest.raises(UserError, match=spec):
        measure(spec, **FAST)


def test_a_model_of_another_task_is_refused_naming_it():
    with pytest.raises(UserError, match="ssdlite_mobiledet_cpu: not a classify model"):
        measure("ssdlite_mobiledet_cpu", **FAST)


def _fake(name, source, precision, thr, lat, macs=10**9):
    return {"name": name, "spec": name, "source": source, "precision": precision, "img_size": 224,
            "threads": 2, "batch": 32, "params": 10, "macs": macs, "latency_ms": lat,
            "latency_p90_ms": lat, "throughput": thr, "gmacs_per_s": macs * thr / 1e9,
            "peak_mem_mb": None}


def test_ratios_are_against_the_peer_of_the_same_run_and_precision():
    rows = [_fake("ours", "mobilezoo", "fp32", 100.0, 10.0), _fake("ours", "mobilezoo", "bf16", 200.0, 6.0),
            _fake("peer", "timm", "fp32", 50.0, 20.0), _fake("peer", "timm", "bf16", 50.0, 12.0)]
    add_ratios(rows, ["peer"])
    assert rows[0]["vs_peer"] == {"gmacs_per_s": 2.0, "latency": 0.5}
    assert rows[1]["vs_peer"] == {"gmacs_per_s": 4.0, "latency": 0.5}
    assert rows[0]["bf16_speedup"] == rows[1]["bf16_speedup"] == 2.0
    assert rows[2]["bf16_speedup"] == 1.0 and "vs_peer" not in rows[2]


def test_format_markdown_one_line_per_row(row):
    rows = [row, dict(row, precision="bf16", bf16_speedup=1.9),
            _fake("mobilevit_xs", "timm", "fp32", 50.0, 20.0)]
    lines = format_markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert len({line.count("|") for line in lines}) == 1
    assert "tiny_moat_0" in lines[2] and "1.90x" in lines[3] and "mobilevit_xs (timm)" in lines[4]
