"""COCO box mAP with pycocotools' COCOeval over detections gathered from every rank."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ...engine.distributed import is_distributed
from ...engine.metrics import SumMetric
from .coco import CocoAnnotations

# COCOeval.stats indices (iouType bbox)
STATS = {"map": 0, "ap50": 1, "ap75": 2, "ap_small": 3, "ap_medium": 4, "ap_large": 5, "ar100": 8}


def to_original(boxes: torch.Tensor, input_hw, orig_hw) -> torch.Tensor:
    """xyxy boxes in input-image pixels -> xyxy in original-image pixels, clipped to the image."""
    (ih, iw), (oh, ow) = input_hw, (float(orig_hw[0]), float(orig_hw[1]))
    scale = boxes.new_tensor([ow / iw, oh / ih, ow / iw, oh / ih])
    out = boxes.float() * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, ow)
    out[:, 1::2] = out[:, 1::2].clamp(0, oh)
    return out


class CocoMetric(SumMetric):
    """Collects detections as COCO results; `compute` runs COCOeval (bbox) against `anns`.

    Only the images that were evaluated count (so a limited val set is scored on itself). Crowd
    ground truth is handled by COCOeval: detections matched to it are neither right nor wrong.
    A value of -1 means 'no ground truth of that kind', as pycocotools reports it."""

    def __init__(self, anns: CocoAnnotations):
        super().__init__()
        self.anns = anns
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def update(self, detections: list[dict], image_ids, orig_sizes, input_hw) -> None:
        """Add a batch of model outputs (boxes xyxy in pixels of the `input_hw` input, labels 0..K-1)."""
        for det, image_id, orig in zip(detections, image_ids.tolist(), orig_sizes.tolist()):
            self.image_ids.append(int(image_id))
            boxes = to_original(det["boxes"].detach().cpu(), input_hw, orig)
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), det["scores"].detach().float().cpu().tolist(),
                                         det["labels"].detach().cpu().tolist()):
                self.results.append({"image_id": int(image_id),
                                     "category_id": self.anns.label_to_cat(int(label)),
                                     "bbox": [round(v, 3) for v in box], "score": float(score)})

    def reduce(self) -> None:
        """Gather every rank's detections and image ids onto every rank."""
        if is_distributed():
            world = torch.distributed.get_world_size()
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, (self.results, self.image_ids))
            self.results = [r for res, _ in gathered for r in res]
            self.image_ids = [i for _, ids in gathered for i in ids]

    def compute(self) -> dict:
        """COCO mAP@[.5:.95], AP50, AP75, AP small/medium/large, AR@100 and per-class AP."""
        gt = self.anns.coco
        img_ids = sorted(set(self.image_ids))
        dt = COCO()
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                      "annotations": [{**r, "id": i + 1, "area": r["bbox"][2] * r["bbox"][3],
                                       "iscrowd": 0} for i, r in enumerate(self.results)]}
        names = self.anns.class_names
        out = {k: -1.0 for k in STATS}
        per_class = {n: -1.0 for n in names}
        if img_ids:
            with contextlib.redirect_stdout(io.StringIO()):
                dt.createIndex()
                ev = COCOeval(gt, dt, iouType="bbox")
                ev.params.imgIds = img_ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            out = {k: float(ev.stats[i]) for k, i in STATS.items()}
            precision = ev.eval["precision"]  # (iou, recall, class, area, max dets)
            for k, name in enumerate(names):
                p = precision[:, :, k, 0, -1]
                p = p[p > -1]
                per_class[name] = float(np.mean(p)) if p.size else -1.0
            out["draw_thresh"] = best_f1_threshold(ev)
        return {**out, "per_class_ap": per_class, "count": len(img_ids), "detections": len(self.results)}


def best_f1_threshold(ev: COCOeval) -> float:
    """The score at which boxes are worth drawing: per class, the score where F1 at IoU 0.5 (all
    areas, 100 detections) peaks along COCOeval's precision-recall curve; the median over classes.
    A weak detector gets a high threshold (few, mostly right boxes), a good one a low one."""
    recall = np.asarray(ev.params.recThrs)
    best = []
    for k in range(ev.eval["precision"].shape[2]):
        p, scores = ev.eval["precision"][0, :, k, 0, -1], ev.eval["scores"][0, :, k, 0, -1]
        ok = p > 0
        if ok.any():
            f1 = 2 * p[ok] * recall[ok] / (p[ok] + recall[ok])
            best.append(float(scores[ok][np.argmax(f1)]))
    return float(np.median(best)) if best else 0.5
