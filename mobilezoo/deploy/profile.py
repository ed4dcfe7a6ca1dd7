"""Parameter counts, MACs and output shapes, computed on the meta device (no memory, no time)."""
from __future__ import annotations

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


def model_info(name: str, img_size: list[int] | int | None = None, batch: int = 1, **kwargs) -> dict:
    """params, macs (per image), input_size and output_shapes (the task's outputs and feature maps)."""
    from ..tasks import task_of
    entry, task = get_entry(name), task_of(name)
    c, *hw = entry.input_size
    if img_size:
        sizes = [img_size] if isinstance(img_size, int) else list(img_size)
        nd = task.inputs.spatial  # the spatial sides; a video keeps its frame count
        hw = [*hw[:-nd], *(sizes * nd if len(sizes) == 1 else sizes)]
    with torch.device("meta"):
        model = create_model(name, **kwargs).eval()
        x = torch.empty(batch, c, *hw)
        net = task.network(model)  # detectors: up to the raw head outputs (NMS cannot run on meta)
        info = {"params": count_params(model), "variables": count_variables(model),
                "macs": count_macs(net, x) // batch, "input_size": [c, *hw]}
        with torch.no_grad():
            info.update(task.output_info(name, model, x, net(x), kwargs))
    return info
