"""runtimes suite: one table for every family and runtime, with the peers in the same run.

Runtimes (each model runs in every one that applies):
  eager   PyTorch fp32, the model as trained (unfused, contiguous): the reference
  fp32    PyTorch fp32 as deployed: `fuse_for_inference` (BN folded, activations and SE gates fused)
  bf16    the same with bfloat16 weights on bfloat16 inputs (where the task says so, e.g. 3-D volumes:
          under `torch.autocast`, which keeps the reversible sequences in fp32)
  compile, compile-bf16
          PyTorch fp32 / bf16 compiled by `compile_for_inference` (TorchInductor with frozen weights),
          compiled for both input shapes before anything is timed
  ort     ONNX Runtime fp32 on the `export_onnx` graph (parity with PyTorch checked at export)
  int8    ONNX Runtime on the static INT8 (QDQ) file from `quantize_int8`, calibrated here on random
          inputs: the speed of the quantized graph; the accuracy change is measured on the task's
          own data by `mobilezoo export --int8 --calib-data ...` (and in the demo)
  ov-fp32, ov-bf16, ov-int8
          OpenVINO on the same ONNX graph with the precision hint set, and on the NNCF INT8 file
          (`quantize_openvino_int8`, calibrated here on random inputs; accuracy: `export --openvino-int8`)
  litert, litert-int8
          LiteRT's interpreter (XNNPACK) on the `export_tflite` file (batch 1, run sample by sample) and
          on its full-integer INT8 (`quantize_tflite_int8`, calibrated here on random inputs; accuracy:
          `export --tflite --int8`); 3-D models have no LiteRT form and are listed as not run
Peers run in PyTorch fp32 and bf16 (and compiled, when those runtimes are asked for), as their libraries
build them: timm:NAME[@SIZE], tv:NAME, monai:SegResNet (see `bench.specs.PEERS`).

Per row: batch-1 latency (median and p90), throughput at the task's batch, peak memory (rise of the
process RSS high-water mark during the first batch forward; ONNX Runtime runs without its memory arena
here, so its activations are allocated and freed per run as PyTorch's are), achieved GMAC/s (MACs of
the unfused network x throughput) and its fraction of this machine's fp32 matrix-multiply peak,
measured in the same run. Each model is timed as its task's `network` (detectors: up to the raw box and
class outputs, as their INT8 graph is; `mobilezoo bench detect` times them end to end). Models are
timed one after another, each model's runtimes interleaved over the rounds so that noise hits them
alike (the low-precision goal compares runtimes of one model); from the command line each model (with
the peers of its family) runs in a process of its own, so memory holds one model's runtimes at a time.
"""
from __future__ import annotations

import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ...deploy.profile import count_macs, count_params
from ...errors import UserError
from ..cells import Cell, bf16_cell_parts, inference, time_interleaved
from ..markdown import Column, table
from ..memory import peak_rss_delta_mb, proc_status_kb
from ..specs import Spec, parse_specs
from ..stats import latency_ms, median
from ..threads import num_threads
from ..timing import matmul_peak_gflops, time_calls

RUNTIMES = ("eager", "fp32", "bf16", "compile", "compile-bf16", "ort", "int8", "ov-fp32", "ov-bf16", "ov-int8",
            "litert", "litert-int8")
LABELS = {"eager": "PyTorch fp32 eager", "fp32": "PyTorch fp32", "bf16": "PyTorch bf16",
          "compile": "PyTorch compiled fp32", "compile-bf16": "PyTorch compiled bf16",
          "ort": "ORT fp32", "int8": "ORT INT8", "ov-fp32": "OpenVINO fp32", "ov-bf16": "OpenVINO bf16",
          "ov-int8": "OpenVINO INT8", "litert": "LiteRT fp32", "litert-int8": "LiteRT INT8"}
LOW_PRECISION = ("bf16", "compile-bf16", "int8", "ov-bf16", "ov-int8", "litert-int8")
OPENVINO = {"ov-fp32": "fp32", "ov-bf16": "bf16", "ov-int8": "int8"}
COMPILED = {"compile": torch.float32, "compile-bf16": torch.bfloat16}
LITERT = ("litert", "litert-int8")
SOURCES = ("mobilezoo", "timm", "tv", "monai")
# One or more models of every task. SSDLite on tiny-MOAT-0 (`ssdlite`) is timed by `bench detect` (end to
# end, with the MobileDets) rather than here, where each model costs 2-3 minutes with all its runtimes.
SUITE = ["tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3", "moat_0", "ssdlite_mobiledet_cpu",
         "ssdlite_mobiledet_dsp", "ssdlite_mobiledet_edgetpu", "ssdlite_mobiledet_gpu", "deeplabv3plus", "squeezetime",
         "revunet3d"]
SUITE_PEERS = ["timm:efficientnet_b0", "timm:mobilevit_xs@256", "timm:coatnet_0_224",
               "tv:ssdlite320_mobilenet_v3_large", "tv:r2plus1d_18", "monai:SegResNet"]
GOAL_SPEEDUP = 1.5  # every model's best runtime vs PyTorch fp32 eager, batch-1 latency
GOAL_LOW_PRECISION = 2.0  # every model's best low-precision runtime vs its best fp32 runtime
CALIBRATION_SIDE = 32  # INT8 calibration crops of fully convolutional models (see _ort_cells)


def _inputs(shape, batch: int, fmt=torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(1, *shape).contiguous(memory_format=fmt),
            torch.randn(batch, *shape).contiguous(memory_format=fmt))


def _cell(spec: Spec, runtime: str, run, x1, xb, base: dict) -> Cell:
    return Cell(run, x1, xb, info={"model": spec.text, "runtime": runtime, **base})


def _cells_for(spec: Spec, runtimes, threads: int, quick: bool, tmp: Path, log, skipped: list) -> list[Cell]:
    task = spec.task_class
    shape, batch = spec.sample_shape(quick), task.inputs.batch_size(quick)
    model = spec.build(shape)
    x1, xb = _inputs(shape, batch)
    base = dict(family=spec.task, source=spec.source, params=count_params(model),
                macs=count_macs(spec.network(model), x1), batch=batch)
    if spec.peer:
        run, bx1, bxb = bf16_cell_parts(model, spec.network, x1, xb, spec.bf16_autocast)
        cells = [_cell(spec, "fp32", inference(spec.network(model)), x1, xb, base),
                 _cell(spec, "bf16", run, bx1, bxb, base)]
        if set(COMPILED) & set(runtimes):
            cells += _compiled_cells(spec, model, x1, xb, runtimes, base, log, skipped)
        return cells
    cells = []
    if "eager" in runtimes:
        cells.append(_cell(spec, "eager", inference(spec.network(model)), x1, xb, base))
    if {"fp32", "bf16"} & set(runtimes):
        from ...layers.fuse import fuse_for_inference
        fused = fuse_for_inference(model).to(memory_format=spec.weight_format)
        cx1, cxb = _inputs(shape, batch, spec.input_format)
        if "fp32" in runtimes:
            cells.append(_cell(spec, "fp32", inference(spec.network(fused)), cx1, cxb, base))
        if "bf16" in runtimes:
            cells.append(_cell(spec, "bf16", *bf16_cell_parts(fused, spec.network, cx1, cxb, spec.bf16_autocast),
                               base))
    if set(COMPILED) & set(runtimes):
        cells += _compiled_cells(spec, model, x1, xb, runtimes, base, log, skipped)
    if {"ort", "int8", *OPENVINO} & set(runtimes):
        cells += _ort_cells(spec, model, shape, batch, runtimes, threads, tmp, base, log, skipped)
    if set(LITERT) & set(runtimes):
        cells += _litert_cells(spec, model, shape, batch, runtimes, threads, tmp, base, log, skipped)
    return cells


def _compiled_cells(spec: Spec, model, x1, xb, runtimes, base: dict, log, skipped: list) -> list[Cell]:
    """`compile` / `compile-bf16` cells, compiled here for both input shapes (a failure is recorded in
    `skipped`). A spec whose bf16 runs under autocast runs the fp32-compiled graph under autocast."""
    from ...deploy.compiled import compile_for_inference
    cells = []
    for rt, dtype in COMPILED.items():
        if rt not in runtimes:
            continue
        log(f"compile {spec.text} ({rt})")
        autocast = spec.bf16_autocast and dtype == torch.bfloat16
        cast = None if autocast else dtype
        try:
            fmt = spec.input_format  # weights and inputs as in the fp32 cell
            net = compile_for_inference(model, cast, None if fmt == torch.contiguous_format else fmt, spec.network)
            run = inference(net, bf16_autocast=autocast)
            cx1, cxb = (x.to(cast or x.dtype).contiguous(memory_format=fmt) for x in (x1, xb))
            run(cx1), run(cxb)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other runtimes still run
            skipped.append({"model": spec.text, "runtime": rt, "reason": f"compile failed: {e}"})
            continue
        cells.append(_cell(spec, rt, run, cx1, cxb, base))
    return cells


def _ort_cells(spec: Spec, model, shape, batch: int, runtimes, threads: int, tmp: Path, base: dict, log,
               skipped: list) -> list[Cell]:
    """ONNX Runtime and OpenVINO cells on one export; a failed export or quantization is recorded in `skipped`."""
    from ...deploy.export import export_onnx
    from ...deploy.ort import OrtModel
    from ...deploy.quantize import quantize_int8
    task = spec.task_class
    x1, xb = (np.random.randn(b, *shape).astype(np.float32) for b in (1, batch))
    fp32 = tmp / f"{Path(spec.text).stem}.onnx"
    log(f"export {spec.text} to ONNX")
    # Fully convolutional models: a graph with dynamic sides, so INT8 calibration runs on small crops
    # (ORT's calibrator keeps every intermediate tensor: at 128^3 that is more memory than this machine has).
    dynamic = task.fully_convolutional
    calib_shape = (shape[0], *(min(s, CALIBRATION_SIDE) for s in shape[1:])) if dynamic else shape
    example_batch = 2 if batch > 1 else 1
    try:
        export_onnx(model, torch.randn(example_batch, *shape), fp32, task, mode=task.int8_mode,
                    dynamic_batch=batch > 1, dynamic_spatial=dynamic, threads=threads)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other runtimes still run
        skipped += [{"model": spec.text, "runtime": rt, "reason": f"export failed: {e}"}
                    for rt in ("ort", "int8", *OPENVINO) if rt in runtimes]
        return []
    paths = {"ort": fp32}
    if "int8" in runtimes:
        log(f"quantize {spec.text} to INT8")
        try:
            paths["int8"] = quantize_int8(fp32, tmp / f"{Path(spec.text).stem}.int8.onnx",
                                          [torch.randn(example_batch, *calib_shape) for _ in range(4)])
        except Exception as e:  # noqa: BLE001
            skipped.append({"model": spec.text, "runtime": "int8", "reason": f"quantization failed: {e}"})
    cells = []
    for rt, path in paths.items():
        if rt in runtimes:
            session = OrtModel(path, threads=threads, arena=False)  # ~60 sessions and models share the RAM
            cells.append(_cell(spec, rt, session.run, x1, xb, base))
    calibration = [torch.randn(example_batch, *calib_shape) for _ in range(4)]
    for rt in (r for r in OPENVINO if r in runtimes):
        try:
            cells.append(_cell(spec, rt, _openvino_model(spec, fp32, OPENVINO[rt], calibration, threads).run,
                               x1, xb, base))
        except Exception as e:  # noqa: BLE001 - OpenVINO missing, or a graph it cannot take: reported
            skipped.append({"model": spec.text, "runtime": rt, "reason": f"OpenVINO: {e}"})
    return cells


def _litert_cells(spec: Spec, model, shape, batch: int, runtimes, threads: int, tmp: Path, base: dict, log,
                  skipped: list) -> list[Cell]:
    """LiteRT fp32 / INT8 cells on one conversion; a model LiteRT cannot take, or a failed conversion or
    quantization, is recorded in `skipped`."""
    from ...deploy.litert import LiteRTModel, export_tflite, quantize_tflite_int8, refusal
    wanted = [rt for rt in LITERT if rt in runtimes]
    why = refusal(spec.task_class)
    if why:
        skipped += [{"model": spec.text, "runtime": rt, "reason": why} for rt in wanted]
        return []
    fp32 = tmp / f"{Path(spec.text).stem}.tflite"
    log(f"convert {spec.text} to LiteRT")
    try:
        export_tflite(model, torch.randn(1, *shape), fp32, spec.task_class, threads=threads)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other runtimes still run
        skipped += [{"model": spec.text, "runtime": rt, "reason": f"LiteRT conversion failed: {e}"} for rt in wanted]
        return []
    paths = {"litert": fp32}
    if "litert-int8" in runtimes:
        log(f"quantize {spec.text} to LiteRT INT8")
        try:
            paths["litert-int8"] = quantize_tflite_int8(fp32, tmp / f"{Path(spec.text).stem}.int8.tflite",
                                                        [torch.randn(4, *shape)], threads=threads)
        except Exception as e:  # noqa: BLE001
            skipped.append({"model": spec.text, "runtime": "litert-int8", "reason": f"quantization failed: {e}"})
    x1, xb = (np.random.randn(b, *shape).astype(np.float32) for b in (1, batch))
    return [_cell(spec, rt, LiteRTModel(path, threads=threads).run, x1, xb, base)
            for rt, path in paths.items() if rt in runtimes]


def _openvino_model(spec: Spec, onnx_path: Path, precision: str, calibration, threads: int):
    """OpenVINO on the export at `precision`; INT8 quantizes it by NNCF first (with the task's settings)."""
    from ...deploy.openvino import OpenVinoModel, int8_path, quantize_openvino_int8
    if precision == "int8":
        onnx_path = quantize_openvino_int8(onnx_path, int8_path(onnx_path), calibration,
                                           spec.task_class.openvino_int8_options())
    return OpenVinoModel(onnx_path, precision, threads=threads)


def benchmark(models: Sequence[str], peers: Sequence[str] = (), runtimes: Sequence[str] = RUNTIMES,
              threads: int = 2, quick: bool = False, iters: int = 20, batch_iters: int = 3, rounds: int = 4,
              budget_s: float = 8.0, log: Callable[[str], None] | None = None,
              pause: Callable[[], None] | None = None) -> dict:
    """Build the (model, runtime) cells of each model in turn and time them interleaved; returns
    {"meta", "rows", "summary", "skipped"}. Each cell gets `iters` batch-1 and `batch_iters` batch runs
    (fewer for cells slower than `budget_s` seconds in all, at least 3 and 1) spread over `rounds`."""
    log = log or (lambda msg: None)
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise UserError(f"unknown runtime {bad[0]!r}; expected some of {', '.join(RUNTIMES)}")
    specs = parse_specs([*models, *peers], SOURCES)
    rows, skipped = [], []
    with num_threads(threads), tempfile.TemporaryDirectory(prefix="mobilezoo_bench_") as tmp:
        peak = matmul_peak_gflops()
        rounds = max(1, min(rounds, iters, batch_iters))
        # One model at a time: its runtimes are timed interleaved, then freed. All models at once held
        # every compiled copy, session and interpreter together (over 20 GiB for the suite).
        for spec in specs:
            log(f"build {spec.text}")
            cells = _cells_for(spec, runtimes, threads, quick, Path(tmp), log, skipped)
            for c in cells:  # first batch forward: memory before any warm-up grows the caches
                c.info["peak_mem_mb"] = peak_rss_delta_mb(lambda c=c: c.run(c.xb))
            log(f"  resident set now {proc_status_kb('VmRSS') / 2**20:.1f} GiB")
            for c in cells:
                log(f"warm up {c.info['model']} {c.info['runtime']}")
                c.run(c.x1)
                # Slow cells (a 128^3 volume) get fewer runs: about `budget_s` seconds each, 3 at least.
                c.n1 = max(3, min(iters, int(budget_s / time_calls(c.run, c.x1, 1)[0])))
                c.nb = max(1, min(batch_iters, int(budget_s / time_calls(c.run, c.xb, 1)[0])))
            time_interleaved(cells, rounds, pause=pause, log=log)
            rows += [_row(c, peak) for c in cells]
            del cells
            torch._dynamo.reset()  # compiled graphs hold their frozen weights
    meta = {"threads": threads, "quick": quick, "iters": iters, "batch_iters": batch_iters, "rounds": rounds,
            "budget_s": budget_s, "matmul_peak_gflops_fp32": round(peak, 1), "torch": torch.__version__}
    return {"meta": meta, "rows": rows, "summary": summarize(rows), "skipped": skipped}


def _row(c: Cell, peak: float) -> dict:
    i = c.info
    lat, p90 = latency_ms(c.lat)
    thr = i["batch"] / median(c.bat)
    gmacs = i["macs"] * thr / 1e9
    return {"model": i["model"], "family": i["family"], "source": i["source"], "runtime": i["runtime"],
            "input": list(c.x1.shape[1:]), "batch": i["batch"], "params": i["params"], "macs": i["macs"],
            "latency_ms": lat, "latency_p90_ms": p90, "throughput": round(thr, 2), "peak_mem_mb": i.get("peak_mem_mb"),
            "gmacs_per_s": round(gmacs, 2), "peak_fraction": round(2 * gmacs / peak, 4),
            "latency_runs": len(c.lat), "batch_runs": len(c.bat)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per model of ours: best runtime by batch-1 latency, its speed-up over PyTorch fp32 eager (goal
    >= GOAL_SPEEDUP) and over the best runtime of each peer of the same family (peer best / ours)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r["source"] == "mobilezoo"):
        mine = {r["runtime"]: r for r in rows if r["model"] == model}
        best = min(mine.values(), key=lambda r: r["latency_ms"])
        entry = {"model": model, "family": best["family"], "best_runtime": best["runtime"],
                 "best_latency_ms": best["latency_ms"]}
        if "eager" in mine:
            entry["speedup_vs_eager"] = round(mine["eager"]["latency_ms"] / best["latency_ms"], 3)
            entry["goal_met"] = entry["speedup_vs_eager"] >= GOAL_SPEEDUP
        low = [r for rt, r in mine.items() if rt in LOW_PRECISION]
        full = [r for rt, r in mine.items() if rt not in LOW_PRECISION]
        if low and full:
            best_low = min(low, key=lambda r: r["latency_ms"])
            best_full = min(full, key=lambda r: r["latency_ms"])
            entry.update(best_low_precision=best_low["runtime"], best_fp32=best_full["runtime"],
                         low_precision_speedup=round(best_full["latency_ms"] / best_low["latency_ms"], 3))
            entry["low_precision_goal_met"] = entry["low_precision_speedup"] >= GOAL_LOW_PRECISION
        for peer in dict.fromkeys(r["model"] for r in rows if r["source"] != "mobilezoo"
                                  and r["family"] == best["family"]):
            peer_best = min(r["latency_ms"] for r in rows if r["model"] == peer)
            entry[f"vs_{peer}"] = round(peer_best / best["latency_ms"], 3)
        out.append(entry)
    return out


ROW_COLUMNS = (
    Column("Model", lambda r: r["model"] + ("" if r["source"] == "mobilezoo" else f" ({r['source']})"), "left"),
    Column("Runtime", lambda r: LABELS[r["runtime"]], "left"),
    Column("Input", lambda r: "x".join(map(str, r["input"])), "right"),
    Column("Params (M)", lambda r: f"{r['params'] / 1e6:.2f}", "right"),
    Column("GMACs", lambda r: f"{r['macs'] / 1e9:.3f}", "right"),
    Column("Lat. p50 (ms)", lambda r: f"{r['latency_ms']:.1f}", "right"),
    Column("Lat. p90 (ms)", lambda r: f"{r['latency_p90_ms']:.1f}", "right"),
    Column("/s @B", lambda r: f"{r['throughput']:.1f}", "right"),
    Column("B", lambda r: str(r["batch"]), "right"),
    Column("Peak MB @B", lambda r: "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}", "right"),
    Column("GMAC/s", lambda r: f"{r['gmacs_per_s']:.1f}", "right"),
    Column("of fp32 peak", lambda r: f"{100 * r['peak_fraction']:.0f}%", "right"),
)
SUMMARY_COLUMNS = (
    Column("Model", lambda s: s["model"], "left"),
    Column("Best runtime", lambda s: LABELS[s["best_runtime"]], "left"),
    Column("Latency (ms)", lambda s: f"{s['best_latency_ms']:.1f}", "right"),
    Column(f"vs PyTorch fp32 eager (goal >= {GOAL_SPEEDUP}x)",
           lambda s: f"{s['speedup_vs_eager']:.2f}x {'met' if s['goal_met'] else 'NOT met'}"
           if "speedup_vs_eager" in s else "-", "right"),
    Column(f"best low precision vs best fp32 (goal >= {GOAL_LOW_PRECISION:.0f}x)",
           lambda s: f"{s['low_precision_speedup']:.2f}x {'met' if s['low_precision_goal_met'] else 'NOT met'} "
                     f"({LABELS[s['best_low_precision']]} vs {LABELS[s['best_fp32']]})"
           if "low_precision_speedup" in s else "-", "left"),
    Column("vs peers (peer best / ours)",
           lambda s: ", ".join(f"{k[3:]} {v:.2f}x" for k, v in s.items() if k.startswith("vs_")) or "-", "left"),
)


def format_markdown(result: dict) -> str:
    """The full table, then the per-model summary with the goal verdicts, then what did not run."""
    meta = result["meta"]
    lines = [table(ROW_COLUMNS, result["rows"]), "",
             f"fp32 matrix-multiply peak measured in the same run: {meta['matmul_peak_gflops_fp32']:.0f} "
             f"GFLOP/s on {meta['threads']} threads.", "", table(SUMMARY_COLUMNS, result["summary"])]
    for k in result.get("skipped", []):
        lines += ["", f"Not run: {k['model']} with {LABELS[k['runtime']]}: {k['reason'].splitlines()[0]}"]
    return "\n".join(lines)


def groups_by_model(models: Sequence[str], peers: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """One (models, peers) group per model of ours; each peer joins the first model of its family."""
    tasks = [s.task for s in parse_specs(models, SOURCES)]
    groups = [([m], []) for m in models]
    for peer, spec in zip(peers, parse_specs(peers, SOURCES)):
        groups[tasks.index(spec.task) if spec.task in tasks else 0][1].append(peer)
    return groups


def merge_results(parts: Sequence[dict]) -> dict:
    """Results of several `benchmark` runs as one: rows in order, the fp32 peak the median of the runs'
    (each row's fraction of it recomputed against that one peak)."""
    peak = median([p["meta"]["matmul_peak_gflops_fp32"] for p in parts])
    rows = [{**r, "peak_fraction": round(2 * r["gmacs_per_s"] / peak, 4)} for p in parts for r in p["rows"]]
    meta = {**parts[0]["meta"], "processes": len(parts), "matmul_peak_gflops_fp32": peak}
    return {"meta": meta, "rows": rows, "summary": summarize(rows), "skipped": [k for p in parts for k in p["skipped"]]}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark_in_processes(groups: Sequence[tuple[list[str], list[str]]], runtimes: Sequence[str] = RUNTIMES,
                           threads: int = 2, quick: bool = False) -> dict:
    """`benchmark` of each group in a fresh process, merged. What a model's runtimes keep after they are
    freed (compiled graphs, OpenVINO and LiteRT plans, allocator caches) then goes back to the system: the
    whole suite in one process grew by 1-3 GiB a model, past this 24 GiB machine's memory. A process that
    dies (killed for memory, a crash in a native runtime) is a one-line error naming its models."""
    context = multiprocessing.get_context("spawn")
    parts = []
    for models, peers in groups:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            try:
                parts.append(pool.submit(benchmark, models, peers, runtimes, threads, quick=quick,
                                         log=_stderr).result())
            except BrokenProcessPool:
                raise UserError(f"the benchmark process of {', '.join([*models, *peers])} died "
                                "(out of memory, or a crash in a native runtime)") from None
    return merge_results(parts)


def run_cli(args, log: Callable[[str], None]) -> tuple[dict, str]:
    """`mobilezoo bench runtimes [MODELS] [--vs PEERS] [--runtimes ...] [--quick]`: (result, tables).
    Without models: the whole suite (one or more models of every family) against its peers. Each model
    (with the peers of its family) is timed in a process of its own, which logs to stderr itself (`log`,
    the suites' common interface, is not used: a closure cannot be sent to the process)."""
    models, peers = (args.models, args.vs) if args.models else (SUITE, args.vs or SUITE_PEERS)
    result = benchmark_in_processes(groups_by_model(models, peers), args.runtimes or RUNTIMES, args.threads,
                                    quick=args.quick)
    return result, format_markdown(result)
