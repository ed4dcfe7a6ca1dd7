"""The runtimes suite: every runtime and family in one table, fields, ratios and goal verdicts."""
import json

import pytest

from mobilezoo.bench.suites import runtimes as br
from mobilezoo.cli import main
from mobilezoo.tasks import TASKS

FIELDS = {"model", "family", "source", "runtime", "input", "batch", "params", "macs", "latency_ms",
          "latency_p90_ms", "throughput", "peak_mem_mb", "gmacs_per_s", "peak_fraction"}
FAST = dict(quick=True, iters=2, batch_iters=1, rounds=1)
# Compiling costs ~20 s a cell, converting to LiteRT ~30 s a model (tests/deploy/test_litert.py has its cells).
UNCOMPILED = tuple(rt for rt in br.RUNTIMES if rt not in br.COMPILED and rt not in br.LITERT)


@pytest.fixture(scope="module")
def classifier_result():
    return br.benchmark(["tiny_moat_0"], ["timm:efficientnet_b0"], UNCOMPILED, threads=1, **FAST)


def test_every_runtime_of_ours_and_the_peer_runtimes_have_every_field(classifier_result):
    rows = classifier_result["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        *[("tiny_moat_0", rt) for rt in UNCOMPILED],
        ("timm:efficientnet_b0", "fp32"), ("timm:efficientnet_b0", "bf16")]
    peak = classifier_result["meta"]["matmul_peak_gflops_fp32"]
    assert peak > 1
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["latency_ms"] > 0 and r["throughput"] > 0
        assert r["gmacs_per_s"] == pytest.approx(r["macs"] * r["throughput"] / 1e9, rel=1e-2)
        assert r["peak_fraction"] == pytest.approx(2 * r["gmacs_per_s"] / peak, rel=2e-2)
    ours = [r for r in rows if r["source"] == "mobilezoo"]
    assert len({r["macs"] for r in ours}) == 1  # every runtime is credited with the network's MACs
    assert ours[0]["input"] == list(TASKS["classify"].inputs.quick_shape)
    summary, = classifier_result["summary"]
    assert summary["model"] == "tiny_moat_0"
    best = min(ours, key=lambda r: r["latency_ms"])
    assert summary["best_runtime"] == best["runtime"]
    eager = next(r for r in ours if r["runtime"] == "eager")
    assert summary["speedup_vs_eager"] == pytest.approx(eager["latency_ms"] / best["latency_ms"], rel=1e-3)
    assert "vs_timm:efficientnet_b0" in summary
    assert classifier_result["skipped"] == []


def test_summary_picks_the_fastest_runtime_and_judges_the_goal():
    def row(model, runtime, ms, family="classify", source="mobilezoo"):
        return {"model": model, "runtime": runtime, "latency_ms": ms, "family": family, "source": source}
    rows = [row("a", "eager", 30.0), row("a", "fp32", 25.0), row("a", "int8", 15.0),
            row("b", "eager", 10.0), row("b", "bf16", 8.0),
            row("p", "fp32", 45.0, source="timm"), row("p", "bf16", 60.0, source="timm"),
            row("d", "fp32", 5.0, family="detect", source="tv")]
    a, b = br.summarize(rows)
    assert (a["best_runtime"], a["speedup_vs_eager"], a["goal_met"]) == ("int8", 2.0, True)
    assert (b["best_runtime"], b["speedup_vs_eager"], b["goal_met"]) == ("bf16", 1.25, False)
    assert a["vs_p"] == 3.0 and "vs_d" not in a  # peers of the same family only, peer best / ours
    # The low-precision goal: best of bf16 / INT8 / OpenVINO bf16, INT8 against the best fp32 runtime
    assert (a["best_low_precision"], a["best_fp32"], a["low_precision_speedup"]) == ("int8", "fp32", round(25 / 15, 3))
    assert a["low_precision_goal_met"] is False
    assert (b["best_low_precision"], b["low_precision_speedup"]) == ("bf16", 1.25)
    c, = br.summarize([row("c", "ov-fp32", 10.0), row("c", "ort", 12.0), row("c", "ov-int8", 4.0),
                       row("c", "ov-bf16", 5.0)])
    assert (c["best_low_precision"], c["best_fp32"], c["low_precision_speedup"]) == ("ov-int8", "ov-fp32", 2.5)
    assert c["low_precision_goal_met"] is True
    text = br.table(br.SUMMARY_COLUMNS, [a, c])
    assert "1.67x NOT met (ORT INT8 vs PyTorch fp32)" in text and "2.50x met (OpenVINO INT8 vs OpenVINO fp32)" in text


def test_markdown_has_a_line_per_row_a_summary_line_per_model_and_names_skipped_runtimes(classifier_result):
    result = {**classifier_result, "skipped": [{"model": "x", "runtime": "int8", "reason": "quantization failed: y"}]}
    text = br.format_markdown(result)
    assert sum(line.startswith("| tiny_moat_0 |") for line in text.splitlines()) == len(UNCOMPILED) + 1
    assert "ORT INT8" in text and "(timm)" in text
    assert "Not run: x with ORT INT8: quantization failed: y" in text


def test_every_family_runs_in_pytorch_and_onnx_runtime():
    result = br.benchmark(["ssdlite_mobiledet_cpu", "squeezetime_mini", "revunet3d"],
                          ["tv:ssdlite320_mobilenet_v3_large", "monai:SegResNet"], ("eager", "ort"), threads=1, **FAST)
    got = {(r["model"], r["runtime"]): r for r in result["rows"]}
    for m in ("ssdlite_mobiledet_cpu", "squeezetime_mini", "revunet3d"):
        assert {(m, "eager"), (m, "ort")} <= set(got)
        assert got[(m, "eager")]["macs"] > 0
    assert got[("revunet3d", "ort")]["input"] == list(TASKS["segment3d"].inputs.quick_shape)
    assert got[("squeezetime_mini", "ort")]["family"] == "video"
    assert {s["model"] for s in result["summary"]} == {"ssdlite_mobiledet_cpu", "squeezetime_mini", "revunet3d"}
    assert "vs_monai:SegResNet" in next(s for s in result["summary"] if s["model"] == "revunet3d")


def test_the_suite_has_a_model_of_every_task():
    from mobilezoo.models import get_entry
    assert {get_entry(m).task for m in br.SUITE} == set(TASKS)
    assert "deeplabv3plus" in br.SUITE and "ssdlite" not in br.SUITE  # SSDLite-tiny-MOAT: `bench detect`


@pytest.mark.slow  # exports, three INT8 calibrations and the timing of DeepLabv3+ take ~55 s on 2 cores
def test_segmenter_runs_in_every_runtime_at_its_fixed_size():
    # Calibrated at the graph's own size: MOAT's relative-position attention does not export with dynamic sides.
    result = br.benchmark(["deeplabv3plus"], [], UNCOMPILED, threads=1, **FAST)
    rows = {r["runtime"]: r for r in result["rows"]}
    assert result["skipped"] == [] and set(rows) == set(UNCOMPILED)
    assert rows["int8"]["input"] == list(TASKS["segment"].inputs.quick_shape) and rows["int8"]["family"] == "segment"
    assert len({r["macs"] for r in rows.values()}) == 1 and rows["eager"]["macs"] > 0


def test_the_cli_writes_the_result_as_json(tmp_path):
    out = tmp_path / "runtimes.json"
    assert main(["bench", "runtimes", "tiny_moat_0", "--runtimes", "fp32", "--quick", "--threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["model"], r["runtime"]) for r in result["rows"]] == [("tiny_moat_0", "fp32")]
    assert result["meta"]["quick"] and result["summary"][0]["best_runtime"] == "fp32"
    assert result["meta"]["processes"] == 1  # timed in a process of its own


@pytest.mark.parametrize("argv, message", [
    (["bench", "runtimes", "tiny_moat_9", "--runtimes", "fp32"], "tiny_moat_9"),
    (["bench", "runtimes", "tiny_moat_0", "--runtimes", "fp32", "--vs", "tv:resnet50"], "tv:resnet50"),
    (["bench", "runtimes", "tiny_moat_0", "--runtimes", "fp32", "--vs", "timm:nonexistent_net"], "nonexistent_net"),
    (["bench", "memory", "revunet3d"], "'memory'"),
    (["bench", "tiny_moat_0", "--vs", "timm:efficientnet_b0"], "'tiny_moat_0'"),  # the suite comes first
    (["bench", "detect"], "name at least one model"),
])
def test_bad_model_or_peer_is_a_one_line_error(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_suite_runs_a_process_per_model_with_the_peers_of_its_family():
    groups = br.groups_by_model(["tiny_moat_0", "ssdlite_mobiledet_cpu", "tiny_moat_1"],
                                ["timm:efficientnet_b0", "tv:ssdlite320_mobilenet_v3_large", "timm:coatnet_0_224"])
    assert groups == [(["tiny_moat_0"], ["timm:efficientnet_b0", "timm:coatnet_0_224"]),
                      (["ssdlite_mobiledet_cpu"], ["tv:ssdlite320_mobilenet_v3_large"]), (["tiny_moat_1"], [])]
    row = {"model": "a", "runtime": "fp32", "latency_ms": 2.0, "family": "classify", "source": "mobilezoo",
           "gmacs_per_s": 11.0, "peak_fraction": 0.0}
    parts = [{"meta": {"threads": 2, "matmul_peak_gflops_fp32": g}, "rows": [{**row, "model": m}],
              "skipped": [{"model": m, "runtime": "int8", "reason": "r"}]} for m, g in (("a", 100.0), ("b", 120.0))]
    merged = br.merge_results(parts)
    assert [r["model"] for r in merged["rows"]] == ["a", "b"] and [s["model"] for s in merged["summary"]] == ["a", "b"]
    assert merged["meta"]["matmul_peak_gflops_fp32"] == 110.0 and merged["meta"]["processes"] == 2
    assert [r["peak_fraction"] for r in merged["rows"]] == [0.2, 0.2]  # 2 x 11 GMAC/s of the one 110 GFLOP/s peak
    assert [k["model"] for k in merged["skipped"]] == ["a", "b"]


def test_an_error_in_a_models_process_reaches_the_user_as_one_line():
    from mobilezoo.errors import UserError
    with pytest.raises(UserError, match="unknown runtime 'nope'"):
        br.benchmark_in_processes([(["tiny_moat_0"], [])], ["nope"], threads=1, quick=True)
