"""ONNX export of every model family, and a parity check of the file against the torch model.

`export_onnx` writes one ONNX file per model with torch's TorchScript-based exporter
(`dynamo=False`): it exports the detector's data-dependent postprocess (score masks, per-class NMS
as ONNX NonMaxSuppression, through torchvision's registered symbolic) in one pass, and exports these
models in about a second, where the dynamo exporter took 10x longer and wrote an invalid graph for
TF-'same'-padded convs. Shapes are fixed at export time except the batch (`dynamic_batch`) and,
for fully convolutional tasks, optionally the spatial sides (`dynamic_spatial`).

Before tracing, the model is copied with BatchNorm folded into its convolutions and every other
module left as it is (`fuse_for_inference(..., fuse_act=False)`: the oneDNN conv+activation op
does not export); reversible sequences take their plain path; GroupNorm reduces axis by axis (see
`_StagedGroupNorm`). Each is the same function; the parity check confirms it on real inputs.

What the graph holds is the task's to say (`Task.export_graph`): a classifier, video or 3-D model
maps its input (named after the task's `inputs`) to logits; a detector exports either its full
graph (decoding and NMS inside, one image per run) or its raw heads with the anchors beside the
file (see `tasks/detection/export.py`). The file's metadata names its task, so that `OrtModel`
returns what the torch model returns.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ParityError, UserError
from ..layers.conv import reference_padding
from ..layers.fuse import fuse_for_inference, replace_modules
from ..layers.reversible import set_reversible
from .ort import META_ARRAYS, META_TASK, OrtModel, array_path

DEFAULT_OPSET = 17


class ExportError(UserError, ValueError):
    """A task, option or input that this export cannot take."""


def task_class(task):
    """The Task class of a task name, a Task object or a Task class."""
    from ..tasks import TASKS
    name = getattr(task, "name", task)
    if name not in TASKS:
        raise ExportError(f"cannot export for task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


class _StagedGroupNorm(nn.GroupNorm):
    """GroupNorm whose mean and variance reduce one axis at a time: ONNX Runtime sums a whole
    reduction in one float32 accumulator (its InstanceNormalization, which GroupNorm exports to,
    is off by ~1e-3 on a 128^3 volume), while partial means over one axis at a time stay at
    torch's accuracy (~1e-6). Same function: the groups' parts are of equal size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.shape[0], self.num_groups, -1, *x.shape[2:])  # N, G, C/G, spatial...
        axes = range(g.dim() - 1, 1, -1)
        mean = g
        for a in axes:
            mean = mean.mean(a, keepdim=True)
        diff = g - mean
        var = diff * diff
        for a in axes:
            var = var.mean(a, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand(-1, -1, g.shape[2], *([1] * (g.dim() - 3)))  # N, G, C/G, 1...
        shift = -mean.expand_as(scale) * scale
        if self.affine:
            w = self.weight.reshape(1, self.num_groups, -1, *([1] * (g.dim() - 3)))
            scale, shift = scale * w, shift * w + self.bias.reshape(w.shape)
        # one multiply-add over the volume instead of subtract, scale, weight and bias passes
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


def _staged(norm: nn.GroupNorm) -> _StagedGroupNorm:
    staged = _StagedGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
    staged.load_state_dict(norm.state_dict())
    return staged


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy with BatchNorm folded into the convs and only ops the ONNX exporter knows."""
    net = fuse_for_inference(model, fuse_act=False).cpu()  # a deep copy: the caller's model is untouched
    replace_modules(net, lambda m: _staged(m) if type(m) is nn.GroupNorm else None)
    set_reversible(net, False)  # the reversible autograd Function has no ONNX form; same outputs
    return net.requires_grad_(False)


def _as_tensor(inputs) -> torch.Tensor:
    x = torch.as_tensor(inputs) if not isinstance(inputs, torch.Tensor) else inputs
    if not x.is_floating_point() or x.dim() < 4:
        raise ExportError(f"example inputs must be a float batch (N, C, ...), got {x.dtype} of shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32).contiguous()


def export_onnx(model: nn.Module, example_inputs, path: str | Path, task, opset: int | None = None,
                dynamic_batch: bool = False, mode: str | None = None, *, dynamic_spatial: bool = False,
                check: bool = True, atol: float = 1e-4, rtol: float = 1e-6, threads: int | None = None) -> dict:
    """Write `model` as ONNX to `path` (BN folded), then check parity on `example_inputs`; return a summary.

    `mode` picks one of the task's alternative graphs (detectors: "full" or "raw"). `example_inputs`
    is a batch from the task's own data (what its eval transform yields); the check (`check_onnx`)
    runs on all of it and raises ParityError on a mismatch. The summary holds the path, names and
    shapes, the arrays written beside the file and the parity numbers."""
    cls = task_class(task)
    if dynamic_spatial and not cls.fully_convolutional:
        raise ExportError(f"dynamic_spatial is for fully convolutional models, not task {cls.name!r}")
    path, opset = Path(path), opset or DEFAULT_OPSET
    x = _as_tensor(example_inputs)
    net = prepare_for_export(model)
    try:
        graph = cls.export_graph(net, x, mode)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if graph.one_sample and dynamic_batch:
        raise ExportError(f"the {cls.name} graph{f' {mode!r}' if mode else ''} takes one sample at a time; "
                          f"export another mode for a dynamic batch")
    trace_x = x[:1] if graph.one_sample else x
    if dynamic_batch and trace_x.shape[0] == 1:  # a batch of 1 lets the tracer bake the size 1 in
        trace_x = trace_x.expand(2, *trace_x.shape[1:]).contiguous()
    axes = {}
    if dynamic_batch or dynamic_spatial:
        spatial = {i: n for i, n in zip(range(2, 5), ("depth", "height", "width"))} if dynamic_spatial else {}
        batch = {0: "batch"} if dynamic_batch else {}
        axes = {name: {**batch, **spatial} for name in (graph.input_name, *graph.output_names)}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), reference_padding():
        # Shape arithmetic is recorded as constants (expected: shapes are fixed but the batch);
        # the parity check below is what tells whether the trace is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Ee]xporting aten::index operator")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated", category=FutureWarning)
        torch.onnx.export(graph.module, (trace_x,), buf, dynamo=False, opset_version=opset,
                          input_names=[graph.input_name], output_names=graph.output_names,
                          dynamic_axes=axes or None, do_constant_folding=True)
    import onnx
    proto = onnx.load_from_string(buf.getvalue())
    meta = {META_TASK: cls.name, **graph.metadata}
    if graph.arrays:
        meta[META_ARRAYS] = json.dumps(sorted(graph.arrays))
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    arrays = {}
    for key, array in graph.arrays.items():
        np.save(array_path(path, key), array)
        arrays[key] = {"path": str(array_path(path, key)), "shape": list(array.shape)}
    shape = list(x.shape)
    if dynamic_batch:
        shape[0] = "batch"
    elif graph.one_sample:
        shape[0] = 1
    if dynamic_spatial:
        shape[2:] = ["depth", "height", "width"]
    info = {"path": str(path), "task": cls.name, "opset": opset, "input_name": graph.input_name,
            "input_shape": shape, "output_names": graph.output_names, "dynamic_batch": dynamic_batch,
            "mode": mode, "arrays": arrays, "size_bytes": path.stat().st_size, "parity": None}
    if check:
        info["parity"] = check_onnx(model, path, x, cls, atol=atol, rtol=rtol, threads=threads)
    return info


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_onnx(model: nn.Module, path: str | Path, inputs, task, *, atol: float = 1e-4, rtol: float = 1e-6,
               threads: int | None = None) -> dict:
    """Compare the ONNX file with the torch model on `inputs` (a batch of the task's data) as the task
    judges it (`Task.check_parity`); raise ParityError past the tolerances, else return the numbers."""
    return check_exported(model, OrtModel(path, threads=threads), inputs, task, atol=atol, rtol=rtol)


def check_exported(model: nn.Module, exported, inputs, task, *, atol: float = 1e-4, rtol: float = 1e-6) -> dict:
    """An opened export (ONNX Runtime, OpenVINO, LiteRT runner) against the torch model on `inputs`,
    as the task judges it; ParityError past the tolerances or for a file of another task."""
    cls = task_class(task)
    if exported.task not in (None, cls.name):
        raise ParityError(f"{exported.path}: exported for task {exported.task!r}, checked as {cls.name!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return cls.check_parity(model, exported, _as_tensor(inputs).to(_model_device(model)), atol, rtol)
    finally:
        model.train(was_training)


def describe_parity(parity: dict | None) -> str:
    """The export's parity check against PyTorch (`check_onnx`'s numbers) as one sentence; a
    detector's check is the one that compares detections."""
    if not parity:
        return "not checked against PyTorch"
    n = parity.get("samples", 0)
    detections = "compared" in parity
    what = ("image" if detections else "input") + ("" if n == 1 else "s")
    parts = []
    if "max_abs_diff" in parity:
        heads = "raw head outputs" if detections else "outputs"
        parts.append(f"{heads} differ by at most {parity['max_abs_diff']:.1e} (tolerance "
                     f"{parity['tolerance']:.1e}, largest output {parity['max_abs_output']:.3g})")
    if detections:
        if parity["compared"]:
            # A failed check raises during export, so every detection here matched.
            worst = f"worst IoU {parity['min_iou']:.4f}" if parity.get("min_iou") is not None else ""
            score = parity.get("max_score_diff")
            score = f"largest score difference {score:.1e}" if score is not None else ""
            extra = ", ".join(x for x in (worst, score) if x)
            parts.append(f"all {parity['compared']} detections scoring at least {parity['score_thresh']:g} "
                         f"match{f' ({extra})' if extra else ''}")
        else:
            parts.append(f"no detection scored at least {parity['score_thresh']:g}, so none were compared")
    return f"checked against PyTorch on {n} real {what}: {'; '.join(parts)}; passed"
