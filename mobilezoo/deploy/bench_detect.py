"""End-to-end detector latency at batch 1 (preprocess + network + postprocess), ours vs torchvision.

Each detector gets the same uint8 camera-sized image (3 x 480 x 640). Ours: bilinear resize to
320 x 320 (the TF fixed_shape_resizer), scale to [-1, 1], network (through `fuse_for_inference`:
BN folded, activations fused into the convs), sigmoid + per-class NMS.
torchvision's `ssdlite320_mobilenet_v3_large` runs its own transform (resize + normalise) and
postprocess. All run interleaved in one process so noise hits them alike."""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from ..layers.fuse import fuse_for_inference
from ..models import create_model, get_entry
from .profile import count_macs, count_params

TORCHVISION = {"tv:ssdlite320_mobilenet_v3_large"}


class _Ours(torch.nn.Module):
    """Resize + [-1, 1] scaling in front of one of our detectors (BN folded, activations fused)."""

    def __init__(self, name: str, size: int):
        super().__init__()
        arch = {"arch": name} if name.endswith(".json") else {}  # an architecture file (e.g. searched)
        self.eager = create_model("ssdlite_mobiledet" if arch else name, num_classes=90, **arch).eval()
        self.size = size
        self.net = fuse_for_inference(self.eager)

    def forward(self, image: torch.Tensor):
        x = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear",
                          align_corners=False)
        return self.net(x * (2 / 255) - 1)


def _build(spec: str, size: int):
    if spec in TORCHVISION:
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).eval()
        def net(x):  # backbone + extra layers + heads, as `head_outputs` is for ours
            return model.head(list(model.backbone(x).values()))
        return (lambda img: model([img.float() / 255])), model, net
    if not spec.endswith(".json") and get_entry(spec).task != "detect":
        raise ValueError(f"{spec}: not a detector (see `mobilezoo list --task detect`)")
    ours = _Ours(spec, size)
    return ours, ours.eager, ours.eager.head_outputs  # MACs of the unfused net: FlopCounterMode misses fused ops


def detector_benchmark(models: list[str], peers: list[str], size: int = 320, threads: int = 2,
                       iters: int = 60, rounds: int = 6, log=None) -> list[dict]:
    """One row per detector: params, network MACs at size x size, batch-1 end-to-end latency."""
    torch.set_num_threads(threads)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
    built = {s: _build(s, size) for s in (*models, *peers)}
    times: dict[str, list[float]] = {s: [] for s in built}
    with torch.inference_mode():
        for fn, _, _ in built.values():
            for _ in range(5):
                fn(image)
        for r in range(rounds):
            for s, (fn, _, _) in (built.items() if r % 2 == 0 else reversed(built.items())):
                for _ in range(iters // rounds):
                    t0 = time.perf_counter()
                    fn(image)
                    times[s].append((time.perf_counter() - t0) * 1e3)
            if log:
                log(f"round {r + 1}/{rounds} done")
    rows = []
    for s, (_, model, net) in built.items():
        x = torch.zeros(1, 3, size, size)
        t = sorted(times[s])
        rows.append({"model": s, "threads": threads, "size": size, "params": count_params(model),
                     "network_macs": count_macs(net, x), "latency_ms": statistics.median(t),
                     "latency_p90_ms": t[max(0, math.ceil(0.9 * len(t)) - 1)]})
    for r in rows:
        for p in peers:
            ref = next(x for x in rows if x["model"] == p)
            r[f"latency_vs_{p.split(':')[-1]}"] = r["latency_ms"] / ref["latency_ms"]
    return rows


def format_markdown(rows: list[dict]) -> str:
    """A README table of the rows, with latency ratios against each peer."""
    ratio_keys = [k for k in rows[0] if k.startswith("latency_vs_")]
    head = "| detector | params (M) | network GMACs | e2e latency p50 (ms) | p90 (ms) | " + \
        " | ".join(k.replace("latency_vs_", "vs ") for k in ratio_keys) + " |"
    lines = [head, "|" + "---|" * (5 + len(ratio_keys))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['network_macs'] / 1e9:.3f} | "
                     f"{r['latency_ms']:.1f} | {r['latency_p90_ms']:.1f} | "
                     + " | ".join(f"{r[k]:.2f}x" for k in ratio_keys) + " |")
    return "\n".join(lines)
