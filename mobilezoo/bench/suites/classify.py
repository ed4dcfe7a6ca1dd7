"""classify suite: CPU inference latency, throughput, peak memory and achieved GMAC/s, ours vs timm peers.

Every model runs in eval mode under `torch.inference_mode()` on `threads` threads; "bf16" runs a copy
of the model with its weights cast to bfloat16 on bfloat16 inputs (ours after BN folding in fp32), as
a bf16 deployment does; every model, ours and the peers, runs the same way. Ours run as deployed
(`fuse_for_inference`: BN folded, activations fused into the convs); `eager:NAME` is the same model
unfused, as trained. All models are built first, then timed in interleaved rounds in one process, so
drifting clock speeds or noisy neighbours hit ours and the peers alike; `iters` batch-1 and
`batch_iters` batch-`batch` runs per model and precision are split over the rounds, and an optional
`pause()` runs before every timed chunk (e.g. to wait for an idle CPU).

Row fields:
  macs          multiply-accumulates of one image (FlopCounterMode total / 2 at batch 1; CPU flash
                attention, which FlopCounterMode does not know, is counted like the other SDPA kernels)
  latency_ms    median batch-1 wall time of one forward; latency_p90_ms its 90th percentile
  throughput    images/s at batch `batch`: batch / median wall time of one batch forward
  gmacs_per_s   achieved GMAC/s: macs * throughput / 1e9
  peak_mem_mb   rise of the process resident-set high-water mark (Linux VmHWM, reset through
                /proc/self/clear_refs) over the resident set just before one batch-`batch` forward:
                activations and workspaces, not the weights (resident already). None off Linux.
  vs_PEER       {"gmacs_per_s", "latency"}: ours over the peer's, same run and precision
  bf16_speedup  bf16 throughput over fp32 throughput of the same model
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...deploy.profile import count_macs, count_params
from ...tasks.classification import ClassificationTask
from ..cells import Cell, bf16_cell_parts, inference, time_interleaved
from ..markdown import Column, table
from ..memory import peak_rss_delta_mb
from ..specs import OURS, Spec, parse_specs
from ..stats import latency_ms, median
from ..threads import num_threads

PRECISIONS = ("fp32", "bf16")
SOURCES = ("mobilezoo", "eager", "timm")


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _cells(spec: Spec, img_size, batch: int, channels_last: bool, precisions: Sequence[str],
           iters: int, batch_iters: int) -> list[Cell]:
    """One cell per precision of one model at one input size (a spec's @SIZE wins over `img_size`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h, w = spec.size or _pair(img_size)
    shape = (spec.task_class.inputs.shape[0], h, w)
    model = spec.build(shape)
    params = count_params(model)
    model = model.to(memory_format=fmt)
    x1 = torch.randn(1, *shape).contiguous(memory_format=fmt)
    xb = torch.randn(batch, *shape).contiguous(memory_format=fmt)
    macs = count_macs(model, x1)  # before fusion: FlopCounterMode misses the fused op
    if spec.source == "mobilezoo":
        from ...layers.fuse import fuse_for_inference
        model = fuse_for_inference(model).to(memory_format=fmt)
    info = dict(spec=spec, size=(h, w), params=params, macs=macs, batch=batch, channels_last=channels_last)
    cells = []
    for p in precisions:
        if p == "bf16":
            run, a, b = bf16_cell_parts(model, spec.network, x1, xb, spec.bf16_autocast, fmt)
        else:
            run, a, b = inference(spec.network(model)), x1, xb
        cells.append(Cell(run, a, b, iters, batch_iters, info={**info, "precision": p}))
    return cells


def _row(c: Cell, threads: int) -> dict:
    i, spec = c.info, c.info["spec"]
    (h, w), lat, p90 = i["size"], *latency_ms(c.lat)
    throughput = round(i["batch"] / median(c.bat), 2)
    return {
        "name": spec.name, "spec": spec.text, "source": spec.source,
        "precision": i["precision"], "img_size": h if h == w else [h, w], "threads": threads,
        "batch": i["batch"], "channels_last": i["channels_last"],
        "params": i["params"], "macs": i["macs"],
        "latency_ms": lat, "latency_p90_ms": p90, "throughput": throughput,
        "gmacs_per_s": round(i["macs"] * throughput / 1e9, 3),
        "peak_mem_mb": i.get("peak_mem_mb"),
        "latency_runs": len(c.lat), "batch_runs": len(c.bat),
    }


def _run(specs: list[Spec], img_size, threads: int, precisions: Sequence[str], batch: int, warmup: int,
         iters: int, batch_iters: int, rounds: int, channels_last: bool,
         log: Callable[[str], None] | None, pause: Callable[[], None] | None = None) -> list[dict]:
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {bad[0]!r}")
    log = log or (lambda msg: None)
    with num_threads(threads):
        cells = []
        for spec in specs:
            log(f"build {spec.text}")
            cells += _cells(spec, img_size, batch, channels_last, precisions, iters, batch_iters)
        for c in cells:
            log(f"warm up {c.info['spec'].text} {c.info['precision']}")
            for _ in range(warmup):
                c.run(c.x1)
            for _ in range(max(1, warmup // 10)):  # one batch run builds the kernels
                c.run(c.xb)
        time_interleaved(cells, max(1, min(rounds, iters, batch_iters)), pause=pause, log=log)
        for c in cells:
            c.info["peak_mem_mb"] = peak_rss_delta_mb(lambda c=c: c.run(c.xb))
    return [_row(c, threads) for c in cells]


def measure(model_spec: str, img_size: int | tuple = 224, threads: int = 2, precision: str = "fp32",
            batch: int = 32, warmup: int = 10, iters: int = 50, batch_iters: int = 10,
            channels_last: bool = True) -> dict:
    """Benchmark one model spec at one precision; returns one row (see the module docstring)."""
    specs = parse_specs([model_spec], SOURCES, ClassificationTask.name)
    row, = _run(specs, img_size, threads, [precision], batch, warmup, iters, batch_iters, 1, channels_last, None)
    return row


def benchmark(models: Sequence[str], peers: Sequence[str], img_sizes: int | tuple | list = 224,
              threads: int = 2, precisions: Sequence[str] = PRECISIONS, batch: int = 32,
              warmup: int = 10, iters: int = 50, batch_iters: int = 10, rounds: int = 5,
              channels_last: bool = True, log: Callable[[str], None] | None = None,
              pause: Callable[[], None] | None = None) -> list[dict]:
    """Time ours and the peers interleaved in one process; add vs-peer ratios and bf16 speed-ups.
    A list of `img_sizes` sweeps the sizes, one interleaved run each."""
    specs = parse_specs([*models, *peers], SOURCES, ClassificationTask.name)
    rows = []
    for size in img_sizes if isinstance(img_sizes, list) else [img_sizes]:
        group = _run(specs, size, threads, list(precisions), batch, warmup, iters, batch_iters, rounds,
                     channels_last, log, pause)
        add_ratios(group, [s.name for s in specs[len(models):]])
        rows += group
    return rows


def add_ratios(rows: list[dict], peers: list[str]) -> None:
    """Add `vs_PEER` to our rows (against the peer's row of the same run and precision) and
    `bf16_speedup` to every model that ran in both precisions."""
    by_key = {(r["spec"], r["precision"]): r for r in rows}
    for r in rows:
        fp32, bf16 = by_key.get((r["spec"], "fp32")), by_key.get((r["spec"], "bf16"))
        if fp32 and bf16:
            r["bf16_speedup"] = round(bf16["throughput"] / fp32["throughput"], 3)
        if r["source"] not in OURS:
            continue
        for peer in rows:
            if peer["name"] in peers and peer["precision"] == r["precision"]:
                r[f"vs_{peer['name']}"] = {
                    "gmacs_per_s": round(r["gmacs_per_s"] / peer["gmacs_per_s"], 3),
                    "latency": round(r["latency_ms"] / peer["latency_ms"], 3),
                }


COLUMNS = (
    Column("Model", lambda r: r["name"] + {"timm": " (timm)", "eager": " (eager)"}.get(r["source"], ""), "left"),
    Column("Prec", lambda r: r["precision"], "right"),
    Column("Size", lambda r: "x".join(map(str, r["img_size"])) if isinstance(r["img_size"], list)
           else str(r["img_size"]), "right"),
    Column("Params (M)", lambda r: f"{r['params'] / 1e6:.2f}", "right"),
    Column("GMACs", lambda r: f"{r['macs'] / 1e9:.3f}", "right"),
    Column("Lat. p50 (ms)", lambda r: f"{r['latency_ms']:.2f}", "right"),
    Column("Lat. p90 (ms)", lambda r: f"{r['latency_p90_ms']:.2f}", "right"),
    Column("img/s @B", lambda r: f"{r['throughput']:.1f}", "right"),
    Column("Peak MB @B", lambda r: "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}", "right"),
    Column("GMAC/s", lambda r: f"{r['gmacs_per_s']:.1f}", "right"),
    Column("bf16 speed-up", lambda r: f"{r['bf16_speedup']:.2f}x" if "bf16_speedup" in r else "-", "right"),
)


def format_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of `rows`: a header, a rule, then exactly one line per row."""
    return table(COLUMNS, rows)


def run_cli(args, log: Callable[[str], None]) -> tuple[list[dict], str]:
    """`mobilezoo bench classify MODELS --vs PEERS`: (rows, table)."""
    rows = benchmark(args.models, args.vs, args.img_size or 224, threads=args.threads, precisions=args.precision,
                     batch=args.batch, iters=args.iters, log=log)
    return rows, format_markdown(rows)
