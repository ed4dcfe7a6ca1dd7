"""detect suite: end-to-end detector latency at batch 1 (preprocess + network + postprocess), ours vs
torchvision.

Each detector gets the same uint8 camera-sized image (3 x 480 x 640). Ours: bilinear resize to
size x size (the TF fixed_shape_resizer), scale to [-1, 1], network (through `fuse_for_inference`:
BN folded, activations fused into the convs), sigmoid + per-class NMS. A peer runs its library's own
transform and postprocess (`Peer.end_to_end`). All run interleaved in one process so noise hits them
alike. Network MACs are counted on the unfused network up to the raw outputs at size x size."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ...deploy.profile import count_macs, count_params
from ...tasks.detection import DetectionTask
from ..cells import Cell, inference, time_interleaved
from ..markdown import Column, table
from ..specs import Spec, parse_specs
from ..stats import latency_ms
from ..threads import num_threads

SOURCES = ("mobilezoo", "tv")
IMAGE = (3, 480, 640)


class _Preprocessed(torch.nn.Module):
    """Resize + [-1, 1] scaling in front of one of our (fused) detectors."""

    def __init__(self, net: torch.nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, image: torch.Tensor):
        x = F.interpolate(image[None].float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x * (2 / 255) - 1)


def _cell(spec: Spec, size: int, image: torch.Tensor, iters: int) -> Cell:
    shape = (image.shape[0], size, size)
    model = spec.build(shape)
    if spec.peer:
        run = inference(spec.peer.end_to_end(model))
    else:
        from ...layers.fuse import fuse_for_inference
        run = inference(_Preprocessed(fuse_for_inference(model), size))
    # MACs of the unfused network: FlopCounterMode misses fused ops
    info = {"params": count_params(model), "network_macs": count_macs(spec.network(model), torch.zeros(1, *shape))}
    return Cell(run, image, n1=iters, info={"model": spec.text, **info})


def benchmark(models: Sequence[str], peers: Sequence[str], size: int = 320, threads: int = 2, iters: int = 60,
              rounds: int = 6, log: Callable[[str], None] | None = None) -> list[dict]:
    """One row per detector: params, network MACs at size x size, batch-1 end-to-end latency (median and
    p90), and its latency over each peer's (`latency_vs_PEER`)."""
    specs = parse_specs([*models, *peers], SOURCES, DetectionTask.name)
    image = torch.randint(0, 256, IMAGE, dtype=torch.uint8)
    with num_threads(threads):
        cells = [_cell(s, size, image, iters) for s in specs]
        for c in cells:
            for _ in range(5):
                c.run(c.x1)
        time_interleaved(cells, max(1, min(rounds, iters)), log=log)
    rows = []
    for c in cells:
        lat, p90 = latency_ms(c.lat)
        rows.append({**c.info, "threads": threads, "size": size, "latency_ms": lat, "latency_p90_ms": p90})
    for r in rows:
        for p in specs[len(models):]:
            ref = next(x for x in rows if x["model"] == p.text)
            r[f"latency_vs_{p.name}"] = r["latency_ms"] / ref["latency_ms"]
    return rows


def format_markdown(rows: list[dict]) -> str:
    """A README table of the rows, with latency ratios against each peer."""
    ratios = [k for k in rows[0] if k.startswith("latency_vs_")]
    columns = [Column("detector", lambda r: r["model"]),
               Column("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
               Column("network GMACs", lambda r: f"{r['network_macs'] / 1e9:.3f}"),
               Column("e2e latency p50 (ms)", lambda r: f"{r['latency_ms']:.1f}"),
               Column("p90 (ms)", lambda r: f"{r['latency_p90_ms']:.1f}"),
               *(Column(k.replace("latency_vs_", "vs "), lambda r, k=k: f"{r[k]:.2f}x") for k in ratios)]
    return table(columns, rows)


def run_cli(args, log: Callable[[str], None]) -> tuple[list[dict], str]:
    """`mobilezoo bench detect MODELS --vs PEERS`: (rows, table)."""
    rows = benchmark(args.models, args.vs, args.img_size or 320, args.threads, log=log)
    return rows, format_markdown(rows)
