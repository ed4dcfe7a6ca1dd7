"""Video-model latency per clip at batch 1, ours vs torchvision's video models, in one run.

Ours run as deployed: `fuse_for_inference`, channels-last; "bf16" casts weights and input to
bfloat16 (autocast would re-cast the 29M weights on every clip). `compile:NAME` is the same network
compiled by `compile_for_inference` (TorchInductor, frozen weights, channels-last weights; compiled
before timing). `eager:NAME` is the same network unfused, fp32, contiguous: the structure and
execution of the official implementation, which is the reference the issue compares against.
torchvision peers run at their native clip sizes with their published Kinetics-400 top-1 beside them.
Every model gets one untimed call per round before its timed calls (a warm-up after the other models
ran, as a process that runs one model never needs). The fp32 / bf16 matrix-multiply peaks are
measured in the same run, and each row reports the fraction of its precision's peak it achieves."""
from __future__ import annotations

import statistics
import time

import torch

from ..layers.fuse import fuse_for_inference
from ..models import create_model, get_entry
from .profile import count_macs, count_params, matmul_peak_gflops

# name -> (native frames, native side, published Kinetics-400 top-1 of its released weights)
TORCHVISION = {"tv:r2plus1d_18": (16, 112, 57.5), "tv:s3d": (16, 224, 68.4), "tv:mvit_v2_s": (16, 224, 80.8)}
PUBLISHED_TOP1 = {"squeezetime": 71.6}  # K400, 10x3 views (spec; paper Table 1)


def parse_clip(text: str) -> tuple[int, int]:
    """'16x224' -> (16, 224) frames x side."""
    try:
        t, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad --clip {text!r}: expected FRAMESxSIDE, e.g. 16x224") from None
    return t, s


def _build(spec: str, clip: tuple[int, int]):
    """(model to time, unfused model for MACs/params, frames, side, published top-1, source)."""
    if spec in TORCHVISION:
        import torchvision.models.video as tvv
        t, s, top1 = TORCHVISION[spec]
        model = getattr(tvv, spec.split(":")[1])(weights=None).eval()
        return model, model, t, s, top1, "torchvision"
    eager, compiled = spec.startswith("eager:"), spec.startswith("compile:")
    name = spec.split(":")[-1]
    if get_entry(name).task != "video":
        raise ValueError(f"{name}: not a video model (see `mobilezoo list --task video`)")
    model = create_model(name, num_classes=400, num_frames=clip[0]).eval()
    if eager:
        return model, model, *clip, PUBLISHED_TOP1.get(name), "eager"
    if compiled:  # compiled per precision by video_benchmark
        return None, model, *clip, PUBLISHED_TOP1.get(name), "compiled"
    fast = fuse_for_inference(model).to(memory_format=torch.channels_last)
    return fast, model, *clip, PUBLISHED_TOP1.get(name), "mobilezoo"


def video_benchmark(models: list[str], peers: list[str], clip: tuple[int, int] = (16, 224), threads: int = 2,
                    iters: int = 12, rounds: int = 3, precisions=("fp32", "bf16"), log=None) -> list[dict]:
    """One row per model and precision: latency per clip (median, batch 1), GMAC/s and its peak fraction."""
    torch.set_num_threads(threads)
    peaks = {"fp32": matmul_peak_gflops(threads), "bf16": matmul_peak_gflops(threads, torch.bfloat16)}
    runs = {}
    for spec in (*models, *peers):
        model, ref, t, s, top1, source = _build(spec, clip)
        x = torch.randn(1, 3, t, s, s)
        info = {"params": count_params(ref), "macs": count_macs(ref, x), "frames": t, "side": s,
                "k400_top1": top1, "source": source}
        if source == "compiled":  # compiled on its first call, before anything is timed
            from .compiled import compile_for_inference
            variants = {p: (compile_for_inference(ref, dtype, torch.channels_last), x.to(dtype))
                        for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if p in precisions}
        else:
            variants = {"fp32": (model, x)}
        if source == "mobilezoo":  # bf16: fold in fp32, then cast weights; activations bf16 too
            fast16 = fuse_for_inference(ref).to(torch.bfloat16).to(memory_format=torch.channels_last)
            variants["bf16"] = (fast16, x.bfloat16())
        for p, (m, xp) in variants.items():
            if p in precisions:
                runs[(spec, p)] = (m, xp, info, [])
    with torch.inference_mode():
        for (spec, p), (m, x, _, _) in runs.items():
            if log and spec.startswith("compile:"):
                log(f"compile {spec} {p}")
            for _ in range(2):
                m(x)
        for r in range(rounds):
            for m, x, _, times in (runs.values() if r % 2 == 0 else reversed(runs.values())):
                m(x)  # untimed warm-up after the other models
                for _ in range(max(1, iters // rounds)):
                    t0 = time.perf_counter()
                    m(x)
                    times.append((time.perf_counter() - t0) * 1e3)
            if log:
                log(f"round {r + 1}/{rounds} done")
    rows = []
    for (spec, p), (_, _, info, times) in runs.items():
        lat = statistics.median(times)
        gmacs = info["macs"] / lat / 1e6
        rows.append({"model": spec, "precision": p, "threads": threads, **info, "latency_ms": round(lat, 2),
                     "clips_per_s": round(1e3 / lat, 2), "gmacs_per_s": round(gmacs, 2),
                     "peak_gflops": round(peaks[p], 1), "peak_fraction": round(2 * gmacs / peaks[p], 3)})
    ref = {r["model"].split(":")[-1]: r["latency_ms"] for r in rows if r["source"] == "eager"}
    for r in rows:
        base = ref.get(r["model"].split(":")[-1])
        if base:
            r["latency_vs_reference"] = round(r["latency_ms"] / base, 3)
    return rows


def format_markdown(rows: list[dict]) -> str:
    """A README table of the rows."""
    lines = ["| model | prec | clip | params (M) | GMACs | K400 top-1 | latency (ms) | clips/s | GMAC/s | "
             "of matmul peak | vs reference |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['k400_top1']:.1f}" if r["k400_top1"] else "-"
        vs = f"{r['latency_vs_reference']:.2f}x" if "latency_vs_reference" in r else "-"
        name = r["model"] + (" (reference)" if r["source"] == "eager" else "")
        lines.append(f"| {name} | {r['precision']} | {r['frames']}x{r['side']} | {r['params'] / 1e6:.2f} | "
                     f"{r['macs'] / 1e9:.2f} | {top1} | {r['latency_ms']:.1f} | {r['clips_per_s']:.2f} | "
                     f"{r['gmacs_per_s']:.1f} | {100 * r['peak_fraction']:.0f}% | {vs} |")
    return "\n".join(lines)
