"""One benchmark table for every family and runtime, with the peers in the same run.

Runtimes (each model runs in every one that applies):
  eager   PyTorch fp32, the model as trained (unfused, contiguous): the reference
  fp32    PyTorch fp32 as deployed: `fuse_for_inference` (BN folded, activations and SE gates fused)
  bf16    the same with bfloat16 weights on bfloat16 inputs (3-D volumes: under `torch.autocast`, which
          keeps the reversible sequences in fp32)
  compile, compile-bf16
          PyTorch fp32 / bf16 compiled by `compile_for_inference` (TorchInductor with frozen weights),
          compiled for both input shapes before anything is timed
  ort     ONNX Runtime fp32 on the `export_onnx` graph (parity with PyTorch checked at export)
  int8    ONNX Runtime on the static INT8 (QDQ) file from `quantize_int8`, calibrated here on random
          inputs: the speed of the quantized graph; the accuracy change is measured on the task's
          own data by `mobilezoo export --int8 --calib-data ...` (and in the demo)
Peers run in PyTorch fp32 and bf16 (and compiled, when those runtimes are asked for), as their libraries
build them: timm:NAME[@SIZE] (classification), tv:NAME (torchvision detection / video models),
monai:SegResNet (MONAI's BraTS network).

Per row: batch-1 latency (median and p90), throughput at the family's batch, peak memory (rise of the
process RSS high-water mark during the first batch forward; ONNX Runtime runs without its memory arena
here, so its activations are allocated and freed per run as PyTorch's are), achieved GMAC/s (MACs of
the unfused network x throughput) and its fraction of this machine's fp32 matrix-multiply peak,
measured in the same run. Detectors are timed as networks (up to the raw box and class outputs, as
their INT8 graph is); `bench_detect` times them end to end. All cells are timed interleaved over the
rounds so noise hits every model and runtime alike.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models import create_model, get_entry
from .bench import _autocast, _peak_rss_delta_mb, _proc_status_kb, _quantile
from .profile import count_macs, count_params, matmul_peak_gflops

RUNTIMES = ("eager", "fp32", "bf16", "compile", "compile-bf16", "ort", "int8")
LABELS = {"eager": "PyTorch fp32 eager", "fp32": "PyTorch fp32", "bf16": "PyTorch bf16",
          "compile": "PyTorch compiled fp32", "compile-bf16": "PyTorch compiled bf16",
          "ort": "ORT fp32", "int8": "ORT INT8"}
COMPILED = {"compile": torch.float32, "compile-bf16": torch.bfloat16}
# task -> (batch-1 input shape without the batch, throughput batch); video: (C, T, H, W)
INPUTS = {"classify": ((3, 224, 224), 32), "detect": ((3, 320, 320), 16),
          "video": ((3, 16, 224, 224), 4), "segment3d": ((4, 128, 128, 128), 1)}
QUICK_INPUTS = {"classify": ((3, 96, 96), 4), "detect": ((3, 128, 128), 2),
                "video": ((3, 8, 64, 64), 2), "segment3d": ((4, 32, 32, 32), 1)}
SUITE = ["tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3", "moat_0", "ssdlite_mobiledet_cpu",
         "ssdlite_mobiledet_dsp", "ssdlite_mobiledet_edgetpu", "ssdlite_mobiledet_gpu", "squeezetime", "revunet3d"]
SUITE_PEERS = ["timm:efficientnet_b0", "timm:mobilevit_xs@256", "timm:coatnet_0_224",
               "tv:ssdlite320_mobilenet_v3_large", "tv:r2plus1d_18", "monai:SegResNet"]
GOAL_SPEEDUP = 1.5  # every model's best runtime vs PyTorch fp32 eager, batch-1 latency


@dataclass
class _Cell:
    """One model in one runtime: its inputs, the callable that runs a batch, and its timings."""

    model: str
    runtime: str
    family: str
    source: str
    params: int
    macs: int
    run: Callable[[object], object]
    x1: object
    xb: object
    batch: int
    lat: list = field(default_factory=list)
    bat: list = field(default_factory=list)
    mem: float | None = None
    note: str = ""


PEER_PREFIXES = ("timm:", "tv:", "monai:")
TV_PEERS = ("tv:ssdlite320_mobilenet_v3_large", "tv:r2plus1d_18", "tv:s3d", "tv:mvit_v2_s")


def check_spec(spec: str) -> None:
    """Raise ValueError (or the registry's unknown-model error) for a spec this benchmark cannot build."""
    src, _, name = spec.rpartition(":")
    if spec.endswith(".json") or not src:
        if not spec.endswith(".json"):
            get_entry(name)
        return
    if src == "timm":
        import timm
        if not timm.is_model(name.partition("@")[0]):
            raise ValueError(f"unknown peer {spec!r}: timm has no model {name.partition('@')[0]!r}")
    elif spec not in (*TV_PEERS, "monai:SegResNet"):
        raise ValueError(f"unknown peer {spec!r}; expected timm:NAME[@SIZE], monai:SegResNet or one of "
                         f"{', '.join(TV_PEERS)}")


def _family(spec: str) -> str:
    src, _, name = spec.rpartition(":")
    if spec.endswith(".json"):
        return "detect"
    if src == "timm":
        return "classify"
    if src == "monai":
        return "segment3d"
    if src == "tv":
        return "detect" if "ssdlite" in name else "video"
    return get_entry(name).task


def _torch_runner(net: Callable, precision: str):
    def run(x):
        with torch.inference_mode(), _autocast(precision):
            return net(x)
    return run


def _memory_format(family: str, channels_last: bool):
    """Channels-last for images (channels_last_3d for volumes); a video clip stays (N, C, T, H, W)."""
    if not channels_last or family == "video":
        return torch.contiguous_format
    return torch.channels_last_3d if family == "segment3d" else torch.channels_last


def _inputs(shape, batch, family, channels_last):
    fmt = _memory_format(family, channels_last)
    return (torch.randn(1, *shape).contiguous(memory_format=fmt),
            torch.randn(batch, *shape).contiguous(memory_format=fmt))


def _build_ours(spec: str, family: str, shape) -> torch.nn.Module:
    if spec.endswith(".json"):
        return create_model("ssdlite_mobiledet", arch=spec, num_classes=90)
    kwargs = {"detect": {"num_classes": 90}, "video": {"num_classes": 400, "num_frames": shape[1]}}
    return create_model(spec, **kwargs.get(family, {}))


def _network(model, family: str):
    """What is timed: the whole model, or a detector up to its raw outputs."""
    return model.head_outputs if family == "detect" else model


def _ort_cells(spec, family, model, shape, batch, runtimes, threads, tmp: Path, base: dict, log,
               skipped: list) -> list[_Cell]:
    """ONNX Runtime fp32 and INT8 cells; a failed export or quantization is recorded in `skipped`."""
    from .export import export_onnx
    from .ort import OrtModel
    from .quantize import quantize_int8
    cells = []
    x1, xb = (np.random.randn(b, *shape).astype(np.float32) for b in (1, batch))
    fp32 = tmp / f"{Path(spec).stem}.onnx"
    log(f"export {spec} to ONNX")
    # Volumes: a graph with dynamic sides, so INT8 calibration runs on small crops (ORT's calibrator keeps
    # every intermediate tensor: at 128^3 that is more memory than this machine has).
    volume = family == "segment3d"
    calib_shape = (shape[0], *(min(s, 32) for s in shape[1:])) if volume else shape
    try:
        export_onnx(model, torch.randn(2 if batch > 1 else 1, *shape), fp32, family, dynamic_batch=batch > 1,
                    detector_mode="raw", dynamic_spatial=volume, threads=threads)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other runtimes still run
        skipped += [{"model": spec, "runtime": rt, "reason": f"export failed: {e}"} for rt in ("ort", "int8")
                    if rt in runtimes]
        return cells
    paths = {"ort": fp32}
    if "int8" in runtimes:
        log(f"quantize {spec} to INT8")
        try:
            paths["int8"] = quantize_int8(fp32, tmp / f"{Path(spec).stem}.int8.onnx",
                                          [torch.randn(2 if batch > 1 else 1, *calib_shape) for _ in range(4)])
        except Exception as e:  # noqa: BLE001
            skipped.append({"model": spec, "runtime": "int8", "reason": f"quantization failed: {e}"})
    for rt, path in paths.items():
        if rt in runtimes:
            session = OrtModel(path, threads=threads, arena=False)  # ~60 sessions and models share the RAM
            cells.append(_Cell(spec, rt, run=session.run, x1=x1, xb=xb, **base))
    return cells


def _cells_for(spec: str, runtimes, threads: int, quick: bool, tmp: Path, log, skipped: list) -> list[_Cell]:
    family = _family(spec)
    shape, batch = (QUICK_INPUTS if quick else INPUTS)[family]
    src, _, name = spec.rpartition(":")
    if src in ("timm", "tv", "monai"):
        return _peer_cells(spec, src, name, family, shape, batch, quick, runtimes, log, skipped)
    model = _build_ours(spec, family, shape).eval()
    x1, xb = _inputs(shape, batch, family, channels_last=False)
    base = dict(family=family, source="mobilezoo", params=count_params(model),
                macs=count_macs(_network(model, family), x1), batch=batch)
    cells = []
    if "eager" in runtimes:
        cells.append(_Cell(spec, "eager", run=_torch_runner(_network(model, family), "fp32"),
                           x1=x1, xb=xb, **base))
    if {"fp32", "bf16"} & set(runtimes):
        from ..layers.fuse import fuse_for_inference
        weights = torch.channels_last_3d if family == "segment3d" else torch.channels_last
        fused = fuse_for_inference(model).to(memory_format=weights)
        cx1, cxb = _inputs(shape, batch, family, channels_last=True)
        if "fp32" in runtimes:
            cells.append(_Cell(spec, "fp32", run=_torch_runner(_network(fused, family), "fp32"),
                               x1=cx1, xb=cxb, **base))
        if "bf16" in runtimes:
            run, bx1, bxb = _bf16(fused, lambda m: _network(m, family), cx1, cxb, family)
            cells.append(_Cell(spec, "bf16", run=run, x1=bx1, xb=bxb, **base))
    if set(COMPILED) & set(runtimes):
        cells += _compiled_cells(spec, model, lambda m: _network(m, family), x1, xb, family, runtimes, base,
                                 log, skipped)
    if {"ort", "int8"} & set(runtimes):
        cells += _ort_cells(spec, family, model, shape, batch, runtimes, threads, tmp, base, log, skipped)
    return cells


def _compiled_cells(spec, model, network, x1, xb, family, runtimes, base, log, skipped) -> list[_Cell]:
    """`compile` / `compile-bf16` cells, compiled here for both input shapes (a failure is recorded in
    `skipped`). bf16 volumes run the fp32-compiled graph under autocast, as the `bf16` cell does."""
    from .compiled import compile_for_inference
    cells = []
    for rt, dtype in COMPILED.items():
        if rt not in runtimes:
            continue
        log(f"compile {spec} ({rt})")
        autocast = family == "segment3d" and dtype == torch.bfloat16
        cast = None if autocast else dtype
        try:
            fmt = _memory_format(family, True)  # weights and inputs channels-last, as in the fp32 cell
            net = compile_for_inference(model, cast, None if fmt == torch.contiguous_format else fmt, network)
            run = _torch_runner(net, "bf16" if autocast else "fp32")
            cx1, cxb = (x.to(cast or x.dtype).contiguous(memory_format=fmt) for x in (x1, xb))
            run(cx1), run(cxb)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other runtimes still run
            skipped.append({"model": spec, "runtime": rt, "reason": f"compile failed: {e}"})
            continue
        cells.append(_Cell(spec, rt, run=run, x1=cx1, xb=cxb, **base))
    return cells


def _peer_cells(spec, src, name, family, shape, batch, quick, runtimes, log, skipped) -> list[_Cell]:
    network = lambda m: m  # noqa: E731 - what is timed, given the model
    if src == "timm":
        import timm
        name, _, size = name.partition("@")
        model = timm.create_model(name, pretrained=False).eval()  # random init: nothing is downloaded
        if size and not quick:
            shape = (3, int(size), int(size))
    elif src == "monai":
        from monai.networks.nets import SegResNet
        model = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16,
                          blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)).eval()  # the MONAI BraTS tutorial's
    elif family == "detect":
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).eval()
        network = _tv_detector_network
    else:
        import torchvision.models.video as tvv

        from .bench_video import TORCHVISION
        model = getattr(tvv, name)(weights=None).eval()
        if not quick:
            t, s, _ = TORCHVISION[spec]
            shape = (3, t, s, s)
    x1, xb = _inputs(shape, batch, family, channels_last=False)
    base = dict(family=family, source=src, params=count_params(model), macs=count_macs(network(model), x1),
                batch=batch)
    run, bx1, bxb = _bf16(model, network, x1, xb, family)
    cells = [_Cell(spec, "fp32", run=_torch_runner(network(model), "fp32"), x1=x1, xb=xb, **base),
             _Cell(spec, "bf16", run=run, x1=bx1, xb=bxb, **base)]
    if set(COMPILED) & set(runtimes):
        cells += _compiled_cells(spec, model, network, x1, xb, family, runtimes, base, log, skipped)
    return cells


def _tv_detector_network(model):
    """torchvision SSDLite's backbone + extra layers + heads: the raw outputs, as ours are timed."""
    return lambda x: model.head(list(model.backbone(x).values()))


def _bf16(model, network, x1, xb, family):
    """(runner, x1, xb) of the bf16 cell: a copy of `model` with bfloat16 weights on bfloat16 inputs, as a
    bf16 deployment runs; volumes run under autocast instead, which keeps reversible sequences in fp32."""
    if family == "segment3d":
        return _torch_runner(network(model), "bf16"), x1, xb
    copy16 = copy.deepcopy(model).to(torch.bfloat16)
    return _torch_runner(network(copy16), "fp32"), x1.bfloat16(), xb.bfloat16()


def _timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def runtime_benchmark(models: list[str], peers: list[str] = (), runtimes=RUNTIMES, threads: int = 2,
                      quick: bool = False, iters: int = 20, batch_iters: int = 3, rounds: int = 4,
                      budget_s: float = 8.0, log: Callable[[str], None] | None = None,
                      pause: Callable[[], None] | None = None) -> dict:
    """Build every (model, runtime) cell, time them interleaved; returns {"meta", "rows", "summary",
    "skipped"}. Each cell gets `iters` batch-1 and `batch_iters` batch runs (fewer for cells slower
    than `budget_s` seconds in all, at least 3 and 1) spread over `rounds`."""
    log = log or (lambda msg: None)
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime {bad[0]!r}; expected some of {', '.join(RUNTIMES)}")
    for spec in (*models, *peers):
        check_spec(spec)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = matmul_peak_gflops(threads)
        cells, skipped = [], []
        with tempfile.TemporaryDirectory(prefix="mobilezoo_bench_") as tmp:
            for spec in (*models, *peers):
                log(f"build {spec}")
                new = _cells_for(spec, runtimes, threads, quick, Path(tmp), log, skipped)
                for c in new:  # first batch forward: memory before any warm-up grows the caches
                    c.mem = _peak_rss_delta_mb(lambda c=c: c.run(c.xb))
                cells += new
                log(f"  resident set now {_proc_status_kb('VmRSS') / 2**20:.1f} GiB")
            plan = {}
            for c in cells:
                log(f"warm up {c.model} {c.runtime}")
                c.run(c.x1)
                # Slow cells (a 128^3 volume) get fewer runs: about `budget_s` seconds each, 3 at least.
                n1 = max(3, min(iters, int(budget_s / _timed(c.run, c.x1))))
                nb = max(1, min(batch_iters, int(budget_s / _timed(c.run, c.xb))))
                plan[id(c)] = (n1, nb)
            rounds = max(1, min(rounds, iters, batch_iters))
            for i in range(rounds):
                for c in (cells if i % 2 == 0 else cells[::-1]):
                    if pause is not None:
                        pause()
                    n1, nb = plan[id(c)]
                    c.lat += [_timed(c.run, c.x1) for _ in range(n1 // rounds + (i < n1 % rounds))]
                    c.bat += [_timed(c.run, c.xb) for _ in range(nb // rounds + (i < nb % rounds))]
                log(f"round {i + 1}/{rounds} done")
    finally:
        torch.set_num_threads(old)
    rows = [_row(c, peak) for c in cells]
    meta = {"threads": threads, "quick": quick, "iters": iters, "batch_iters": batch_iters, "rounds": rounds,
            "budget_s": budget_s,
            "matmul_peak_gflops_fp32": round(peak, 1), "torch": torch.__version__}
    return {"meta": meta, "rows": rows, "summary": summarize(rows), "skipped": skipped}


def _row(c: _Cell, peak: float) -> dict:
    lat, thr = statistics.median(c.lat), c.batch / statistics.median(c.bat)
    gmacs = c.macs * thr / 1e9
    return {"model": c.model, "family": c.family, "source": c.source, "runtime": c.runtime,
            "input": list(c.x1.shape[1:]), "batch": c.batch, "params": c.params, "macs": c.macs,
            "latency_ms": round(1e3 * lat, 3), "latency_p90_ms": round(1e3 * _quantile(c.lat, 0.9), 3),
            "throughput": round(thr, 2), "peak_mem_mb": c.mem, "gmacs_per_s": round(gmacs, 2),
            "peak_fraction": round(2 * gmacs / peak, 4), "latency_runs": len(c.lat), "batch_runs": len(c.bat)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per model: best runtime by batch-1 latency, its speed-up over PyTorch fp32 eager (goal >= 1.5x)
    and over the best runtime of each same-family peer."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r["source"] == "mobilezoo"):
        mine = {r["runtime"]: r for r in rows if r["model"] == model}
        best = min(mine.values(), key=lambda r: r["latency_ms"])
        entry = {"model": model, "family": best["family"], "best_runtime": best["runtime"],
                 "best_latency_ms": best["latency_ms"]}
        if "eager" in mine:
            entry["speedup_vs_eager"] = round(mine["eager"]["latency_ms"] / best["latency_ms"], 3)
            entry["goal_met"] = entry["speedup_vs_eager"] >= GOAL_SPEEDUP
        for peer in dict.fromkeys(r["model"] for r in rows if r["source"] != "mobilezoo"
                                  and r["family"] == best["family"]):
            peer_best = min(r["latency_ms"] for r in rows if r["model"] == peer)
            entry[f"vs_{peer}"] = round(peer_best / best["latency_ms"], 3)
        out.append(entry)
    return out


def format_markdown(result: dict) -> str:
    """The full table, then the per-model summary with the goal verdicts."""
    rows, meta = result["rows"], result["meta"]
    lines = ["| Model | Runtime | Input | Params (M) | GMACs | Lat. p50 (ms) | Lat. p90 (ms) | /s @B | B | "
             "Peak MB @B | GMAC/s | of fp32 peak |", "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        who = r["model"] + ("" if r["source"] == "mobilezoo" else f" ({r['source']})")
        lines.append(f"| {who} | {LABELS[r['runtime']]} | {'x'.join(map(str, r['input']))} | "
                     f"{r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {r['latency_ms']:.1f} | "
                     f"{r['latency_p90_ms']:.1f} | {r['throughput']:.1f} | {r['batch']} | {mem} | "
                     f"{r['gmacs_per_s']:.1f} | {100 * r['peak_fraction']:.0f}% |")
    lines += ["", f"fp32 matrix-multiply peak measured in the same run: {meta['matmul_peak_gflops_fp32']:.0f} "
              f"GFLOP/s on {meta['threads']} threads.", "",
              f"| Model | Best runtime | Latency (ms) | vs PyTorch fp32 eager (goal >= {GOAL_SPEEDUP}x) | "
              "vs peers (peer best / ours) |", "|:---|:---|---:|---:|:---|"]
    for s in result["summary"]:
        vs = ", ".join(f"{k[3:]} {v:.2f}x" for k, v in s.items() if k.startswith("vs_")) or "-"
        goal = (f"{s['speedup_vs_eager']:.2f}x {'met' if s['goal_met'] else 'NOT met'}"
                if "speedup_vs_eager" in s else "-")
        lines.append(f"| {s['model']} | {LABELS[s['best_runtime']]} | {s['best_latency_ms']:.1f} | {goal} | {vs} |")
    for k in result.get("skipped", []):
        lines += ["", f"Not run: {k['model']} with {LABELS[k['runtime']]}: {k['reason'].splitlines()[0]}"]
    return "\n".join(lines)
