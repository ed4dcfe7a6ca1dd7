"""Parameter counts, MACs and output shapes, computed on the meta device (no memory, no time)."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..layers import reference_padding
from ..models import create_model, get_entry


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable variables; BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_variables(model: nn.Module) -> int:
    """Parameters plus BN running statistics: what TF reports as a model's "Parameters"."""
    return sum(t.numel() for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def count_macs(model, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass: FlopCounterMode FLOPs / 2 (conv + matmul +
    attention, including the CPU flash-attention kernel FlopCounterMode does not know), with
    convolutions padded as TF does (see `reference_padding`)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with reference_padding(), torch.no_grad(), \
            FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(inputs)
    return counter.get_total_flops() // 2


def matmul_peak_gflops(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 8) -> float:
    """This machine's measured matrix-multiply rate (GFLOP/s, best of `reps` n x n x n products)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _shapes(out) -> dict:
    if isinstance(out, torch.Tensor):
        return {"output": list(out.shape)}
    if isinstance(out, (list, tuple)):
        return {f"output{i}": list(o.shape) for i, o in enumerate(out)}
    return {k: list(v.shape) for k, v in out.items()}


def model_info(name: str, img_size: list[int] | int | None = None, batch: int = 1, **kwargs) -> dict:
    """params, macs (per image), input_size and output_shapes (logits and feature maps) of a model."""
    entry = get_entry(name)
    c, *hw = entry.input_size
    if img_size:
        sizes = [img_size] if isinstance(img_size, int) else list(img_size)
        nd = 3 if entry.task == "segment3d" else 2  # spatial dims; video keeps its frame count
        hw = [*hw[:-nd], *(sizes * nd if len(sizes) == 1 else sizes)]
    with torch.device("meta"):
        model = create_model(name, **kwargs).eval()
        x = torch.empty(batch, c, *hw)
        # Detectors: the network up to the raw head outputs (NMS cannot run on the meta device).
        net = model.head_outputs if entry.task == "detect" else model
        info = {"params": count_params(model), "variables": count_variables(model),
                "macs": count_macs(net, x) // batch,
                "input_size": [c, *hw]}
        with torch.no_grad():
            out = net(x)
            if entry.task == "detect":
                info["output_shapes"] = {"box_regression": list(out[0].shape),
                                         "class_logits": list(out[1].shape),
                                         **{f"feature{i}": list(f.shape)
                                            for i, f in enumerate(model.features(x))}}
                info["anchors"] = out[0].shape[1]
            else:
                info["output_shapes"] = _shapes(out)
            if entry.task == "classify" and not kwargs.get("features_only"):
                kwargs = {**kwargs, "features_only": True}
                kwargs.pop("num_classes", None)
                backbone = create_model(name, **kwargs).eval()
                reductions = [backbone.feature_info[i]["reduction"] for i in backbone.out_indices]
                info["output_shapes"].update({f"stride{r}": list(f.shape)
                                              for r, f in zip(reductions, backbone(x))})
    return info
