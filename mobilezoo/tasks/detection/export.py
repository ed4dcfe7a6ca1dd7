"""What a detector's ONNX graph holds, how its outputs become detections again, and how its
parity with the torch detector is judged.

Two graphs:
  full  image (1, 3, S, S), already resized and scaled to [-1, 1] as the eval transform does ->
        boxes (K, 4) xyxy input pixels, scores (K,), labels (K,) int64; decoding and NMS in the
        graph, one image per run.
  raw   image (N, 3, S, S) -> box_regression (N, A, 4), class_logits (N, A, classes), with the
        anchors (A, 4) in `<name>.anchors.npy` beside the file and the postprocess settings in the
        metadata: decoded outside the graph by the detector's own postprocess in fp32 (what INT8
        quantization needs, as the score threshold and NMS stay exact).
"""
from __future__ import annotations

import json

import torch
from torch import nn

from ...engine.parity import max_abs_diff
from ...errors import ParityError
from ..base import ExportGraph

MODES = ("full", "raw")
META_MODE = "mobilezoo.detector_mode"
META_DECODER = "mobilezoo.decoder"  # JSON: the detector's postprocess settings (raw graphs)


class FullDetector(nn.Module):
    """Heads + the detector's own postprocess for one image, anchors baked in as a constant."""

    def __init__(self, detector: nn.Module, anchors: torch.Tensor, image_size: tuple[int, int]):
        super().__init__()
        self.detector, self.image_size = detector, image_size
        self.register_buffer("anchors", anchors)

    def forward(self, image: torch.Tensor):
        regression, logits, _ = self.detector.head_outputs(image)
        det = self.detector.postprocess(regression, logits, self.anchors, self.image_size)[0]
        return det["boxes"], det["scores"], det["labels"]


class RawDetector(nn.Module):
    """The detector up to its raw head outputs (box regression, class logits)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        regression, logits, _ = self.detector.head_outputs(image)
        return regression, logits


class DetectionDecoder:
    """The detector's own postprocess over raw head outputs, rebuilt from the settings in the file."""

    KEYS = ("num_classes", "background", "score_thresh", "nms_iou", "detections_per_img", "topk_candidates")

    def __init__(self, anchors: torch.Tensor, config: dict):
        from torchvision.models.detection._utils import BoxCoder
        self.anchors = anchors
        for k in self.KEYS:
            setattr(self, k, config[k])
        self.box_coder = BoxCoder(weights=tuple(config["box_coder_weights"]),
                                  bbox_xform_clip=config["bbox_xform_clip"])

    @staticmethod
    def config_of(detector) -> dict:
        """The settings of an SSDLite's postprocess, as stored in a raw graph's metadata."""
        cfg = {k: getattr(detector, k) for k in DetectionDecoder.KEYS}
        cfg["box_coder_weights"] = list(detector.box_coder.weights)
        cfg["bbox_xform_clip"] = float(detector.box_coder.bbox_xform_clip)
        return cfg

    def __call__(self, regression: torch.Tensor, logits: torch.Tensor, image_size) -> list[dict]:
        """List of {"boxes", "scores", "labels"}, one per image, exactly as the torch detector decodes."""
        from ...models.ssdlite import SSDLite
        # The detector's own method (it only reads the attributes set above): decoding in
        # deployment cannot drift from decoding in training and evaluation.
        return SSDLite.postprocess(self, regression, logits, self.anchors, tuple(image_size))


def export_graph(net: nn.Module, x: torch.Tensor, mode: str | None) -> ExportGraph:
    """The full (decoding + NMS, one image) or raw (heads, anchors beside) graph of a detector."""
    from ...layers.conv import reference_padding
    mode = mode or "full"
    if mode not in MODES:
        raise ValueError(f"detector mode must be 'full' or 'raw', got {mode!r}")
    with torch.no_grad(), reference_padding():
        _, _, sizes = net.head_outputs(x[:1])
    image_size = tuple(int(s) for s in x.shape[-2:])
    anchors = net.anchors(sizes, image_size, torch.device("cpu")).float().clone()
    if mode == "full":
        return ExportGraph(FullDetector(net, anchors, image_size), "image", ["boxes", "scores", "labels"],
                           {META_MODE: mode}, one_sample=True)
    return ExportGraph(RawDetector(net), "image", ["box_regression", "class_logits"],
                       {META_MODE: mode, META_DECODER: json.dumps(DetectionDecoder.config_of(net))},
                       arrays={"anchors": anchors.numpy()})


def onnx_result(run, x: torch.Tensor, onnx) -> list[dict]:
    """Detections of a batch from a detector's ONNX graph (`run` gives the session's outputs)."""
    if onnx.metadata.get(META_MODE) == "full":  # one image per run
        return [dict(zip(("boxes", "scores", "labels"), run(image[None]))) for image in x]
    if "anchors" not in onnx.arrays:
        raise ValueError(f"{onnx.path}: a raw detector graph needs its anchors file beside it")
    decoder = DetectionDecoder(onnx.arrays["anchors"], json.loads(onnx.metadata[META_DECODER]))
    regression, logits = run(x)
    return decoder(regression, logits, tuple(x.shape[-2:]))


def quantize_refusal(metadata: dict) -> str | None:
    """Why a detector graph cannot be quantized (None: it can)."""
    if metadata.get(META_MODE) != "raw":
        return ("a detector with decoding and NMS in the graph; quantize its raw-heads export instead "
                "(detector mode 'raw'), whose NMS stays fp32")
    return None


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


def check_parity(model: nn.Module, onnx, x: torch.Tensor, atol: float, rtol: float, score_thresh: float = 0.05,
                 iou_thresh: float = 0.99, score_atol: float = 1e-3) -> dict:
    """A detector's ONNX graph against the torch detector: every detection scoring above
    `score_thresh` matched one-to-one (`match_detections`), and a raw graph's heads within
    atol + rtol * max output. `compared` counts the detections checked (0: an untrained detector
    scored nothing above the threshold, which leaves a full graph unchecked)."""
    mode = onnx.metadata.get(META_MODE)
    result = {"task": "detect", "mode": mode, "samples": int(x.shape[0])}
    problems = []
    if mode == "raw":
        regression, logits, _ = model.head_outputs(x)
        diff, scale = max_abs_diff((regression, logits), onnx.run(x.cpu()))
        tol = atol + rtol * scale
        result.update(max_abs_diff=diff, max_abs_output=scale, tolerance=tol)
        if not diff <= tol:
            problems.append(f"raw head outputs differ by up to {diff:.3g} (tolerance {tol:.3g})")
    ref, got = model(x), onnx(x.cpu())
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
        raise ParityError(f"{onnx.path}: ONNX detector differs from the torch model on {x.shape[0]} images: "
                          + "; ".join(problems))
    return result
