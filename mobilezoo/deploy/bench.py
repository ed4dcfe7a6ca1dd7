"""CPU inference benchmark: latency, throughput, peak memory and achieved GMAC/s, ours vs timm peers.

Every model runs in eval mode under `torch.inference_mode()` with `torch.set_num_threads(threads)`;
"bf16" runs a copy of the model with its weights cast to bfloat16 on bfloat16 inputs (ours after
BN folding in fp32), as a bf16 deployment does; every model, ours and the peers, runs the same way.
`benchmark` builds all models first and then times them in interleaved rounds in one process, so
drifting clock speeds or noisy neighbours hit ours and the peers alike; `iters` batch-1 and
`batch_iters` batch-`batch` runs per model and precision are split over the rounds, and an
optional `pause()` runs before every timed chunk (e.g. to wait for an idle CPU).

Row fields:
  macs          multiply-accumulates of one image (FlopCounterMode total / 2 at batch 1; CPU flash
                attention, which FlopCounterMode does not know, is counted like the other SDPA kernels)
  latency_ms    median batch-1 wall time of one forward; latency_p90_ms its 90th percentile
  throughput    images/s at batch `batch`: batch / median wall time of one batch forward
  gmacs_per_s   achieved GMAC/s: macs * throughput / 1e9
  peak_mem_mb   rise of the process resident-set high-water mark (Linux VmHWM, reset through
                /proc/self/clear_refs) over the resident set just before one batch-`batch` forward:
                activations and workspaces, not the weights (resident already). None off Linux.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import math
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from .profile import count_macs

__all__ = ["ModelSpec", "parse_spec", "count_macs", "measure", "benchmark", "format_markdown"]

PRECISIONS = ("fp32", "bf16")
_SPEC_RE = re.compile(r"(?:(?P<src>\w+):)?(?P<name>[\w.\-]+?)(?:@(?P<h>\d+)(?:x(?P<w>\d+))?)?")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: the text, model name, source ("mobilezoo", "eager" or "timm"), forced size.

    "mobilezoo" models run as deployed: `fuse_for_inference` (BN folded, activations fused into the
    convs); "eager:NAME" runs the same model unfused, as trained."""

    spec: str
    name: str
    source: str
    img_size: tuple[int, int] | None = None


def parse_spec(spec: str) -> ModelSpec:
    """Parse "tiny_moat_0", "timm:mobilevit_xs" or "timm:mobilevit_xs@256" (or @HxW); check the name."""
    m = _SPEC_RE.fullmatch(spec.strip())
    if m is None or (m["src"] or "mobilezoo") not in ("mobilezoo", "eager", "timm"):
        raise ValueError(f"bad model spec {spec!r}: use NAME, eager:NAME or timm:NAME, optionally with @SIZE")
    source, name = m["src"] or "mobilezoo", m["name"]
    if source == "timm":
        import timm
        known = timm.is_model(name)
    else:
        from mobilezoo import list_models
        known = name in list_models()
    if not known:
        raise ValueError(f"unknown model spec {spec!r}: no {source} model named {name!r}")
    size = (int(m["h"]), int(m["w"] or m["h"])) if m["h"] else None
    return ModelSpec(spec, name, source, size)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _build(spec: ModelSpec) -> nn.Module:
    if spec.source == "timm":
        import timm
        return timm.create_model(spec.name, pretrained=False)  # random init: nothing is downloaded
    from mobilezoo import create_model
    return create_model(spec.name)


def _autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_rss_delta_mb(fn: Callable[[], object]) -> float | None:
    """Run `fn` once; the rise of the resident-set high-water mark over the current RSS, in MB.

    Freed heap is returned to the OS first (glibc `malloc_trim`): pages that earlier, larger runs
    left resident would otherwise absorb this run's allocations without raising the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        before = _proc_status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return round(max(_proc_status_kb("VmHWM") - before, 0) / 1024, 1)


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _Runner:
    """One model at one input size: inputs, MAC count and the timings collected per precision."""

    def __init__(self, spec: ModelSpec, img_size, batch: int, channels_last: bool):
        self.spec, self.size, self.batch = spec, spec.img_size or _pair(img_size), batch
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = _build(spec).eval()
        self.params = sum(p.numel() for p in model.parameters())
        self.model = model.to(memory_format=fmt)
        self.x1 = torch.randn(1, 3, *self.size).contiguous(memory_format=fmt)
        self.xb = torch.randn(batch, 3, *self.size).contiguous(memory_format=fmt)
        self.macs = count_macs(self.model, self.x1)  # before fusion: FlopCounterMode misses the fused op
        if spec.source == "mobilezoo":
            from mobilezoo.layers.fuse import fuse_for_inference
            self.model = fuse_for_inference(self.model).to(memory_format=fmt)
        self.channels_last = channels_last
        self.bf16 = None  # built on first use: weights cast to bfloat16 after fusion
        self.lat: dict[str, list[float]] = {}
        self.bat: dict[str, list[float]] = {}
        self.mem: dict[str, float | None] = {}

    def forward(self, x: torch.Tensor, precision: str) -> None:
        """One forward of `x` (self.x1 or self.xb). bf16: weights and activations in bfloat16, as a
        bf16 deployment runs (autocast would re-cast every weight and upcast LayerNorm each call)."""
        _autocast(precision)  # validates
        model = self.model
        if precision == "bf16":
            if self.bf16 is None:
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                self.bf16 = (copy.deepcopy(self.model).to(torch.bfloat16).to(memory_format=fmt),
                             {id(self.x1): self.x1.bfloat16(), id(self.xb): self.xb.bfloat16()})
            model, x = self.bf16[0], self.bf16[1][id(x)]
        with torch.inference_mode():
            model(x)

    def time(self, precision: str, n1: int, nb: int) -> None:
        for x, n, out in ((self.x1, n1, self.lat), (self.xb, nb, self.bat)):
            times = out.setdefault(precision, [])
            for _ in range(n):
                t0 = time.perf_counter()
                self.forward(x, precision)
                times.append(time.perf_counter() - t0)

    def row(self, precision: str, threads: int) -> dict:
        h, w = self.size
        lat, bat = self.lat[precision], self.bat[precision]
        throughput = round(self.batch / statistics.median(bat), 2)
        return {
            "name": self.spec.name, "spec": self.spec.spec, "source": self.spec.source,
            "precision": precision, "img_size": h if h == w else [h, w], "threads": threads,
            "batch": self.batch, "channels_last": self.channels_last,
            "params": self.params, "macs": self.macs,
            "latency_ms": round(1e3 * statistics.median(lat), 3),
            "latency_p90_ms": round(1e3 * _quantile(lat, 0.9), 3),
            "throughput": throughput,
            "gmacs_per_s": round(self.macs * throughput / 1e9, 3),
            "peak_mem_mb": self.mem.get(precision),
            "latency_runs": len(lat), "batch_runs": len(bat),
        }


def _run(specs: list[ModelSpec], img_size, threads: int, precisions: Sequence[str], batch: int,
         warmup: int, iters: int, batch_iters: int, rounds: int, channels_last: bool,
         log: Callable[[str], None] | None, pause: Callable[[], None] | None = None) -> list[_Runner]:
    for p in precisions:
        _autocast(p)  # validates
    log = log or (lambda msg: None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners = []
        for spec in specs:
            log(f"build {spec.spec}")
            runners.append(_Runner(spec, img_size, batch, channels_last))
        for r in runners:
            for p in precisions:
                log(f"warm up {r.spec.spec} {p}")
                for _ in range(warmup):
                    r.forward(r.x1, p)
                for _ in range(max(1, warmup // 10)):  # one batch run builds the kernels
                    r.forward(r.xb, p)
        rounds = max(1, min(rounds, iters, batch_iters))
        for i in range(rounds):
            n1 = iters // rounds + (i < iters % rounds)
            nb = batch_iters // rounds + (i < batch_iters % rounds)
            order = runners if i % 2 == 0 else runners[::-1]
            for r in order:
                for p in (precisions if i % 2 == 0 else precisions[::-1]):
                    if pause is not None:
                        pause()
                    r.time(p, n1, nb)
            log(f"round {i + 1}/{rounds} done")
        for r in runners:
            for p in precisions:
                r.mem[p] = _peak_rss_delta_mb(partial(r.forward, r.xb, p))
        return runners
    finally:
        torch.set_num_threads(old_threads)


def measure(model_spec: str, img_size: int | tuple = 224, threads: int = 2, precision: str = "fp32",
            batch: int = 32, warmup: int = 10, iters: int = 50, batch_iters: int = 10,
            channels_last: bool = True) -> dict:
    """Benchmark one model spec at one precision; returns one row (see the module docstring)."""
    runner, = _run([parse_spec(model_spec)], img_size, threads, [precision], batch, warmup, iters,
                   batch_iters, 1, channels_last, None)
    return runner.row(precision, threads)


def benchmark(models: Sequence[str], peers: Sequence[str], img_sizes: int | tuple | list = 224,
              threads: int = 2, precisions: Sequence[str] = PRECISIONS, batch: int = 32,
              warmup: int = 10, iters: int = 50, batch_iters: int = 10, rounds: int = 5,
              channels_last: bool = True, log: Callable[[str], None] | None = None,
              pause: Callable[[], None] | None = None) -> list[dict]:
    """Time ours and the peers interleaved in one process; add vs-peer ratios and bf16 speed-ups."""
    specs = [parse_spec(s) for s in (*models, *peers)]
    rows = []
    for size in img_sizes if isinstance(img_sizes, list) else [img_sizes]:  # a list sweeps sizes
        runners = _run(specs, size, threads, list(precisions), batch, warmup, iters, batch_iters,
                       rounds, channels_last, log, pause)
        group = [r.row(p, threads) for r in runners for p in precisions]
        _add_ratios(group, [s.name for s in specs[len(models):]])
        rows += group
    return rows


def _add_ratios(rows: list[dict], peers: list[str]) -> None:
    by_key = {(r["spec"], r["precision"]): r for r in rows}
    for r in rows:
        fp32, bf16 = by_key.get((r["spec"], "fp32")), by_key.get((r["spec"], "bf16"))
        if fp32 and bf16:
            r["bf16_speedup"] = round(bf16["throughput"] / fp32["throughput"], 3)
        if r["source"] == "timm":
            continue
        for peer in rows:
            if peer["name"] in peers and peer["precision"] == r["precision"]:
                r[f"vs_{peer['name']}"] = {
                    "gmacs_per_s": round(r["gmacs_per_s"] / peer["gmacs_per_s"], 3),
                    "latency": round(r["latency_ms"] / peer["latency_ms"], 3),
                }


_COLUMNS = (
    ("Model", lambda r: f"{r['name']}" + {"timm": " (timm)", "eager": " (eager)"}.get(r["source"], "")),
    ("Prec", lambda r: r["precision"]),
    ("Size", lambda r: "x".join(map(str, r["img_size"])) if isinstance(r["img_size"], list)
     else str(r["img_size"])),
    ("Params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
    ("GMACs", lambda r: f"{r['macs'] / 1e9:.3f}"),
    ("Lat. p50 (ms)", lambda r: f"{r['latency_ms']:.2f}"),
    ("Lat. p90 (ms)", lambda r: f"{r['latency_p90_ms']:.2f}"),
    ("img/s @B", lambda r: f"{r['throughput']:.1f}"),
    ("Peak MB @B", lambda r: "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"),
    ("GMAC/s", lambda r: f"{r['gmacs_per_s']:.1f}"),
    ("bf16 speed-up", lambda r: f"{r['bf16_speedup']:.2f}x" if "bf16_speedup" in r else "-"),
)


def format_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of `rows`: a header, a rule, then exactly one line per row."""
    lines = ["| " + " | ".join(name for name, _ in _COLUMNS) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in _COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
