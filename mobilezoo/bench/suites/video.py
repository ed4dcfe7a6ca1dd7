"""video suite: latency per clip at batch 1, ours vs torchvision's video models, in one run.

Ours run as deployed: `fuse_for_inference`, channels-last weights; "bf16" casts weights and input to
bfloat16 (autocast would re-cast the 29M weights on every clip). `compile:NAME` is the same network
compiled by `compile_for_inference` (TorchInductor, frozen weights, channels-last weights; compiled
before timing). `eager:NAME` is the same network unfused, fp32, contiguous: the structure and
execution of the official implementation, the reference the other rows are compared against.
torchvision peers run at their native clip sizes, fp32, with their published Kinetics-400 top-1
beside them. Every model gets one untimed call per round before its timed calls (a warm-up after the
other models ran, as a process that runs one model never needs). The fp32 / bf16 matrix-multiply
peaks are measured in the same run, and each row reports the fraction of its precision's peak it
achieves."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...deploy.profile import count_macs, count_params
from ...errors import UserError
from ...tasks.video import VideoTask
from ..cells import Cell, bf16_cell_parts, inference, time_interleaved
from ..markdown import Column, table
from ..specs import Spec, parse_specs
from ..stats import median
from ..threads import num_threads
from ..timing import matmul_peak_gflops

SOURCES = ("mobilezoo", "eager", "compile", "tv")
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PUBLISHED_TOP1 = {"squeezetime": 71.6}  # Kinetics-400, 10x3 views (paper, Table 1)
SOURCE_LABELS = {"tv": "torchvision", "compile": "compiled"}  # the rows' `source`


def parse_clip(text: str) -> tuple[int, int]:
    """'16x224' -> (16, 224) frames x side."""
    try:
        t, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"bad --clip {text!r}: expected FRAMESxSIDE, e.g. 16x224") from None
    return t, s


def _cells(spec: Spec, clip: tuple[int, int], precisions: Sequence[str], iters: int, log) -> list[Cell]:
    """The cells of one model: peers and the eager reference in fp32, ours and compiled per precision."""
    channels = spec.task_class.inputs.shape[0]
    shape = spec.sample_shape() if spec.peer else (channels, clip[0], clip[1], clip[1])
    model = spec.build(shape)
    x = torch.randn(1, *shape)
    info = {"params": count_params(model), "macs": count_macs(spec.network(model), x),
            "frames": shape[1], "side": shape[-1],
            "k400_top1": spec.peer.top1 if spec.peer else PUBLISHED_TOP1.get(spec.name),
            "source": SOURCE_LABELS.get(spec.source, spec.source)}
    runs = {}
    if spec.source == "compile":  # compiled on its first call, before anything is timed
        from ...deploy.compiled import compile_for_inference
        for p in precisions:
            log(f"compile {spec.text} {p}")
            runs[p] = (inference(compile_for_inference(model, DTYPES[p], spec.weight_format)), x.to(DTYPES[p]))
    elif spec.source == "mobilezoo":  # bf16: fold in fp32, then cast weights; activations bf16 too
        from ...layers.fuse import fuse_for_inference
        fused = fuse_for_inference(model).to(memory_format=spec.weight_format)
        runs["fp32"] = (inference(fused), x)
        if "bf16" in precisions:
            run, x16, _ = bf16_cell_parts(fused, spec.network, x, None, spec.bf16_autocast, spec.weight_format)
            runs["bf16"] = (run, x16)
    else:  # the peers and the eager reference: fp32, as they are built
        runs["fp32"] = (inference(model), x)
    return [Cell(run, xp, n1=iters, info={"model": spec.text, "precision": p, **info})
            for p, (run, xp) in runs.items() if p in precisions]


def benchmark(models: Sequence[str], peers: Sequence[str], clip: tuple[int, int] = (16, 224), threads: int = 2,
              iters: int = 12, rounds: int = 3, precisions: Sequence[str] = PRECISIONS,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per model and precision: latency per clip (median, batch 1), GMAC/s and its fraction of
    the matrix-multiply peak, and `latency_vs_reference` against the same network's `eager:` row."""
    specs = parse_specs([*models, *peers], SOURCES, VideoTask.name)
    log = log or (lambda msg: None)
    with num_threads(threads):
        peaks = {p: matmul_peak_gflops(DTYPES[p]) for p in PRECISIONS}
        cells = [c for s in specs for c in _cells(s, clip, precisions, iters, log)]
        for c in cells:
            for _ in range(2):
                c.run(c.x1)
        time_interleaved(cells, max(1, min(rounds, iters)), warm_each_round=True, log=log)
    rows = []
    for c in cells:
        lat = 1e3 * median(c.lat)
        gmacs = c.info["macs"] / lat / 1e6
        p = c.info["precision"]
        rows.append({**c.info, "threads": threads, "latency_ms": round(lat, 2), "clips_per_s": round(1e3 / lat, 2),
                     "gmacs_per_s": round(gmacs, 2), "peak_gflops": round(peaks[p], 1),
                     "peak_fraction": round(2 * gmacs / peaks[p], 3)})
    ref = {r["model"].split(":")[-1]: r["latency_ms"] for r in rows if r["source"] == "eager"}
    for r in rows:
        base = ref.get(r["model"].split(":")[-1])
        if base:
            r["latency_vs_reference"] = round(r["latency_ms"] / base, 3)
    return rows


COLUMNS = (
    Column("model", lambda r: r["model"] + (" (reference)" if r["source"] == "eager" else "")),
    Column("prec", lambda r: r["precision"]),
    Column("clip", lambda r: f"{r['frames']}x{r['side']}"),
    Column("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
    Column("GMACs", lambda r: f"{r['macs'] / 1e9:.2f}"),
    Column("K400 top-1", lambda r: f"{r['k400_top1']:.1f}" if r["k400_top1"] else "-"),
    Column("latency (ms)", lambda r: f"{r['latency_ms']:.1f}"),
    Column("clips/s", lambda r: f"{r['clips_per_s']:.2f}"),
    Column("GMAC/s", lambda r: f"{r['gmacs_per_s']:.1f}"),
    Column("of matmul peak", lambda r: f"{100 * r['peak_fraction']:.0f}%"),
    Column("vs reference", lambda r: f"{r['latency_vs_reference']:.2f}x" if "latency_vs_reference" in r else "-"),
)


def format_markdown(rows: list[dict]) -> str:
    """A README table of the rows."""
    return table(COLUMNS, rows)


def run_cli(args, log: Callable[[str], None]) -> tuple[list[dict], str]:
    """`mobilezoo bench video MODELS --vs PEERS --clip FRAMESxSIDE`: (rows, table)."""
    rows = benchmark(args.models, args.vs, parse_clip(args.clip), args.threads, precisions=args.precision, log=log)
    return rows, format_markdown(rows)
