"""The shared harness: the thread context, the one timing loop, interleaved rounds, statistics, the
Markdown writer, model specs and the CLI's suite selection."""
import pytest
import torch

from mobilezoo.bench.cells import Cell, time_interleaved
from mobilezoo.bench.markdown import Column, table
from mobilezoo.bench.specs import PEERS, parse_spec
from mobilezoo.bench.stats import latency_ms, quantile
from mobilezoo.bench.suites import suite
from mobilezoo.bench.threads import num_threads
from mobilezoo.bench.timing import batch1_latency_ms, interleaved_rounds, share, time_calls
from mobilezoo.cli import main
from mobilezoo.errors import UserError
from mobilezoo.tasks import TASKS


def test_the_thread_context_restores_the_count_even_when_the_body_raises():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with num_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), num_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_time_calls_times_each_call_once():
    calls = []
    times = time_calls(calls.append, "x", 4)
    assert calls == ["x"] * 4 and len(times) == 4 and all(t >= 0 for t in times)
    assert time_calls(calls.append, "y", 0) == [] and len(calls) == 4


def test_interleaved_rounds_alternate_the_order():
    orders = [order for _, order in interleaved_rounds(["a", "b", "c"], 3)]
    assert orders == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


@pytest.mark.parametrize("total, rounds", [(7, 3), (2, 5), (6, 6), (0, 2)])
def test_runs_are_spread_over_the_rounds_without_losing_any(total, rounds):
    shares = [share(total, rounds, i) for i in range(rounds)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_time_interleaved_runs_every_cell_its_count_in_alternating_order():
    log, seen = [], []
    cells = [Cell(lambda x, k=k: seen.append((k, x)), "one", "batch", n1=3, nb=2) for k in "ab"]
    time_interleaved(cells, 2, warm_each_round=True, log=log.append)
    assert [len(c.lat) for c in cells] == [3, 3] and [len(c.bat) for c in cells] == [2, 2]
    # round 1: a then b; round 2: b then a; each chunk starts with one untimed warm-up call
    assert [k for k, _ in seen] == ["a"] * 4 + ["b"] * 4 + ["b"] * 3 + ["a"] * 3
    assert seen[:4] == [("a", "one"), ("a", "one"), ("a", "one"), ("a", "batch")]
    assert log == ["round 1/2 done", "round 2/2 done"]


def test_statistics_are_the_median_and_the_interpolated_percentile_in_ms():
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)
    p50, p90 = latency_ms([0.001, 0.002, 0.003, 0.004, 0.100])
    assert p50 == 3.0 and 4.0 < p90 < 100.0


def test_the_markdown_writer_gives_one_line_per_row_and_aligns_as_asked():
    columns = [Column("name", lambda r: r["n"], "left"), Column("ms", lambda r: f"{r['ms']:.1f}", "right"),
               Column("ok", lambda r: "yes", "center"), Column("note", lambda r: "-")]
    lines = table(columns, [{"n": "a", "ms": 1.25}, {"n": "b", "ms": 2.0}, {"n": "c", "ms": 3.0}]).splitlines()
    assert len(lines) == 2 + 3
    assert lines[0] == "| name | ms | ok | note |" and lines[1] == "|:---|---:|:---:|---|"
    assert lines[2] == "| a | 1.2 | yes | - |"
    assert table(columns, []).count("\n") == 1


def test_batch1_latency_is_the_median_of_timed_runs_after_warm_up():
    calls = []
    ms = batch1_latency_ms(calls.append, 0, runs=5, warmup=2)
    assert len(calls) == 7 and ms >= 0


def test_every_peer_and_our_models_name_their_task_and_input_shape():
    assert set(TASKS) >= {p.task for p in PEERS.values()}
    video = parse_spec("tv:r2plus1d_18")
    assert (video.task, video.sample_shape(), video.sample_shape(quick=True)) == (
        "video", (3, 16, 112, 112), TASKS["video"].inputs.quick_shape)
    ours = parse_spec("squeezetime_mini")
    assert ours.sample_shape() == TASKS["video"].inputs.shape and ours.weight_format == torch.channels_last
    volume = parse_spec("monai:SegResNet")
    assert volume.bf16_autocast and volume.input_format == torch.channels_last_3d
    assert parse_spec("ssdlite_mobiledet_cpu").task == "detect"


@pytest.mark.parametrize("text, sources, message", [
    ("tv:resnet50", None, "tv:resnet50"),
    ("tv:s3d", ("mobilezoo", "timm"), "bad model spec 'tv:s3d'"),
    ("compile:moat_0", ("mobilezoo", "eager", "timm"), "compile:moat_0"),
])
def test_a_spec_outside_the_suite_sources_is_a_user_error_naming_it(text, sources, message):
    with pytest.raises(UserError, match=message):
        parse_spec(text, *([sources] if sources else []))


def test_an_unknown_suite_is_a_one_line_error_naming_it_and_the_suites(capsys):
    with pytest.raises(UserError, match="'memory'.*classify, detect, video, runtimes"):
        suite("memory")
    assert main(["bench", "speed", "tiny_moat_0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "'speed'" in err and "runtimes" in err and "\n" not in err
