"""ONNX export of every model family, and a parity check of the file against the torch model.

`export_onnx` writes one ONNX file per model with torch's TorchScript-based exporter
(`dynamo=False`): it exports the detector's data-dependent postprocess (score masks, per-class NMS
as ONNX NonMaxSuppression, through torchvision's registered symbolic) in one pass, and exports these
models in about a second, where the dynamo exporter took 10x longer and wrote an invalid graph for
TF-'same'-padded convs. Shapes are fixed at export time except the batch (`dynamic_batch`) and,
for the fully convolutional 3D U-Net, optionally D/H/W (`dynamic_spatial`).

Before tracing, the model is copied with BatchNorm folded into its convolutions
(`fuse_for_inference`), and the fused conv+activation modules are turned back into plain conv ->
activation (their oneDNN op does not export); reversible sequences take their plain path;
squeeze-excite pools with a mean (ONNX pooling needs a constant kernel, the tracer records the
map size as a graph value); GroupNorm reduces axis by axis (see `_StagedGroupNorm`). Each is the
same function; the parity check confirms it on real inputs.

Inputs and outputs per task (the input is what the task's eval transform produces):
  classify   image (N, 3, H, W) -> logits (N, classes)
  video      video (N, 3, T, H, W) -> logits (N, classes)
  segment3d  volume (N, C, D, H, W) -> logits (N, 3, D, H, W)
  detect     image (1, 3, S, S), already resized and scaled to [-1, 1] as the detection eval
             transform does, ->
               detector_mode="full": boxes (K, 4) xyxy input pixels, scores (K,), labels (K,) int64;
                 decoding and NMS inside the graph; batch 1 (OrtModel loops over a batch)
               detector_mode="raw": box_regression (N, A, 4), class_logits (N, A, classes), and the
                 anchors (A, 4) xyxy pixels in `<name>.anchors.npy` beside the file; decode with
                 the detector's box coder (weights in the file's metadata) or let OrtModel do it.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..layers.conv import reference_padding
from ..layers.fuse import FusedConvAct, GatedConv1x1, fuse_for_inference
from ..layers.mbconv import SqueezeExcite
from ..layers.reversible import set_reversible
from .ort import META_DECODER, META_DETECTOR_MODE, META_TASK, DetectionDecoder, OrtModel, anchors_path

DEFAULT_OPSET = 17
TASKS = ("classify", "detect", "video", "segment3d")
DETECTOR_MODES = ("full", "raw")
_NAMES = {  # task -> (input name, output names)
    "classify": ("image", ["logits"]),
    "video": ("video", ["logits"]),
    "segment3d": ("volume", ["logits"]),
    ("detect", "full"): ("image", ["boxes", "scores", "labels"]),
    ("detect", "raw"): ("image", ["box_regression", "class_logits"]),
}


class ExportError(UserError, ValueError):
    """A task, option or input that this export cannot take."""


class ParityError(UserError, RuntimeError):
    """The ONNX file does not compute what the torch model computes on the given inputs."""


def task_name(task) -> str:
    """'classify', 'detect', 'video' or 'segment3d' from a task name or a Task object."""
    name = getattr(task, "name", task)
    if name not in TASKS:
        raise ExportError(f"cannot export for task {name!r}; expected one of {', '.join(TASKS)}")
    return name


class _MeanSqueezeExcite(SqueezeExcite):
    """SqueezeExcite pooling with a mean: the tracer records `x.shape` as graph values, and ONNX
    pooling needs a constant kernel size (same result as the `avg_pool2d` over the whole map)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


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


def _unfuse_activations(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, FusedConvAct):  # keep the folded conv, drop the oneDNN post-op path
            setattr(module, name, nn.Sequential(child.conv, child.act))
        elif isinstance(child, GatedConv1x1):  # the per-sample weight scaling has no plain ONNX form
            setattr(module, name, nn.Sequential(child.se, child.conv, child.act))
            _unfuse_activations(getattr(module, name))
        else:
            _unfuse_activations(child)


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy with BatchNorm folded into the convs and only ops the ONNX exporter knows."""
    net = fuse_for_inference(model).cpu()  # a deep copy: the caller's model is untouched
    _unfuse_activations(net)
    for m in net.modules():
        if type(m) is SqueezeExcite:
            m.__class__ = _MeanSqueezeExcite
        elif type(m) is nn.GroupNorm:
            m.__class__ = _StagedGroupNorm
    set_reversible(net, False)  # the reversible autograd Function has no ONNX form; same outputs
    return net.requires_grad_(False)


class _FullDetector(nn.Module):
    """Heads + the detector's own postprocess for one image, anchors baked in as a constant."""

    def __init__(self, detector: nn.Module, anchors: torch.Tensor, image_size: tuple[int, int]):
        super().__init__()
        self.detector, self.image_size = detector, image_size
        self.register_buffer("anchors", anchors)

    def forward(self, image: torch.Tensor):
        regression, logits, _ = self.detector.head_outputs(image)
        det = self.detector.postprocess(regression, logits, self.anchors, self.image_size)[0]
        return det["boxes"], det["scores"], det["labels"]


class _RawDetector(nn.Module):
    """The detector up to its raw head outputs (box regression, class logits)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        regression, logits, _ = self.detector.head_outputs(image)
        return regression, logits


def _as_tensor(inputs) -> torch.Tensor:
    x = torch.as_tensor(inputs) if not isinstance(inputs, torch.Tensor) else inputs
    if not x.is_floating_point() or x.dim() < 4:
        raise ExportError(f"example inputs must be a float batch (N, C, ...), got {x.dtype} of shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float32).contiguous()


def export_onnx(model: nn.Module, example_inputs, path: str | Path, task, opset: int | None = None,
                dynamic_batch: bool = False, detector_mode: str = "full", *, dynamic_spatial: bool = False,
                check: bool = True, atol: float = 1e-4, rtol: float = 1e-6, threads: int | None = None) -> dict:
    """Write `model` as ONNX to `path` (BN folded), then check parity on `example_inputs`; return a summary.

    `example_inputs` is a batch from the task's own data (what its eval transform yields); the
    check (`check_onnx`) runs on all of it and raises ParityError on a mismatch. The summary holds
    the path, names and shapes, the anchors file (raw detectors) and the parity numbers."""
    task = task_name(task)
    if detector_mode not in DETECTOR_MODES:
        raise ExportError(f"detector_mode must be 'full' or 'raw', got {detector_mode!r}")
    full = task == "detect" and detector_mode == "full"
    if full and dynamic_batch:
        raise ExportError("the full detector graph (decoding + NMS) takes one image; export "
                          "detector_mode='raw' for a dynamic batch")
    if dynamic_spatial and task != "segment3d":
        raise ExportError(f"dynamic_spatial is for the fully convolutional 3D U-Net, not task {task!r}")
    path, opset = Path(path), opset or DEFAULT_OPSET
    x = _as_tensor(example_inputs)
    net = prepare_for_export(model)
    input_name, output_names = _NAMES[(task, detector_mode) if task == "detect" else task]
    trace_x = x[:1] if full else x
    if dynamic_batch and trace_x.shape[0] == 1:  # a batch of 1 lets the tracer bake the size 1 in
        trace_x = trace_x.expand(2, *trace_x.shape[1:]).contiguous()
    anchors, wrapper = None, net
    if task == "detect":
        with torch.no_grad(), reference_padding():
            _, _, sizes = net.head_outputs(trace_x[:1])
        image_size = tuple(int(s) for s in x.shape[-2:])
        anchors = net.anchors(sizes, image_size, torch.device("cpu")).float().clone()
        wrapper = _FullDetector(net, anchors, image_size) if full else _RawDetector(net)
    axes = {}
    if dynamic_batch or dynamic_spatial:
        spatial = {i: n for i, n in zip(range(2, 5), ("depth", "height", "width"))} if dynamic_spatial else {}
        batch = {0: "batch"} if dynamic_batch else {}
        axes = {input_name: {**batch, **spatial}, **{o: {**batch, **spatial} for o in output_names}}
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
        torch.onnx.export(wrapper, (trace_x,), buf, dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=output_names, dynamic_axes=axes or None, do_constant_folding=True)
    import onnx
    proto = onnx.load_from_string(buf.getvalue())
    meta = {META_TASK: task}
    if task == "detect":
        meta[META_DETECTOR_MODE] = detector_mode
        meta[META_DECODER] = json.dumps(DetectionDecoder.config_of(net))
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    apath = None
    if task == "detect" and not full:
        apath = anchors_path(path)
        np.save(apath, anchors.numpy())
    shape = list(x.shape)
    if dynamic_batch:
        shape[0] = "batch"
    elif full:
        shape[0] = 1
    if dynamic_spatial:
        shape[2:] = ["depth", "height", "width"]
    info = {"path": str(path), "task": task, "opset": opset, "input_name": input_name, "input_shape": shape,
            "output_names": output_names, "dynamic_batch": dynamic_batch,
            "detector_mode": detector_mode if task == "detect" else None,
            "anchors": str(apath) if apath else None,
            "num_anchors": int(anchors.shape[0]) if anchors is not None else None,
            "size_bytes": path.stat().st_size, "parity": None}
    if check:
        info["parity"] = check_onnx(model, path, x, task, atol=atol, rtol=rtol, threads=threads)
    return info


def match_detections(ref: dict, test: dict, score_thresh: float = 0.05, iou_thresh: float = 0.99,
                     score_atol: float = 1e-3, limit: int | None = None) -> dict:
    """Greedy one-to-one match of two detection sets (same label, IoU >= iou_thresh, scores within
    score_atol), both ways, for every box scoring >= score_thresh + score_atol in either set.

    Returns required (boxes that must match), matched, min_iou (worst IoU of a required box with its
    best candidate; None without boxes) and max_score_diff over the matched pairs. Candidates
    scoring down to score_thresh - score_atol count, so scores rounding across the threshold are
    not misses. With `limit` (detections per image), a list cut at the limit is compared only above
    its lowest score, since boxes around the cut may fall on either side of it."""
    from torchvision.ops import box_iou
    thr = score_thresh
    for d in (ref, test):
        if limit is not None and len(d["scores"]) >= limit:
            thr = max(thr, float(d["scores"].min()) + 2 * score_atol)
    required, matched, ious, score_diffs = 0, 0, [], []
    for a, b in ((ref, test), (test, ref)):
        a_boxes, a_scores, a_labels = (a[k].detach().cpu() for k in ("boxes", "scores", "labels"))
        b_boxes, b_scores, b_labels = (b[k].detach().cpu() for k in ("boxes", "scores", "labels"))
        iou = box_iou(a_boxes.float(), b_boxes.float()) if len(a_boxes) and len(b_boxes) else None
        used = torch.zeros(len(b_boxes), dtype=torch.bool)
        for i in torch.argsort(a_scores, descending=True).tolist():
            if a_scores[i] < thr + score_atol:
                continue
            required += 1
            ok = (b_labels == a_labels[i]) & (b_scores >= thr - score_atol) & ~used
            if iou is None or not ok.any():
                ious.append(0.0)
                continue
            cand = torch.where(ok, iou[i], torch.tensor(-1.0))
            j = int(cand.argmax())
            ious.append(float(cand[j]))
            diff = abs(float(a_scores[i]) - float(b_scores[j]))
            if cand[j] >= iou_thresh and diff <= score_atol:
                used[j] = True
                matched += 1
                score_diffs.append(diff)
    return {"required": required, "matched": matched, "min_iou": min(ious) if ious else None,
            "max_score_diff": max(score_diffs) if score_diffs else None}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _max_abs_diff(ref, got: list[np.ndarray]) -> tuple[float, float]:
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    if len(refs) != len(got):
        raise ParityError(f"the ONNX graph has {len(got)} outputs, the torch model {len(refs)}")
    diff, scale = 0.0, 0.0
    for r, g in zip(refs, got):
        r = r.detach().float().cpu().numpy()
        if r.shape != g.shape:
            raise ParityError(f"ONNX output shape {g.shape} differs from the torch model's {r.shape}")
        d = float(np.abs(r - g).max()) if r.size else 0.0
        diff = d if np.isnan(d) else max(diff, d)
        scale = max(scale, float(np.abs(r).max()) if r.size else 0.0)
    return diff, scale


def check_onnx(model: nn.Module, path: str | Path, inputs, task, *, atol: float = 1e-4, rtol: float = 1e-6,
               score_thresh: float = 0.05, iou_thresh: float = 0.99, score_atol: float = 1e-3,
               threads: int | None = None) -> dict:
    """Compare the ONNX file with the torch model on `inputs` (a batch of the task's data); raise
    ParityError past the tolerances, else return the numbers.

    Networks (and a raw detector's heads): max_abs_diff <= atol + rtol * max_abs_output (the rtol
    term only matters for outputs in the hundreds, where float32 rounding alone nears atol).
    Detectors: every detection scoring above `score_thresh` matched one-to-one
    (`match_detections`): matched fraction 1.0, min_iou >= iou_thresh, max_score_diff <= score_atol.
    `compared` counts the detections checked: 0 (an untrained detector scores nothing above the
    threshold) leaves a full graph unchecked; a raw graph's heads are compared regardless."""
    task, path = task_name(task), Path(path)
    x = _as_tensor(inputs)
    ort_model = OrtModel(path, threads=threads)
    if ort_model.task not in (None, task):
        raise ParityError(f"{path}: exported for task {ort_model.task!r}, checked as {task!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            xd = x.to(_model_device(model))
            if task == "detect":
                return _check_detector(model, ort_model, xd, path, atol, rtol, score_thresh, iou_thresh, score_atol)
            ref = model(xd)
    finally:
        model.train(was_training)
    diff, scale = _max_abs_diff(ref, ort_model.run(x))
    tol = atol + rtol * scale
    result = {"task": task, "samples": int(x.shape[0]), "max_abs_diff": diff, "max_abs_output": scale, "tolerance": tol}
    if not diff <= tol:  # also catches NaN
        raise ParityError(f"{path}: ONNX output differs from the torch model by up to {diff:.3g} "
                          f"(tolerance {tol:.3g}, outputs up to {scale:.3g}) on {x.shape[0]} inputs")
    return result


def _check_detector(model, ort_model: OrtModel, x: torch.Tensor, path: Path, atol: float, rtol: float,
                    score_thresh: float, iou_thresh: float, score_atol: float) -> dict:
    result = {"task": "detect", "mode": ort_model.detector_mode, "samples": int(x.shape[0])}
    problems = []
    if ort_model.detector_mode == "raw":
        regression, logits, _ = model.head_outputs(x)
        diff, scale = _max_abs_diff((regression, logits), ort_model.run(x.cpu()))
        tol = atol + rtol * scale
        result.update(max_abs_diff=diff, max_abs_output=scale, tolerance=tol)
        if not diff <= tol:
            problems.append(f"raw head outputs differ by up to {diff:.3g} (tolerance {tol:.3g})")
    ref, got = model(x), ort_model(x.cpu())
    limit = getattr(model, "detections_per_img", None)
    stats = [match_detections(r, g, score_thresh, iou_thresh, score_atol, limit) for r, g in zip(ref, got)]
    required = sum(s["required"] for s in stats)
    matched = sum(s["matched"] for s in stats)
    ious = [s["min_iou"] for s in stats if s["min_iou"] is not None]
    diffs = [s["max_score_diff"] for s in stats if s["max_score_diff"] is not None]
    result.update(compared=required, matched=matched / required if required else 1.0,
                  min_iou=min(ious) if ious else None, max_score_diff=max(diffs) if diffs else None,
                  score_thresh=score_thresh)
    if matched < required:
        problems.append(f"{required - matched} of {required} detections scoring >= {score_thresh:g} have no "
                        f"match (same label, IoU >= {iou_thresh:g}, score within {score_atol:g}); "
                        f"worst IoU {result['min_iou']:.4f}")
    if problems:
        raise ParityError(f"{path}: ONNX detector differs from the torch model on {x.shape[0]} images: "
                          + "; ".join(problems))
    return result
