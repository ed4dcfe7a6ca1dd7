"""The detection task: COCO-format data, an SSDLite-style detector, COCO mAP, and predict-and-draw."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from ... import data as embedded
from ...errors import DataError
from ...models import create_model
from ..base import InputSpec, OnBadSample, Predictions, Task, expand_images, read_image, readable, task_options
from . import export as detector_export
from .coco import CocoAnnotations, CocoDetection
from .image_ids import CocoImageIds
from .metric import CocoMetric, to_original
from .transforms import DEFAULT_AUGMENT, SIGNED_UNIT, collate_detection, eval_transform, train_transform

log = logging.getLogger("mobilezoo")
GALLERY = 8  # val images drawn into the report
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]
LAYOUT = "ROOT/train/, ROOT/val/ and ROOT/annotations/instances_{train,val}.json (COCO layout)"


def fixed_subset(ids: list[int], limit: int | None, seed: int = 0) -> list[int]:
    """`limit` ids drawn from a fixed shuffle (all ids if no limit), in their original order."""
    if not limit or limit >= len(ids):
        return list(ids)
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(ids), generator=g)[:limit].tolist())
    return [ids[i] for i in keep]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A model input in [-1, 1] back to a uint8 image."""
    return ((image.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[int], scores: list[float],
         names: list[str]) -> torch.Tensor:
    """uint8 image with the boxes (xyxy pixels) drawn and captioned 'name score'."""
    if len(boxes) == 0:
        return image
    captions = [f"{names[k]} {s:.2f}" for k, s in zip(labels, scores)]
    colors = [PALETTE[k % len(PALETTE)] for k in labels]
    return draw_bounding_boxes(image, boxes.float(), captions, colors=colors, width=2)


class CocoResults(Predictions):
    """COCO-results dicts (a plain list to json.dumps) with `count`, the number of images
    predicted, and `ids`, the CocoImageIds that says where their image ids came from."""

    def __init__(self, ids: CocoImageIds):
        super().__init__(count=0)
        self.ids = ids


class DetectionTask(Task):
    """Train/eval/predict a detector on COCO-format data: `data.name` is `shapes` (generated) or a
    folder holding train/ and val/ image folders and annotations/instances_{train,val}.json.

    `data.augment` takes `hflip` and `ssd_crop`, the probabilities of a horizontal flip and of the
    SSD random crop (defaults 0.5 and 0.85)."""

    name = "detect"
    headline = "map"
    inputs = InputSpec("image", (3, 320, 320), 16, (3, 128, 128), 2)
    default_normalisation = SIGNED_UNIT
    collate = staticmethod(collate_detection)

    def __init__(self, recipe):
        super().__init__(recipe)
        self.aug = task_options(recipe.data.augment, DEFAULT_AUGMENT)
        for k, v in self.aug.items():
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
                raise DataError(f"data.augment.{k} must be a probability in [0, 1], got {v!r}")
        self._anns: dict[str, CocoAnnotations] = {}
        self._gallery: list[tuple[torch.Tensor, dict]] = []

    # --- data -----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Dataset root (see LAYOUT)."""
        root = embedded.resolve(self.recipe.data.name)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected {LAYOUT})")
        return root

    def annotations(self, split: str) -> CocoAnnotations:
        """The validated instances file of a split (loaded once per task)."""
        if split not in self._anns:
            anns = CocoAnnotations(self.root / "annotations" / f"instances_{split}.json")
            names = self.recipe.data.class_names
            if names is not None and anns.class_names != list(names):
                raise DataError(f"{anns.file}: categories {anns.class_names} differ from the run's "
                                f"{list(names)}")
            for other in self._anns.values():
                if other.cat_ids != anns.cat_ids or other.class_names != anns.class_names:
                    raise DataError(f"{anns.file}: categories differ from those of {other.file}")
            self.recipe.data.class_names = anns.class_names
            self._anns[split] = anns
        return self._anns[split]

    def _split(self, split: str, transform, limit: int | None) -> CocoDetection:
        anns = self.annotations(split)
        return CocoDetection(self.root / split, anns, transform, self.recipe.data.skip_bad_samples,
                             fixed_subset(anns.image_ids, limit))

    def datasets(self) -> tuple[Dataset, Dataset]:
        d = self.recipe.data
        return (self._split("train", train_transform(d.img_size, self.aug, *self.normalisation()), d.limit_train),
                self.val_dataset())

    def val_dataset(self) -> Dataset:
        """The val split with eval transforms."""
        return self._split("val", eval_transform(self.recipe.data.img_size, *self.normalisation()),
                           self.recipe.data.limit_val)

    def calibration_dataset(self) -> Dataset:
        return self._split("train", eval_transform(self.recipe.data.img_size, *self.normalisation()),
                           self.recipe.data.limit_train)

    @property
    def num_classes(self) -> int:
        """Number of object classes K (labels 0..K-1; no background slot)."""
        if self.recipe.data.class_names is None:
            self.annotations("val")
        return len(self.recipe.data.class_names)

    def category_ids(self) -> list[int]:
        """COCO category id of each label, from the data; 1..K if the data is not at hand."""
        if "val" not in self._anns:
            path = embedded.resolve(self.recipe.data.name) / "annotations" / "instances_val.json"
            if not path.is_file():
                k = self.num_classes
                log.warning("%s not found; reporting category ids 1..%d in class-name order", path, k)
                return list(range(1, k + 1))
        return self.annotations("val").cat_ids

    # --- model, loss, metric --------------------------------------------------------------------

    @staticmethod
    def network(model: nn.Module):
        """Detectors are timed and quantized up to their raw box and class outputs."""
        return model.head_outputs

    @classmethod
    def bench_model_kwargs(cls, shape: tuple[int, ...]) -> dict:
        return {"num_classes": 90}  # COCO's 90 classes, as the released detectors

    @classmethod
    def output_info(cls, name: str, model: nn.Module, x: torch.Tensor, out, kwargs: dict) -> dict:
        regression, logits, _ = out
        features = {f"feature{i}": list(f.shape) for i, f in enumerate(model.features(x))}
        return {"output_shapes": {"box_regression": list(regression.shape), "class_logits": list(logits.shape),
                                  **features}, "anchors": regression.shape[1]}

    export_modes = detector_export.MODES
    int8_mode = "raw"  # INT8 quantizes the heads; the score threshold and NMS stay fp32

    @classmethod
    def export_graph(cls, net: nn.Module, x: torch.Tensor, mode: str | None = None):
        return detector_export.export_graph(net, x, mode)

    @classmethod
    def onnx_result(cls, run, x: torch.Tensor, onnx):
        return detector_export.onnx_result(run, x, onnx)

    @classmethod
    def check_parity(cls, model: nn.Module, onnx, x: torch.Tensor, atol: float, rtol: float) -> dict:
        return detector_export.check_parity(model, onnx, x, atol, rtol)

    @classmethod
    def quantize_refusal(cls, metadata: dict) -> str | None:
        return detector_export.quantize_refusal(metadata)

    def build_model(self) -> nn.Module:
        return create_model(self.recipe.model.name, num_classes=self.num_classes, **self.recipe.model.args)

    def batch_size(self, batch: dict) -> int:
        return len(batch["image"])

    def forward(self, model: nn.Module, batch: dict):
        return model(batch["image"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        losses = model(batch["image"], batch["target"])
        return sum(losses.values())

    def metric(self) -> CocoMetric:
        self._gallery = []
        return CocoMetric(self.annotations("val"))

    def eval_step(self, model: nn.Module, batch: dict, metric: CocoMetric) -> None:
        images = batch["image"]
        detections = model(images)
        metric.update(detections, batch["image_id"], batch["orig_size"], tuple(images.shape[-2:]))
        for image, det in zip(images, detections):
            if len(self._gallery) >= GALLERY:
                break
            self._gallery.append((to_uint8(image), {k: v.detach().cpu() for k, v in det.items()}))

    # --- reporting ------------------------------------------------------------------------------

    def summary(self, m: dict) -> str:
        return f"mAP {m['map']:.3f}, AP50 {m['ap50']:.3f} on {m['count']} images"

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        if "map" not in metrics:
            return []
        lines = [f"**val mAP@[.5:.95] {metrics['map']:.3f}**, AP50 {metrics['ap50']:.3f}, "
                 f"AP75 {metrics['ap75']:.3f}; AP small {metrics['ap_small']:.3f}, "
                 f"medium {metrics['ap_medium']:.3f}, large {metrics['ap_large']:.3f} "
                 f"(COCOeval on {metrics['count']} images; -1: no objects of that size)", ""]
        if self._gallery:
            names = self.recipe.data.class_names
            drawn = []
            thresh = metrics.get("draw_thresh", 0.5)
            for image, det in self._gallery:
                keep = det["scores"] >= thresh
                drawn.append(draw(image, det["boxes"][keep], det["labels"][keep].tolist(),
                                  det["scores"][keep].tolist(), names))
            grid = make_grid(drawn, nrow=4, padding=4, pad_value=255)
            write_png(grid, str(Path(run_dir) / "detections.png"))
            lines += [f"Detections with score >= {thresh:.2f} on the first val images (the score of best F1 at "
                      "IoU 0.5 on val, median over classes):", "", "![detections](detections.png)", ""]
        rows = [f"| {n} | {ap:.3f} |" for n, ap in metrics["per_class_ap"].items()]
        return lines + ["| class | AP@[.5:.95] |", "|---|---|", *rows]

    predict_options = ("score_thresh", "annotations")
    predicts_into_folder = True

    @torch.no_grad()

    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None, score_thresh: float = 0.3,
                annotations: str | Path | None = None) -> CocoResults:
        """COCO-results dicts (one per box with score >= score_thresh) for image files or folders.

        Each dict: image_id (the image's id in its COCO instances file, `annotations` or the one
        beside it in the COCO layout; absent for an image in none), file_name, category_id,
        category (class name), bbox [x, y, w, h] in original-image pixels, score. The list's `ids`
        says where the image ids came from (`ids.notes()`). With `out`, also writes
        out/predictions.json and one PNG per image, boxes drawn. An unreadable image goes to
        `on_bad_sample` and is left out, or without it raises BadSampleError."""
        files = expand_images(inputs)
        size, names = self.recipe.data.img_size, self.recipe.data.class_names
        if names is None:
            self.annotations("val")  # the run's class names, from its data
            names = self.recipe.data.class_names
        results = CocoResults(CocoImageIds(names, annotations))
        run_cat_ids = None  # the run's own category ids, looked up only if an image needs them
        tf = eval_transform(size, *self.normalisation())
        model.eval()
        out_dir = Path(out) if out is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        stems = [f.stem for f in files]
        for (idx, f), image in readable(enumerate(files), lambda item: read_image(item[1]), on_bad_sample):
            results.count += 1
            image_id, cat_ids = results.ids.lookup(f)
            if cat_ids is None:
                run_cat_ids = run_cat_ids or self.category_ids()
                cat_ids = run_cat_ids
            h, w = image.shape[1:]
            det = model(tf(image)[None].to(device))[0]
            keep = det["scores"] >= score_thresh
            boxes = to_original(det["boxes"][keep].float().cpu(), (size, size), (h, w))
            labels = det["labels"][keep].cpu().tolist()
            scores = det["scores"][keep].float().cpu().tolist()
            for box, label, score in zip(boxes.tolist(), labels, scores):
                x0, y0, x1, y1 = box
                results.append({**({"image_id": image_id} if image_id is not None else {}),
                                "file_name": str(f), "category_id": cat_ids[label], "category": names[label],
                                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                "score": round(score, 5)})
            if out_dir is not None:
                name = f.stem if stems.count(f.stem) == 1 else f"{f.stem}_{idx + 1}"
                write_png(draw(image, boxes, labels, scores, names), str(out_dir / f"{name}.png"))
        wrote = ""
        if out_dir is not None:
            (out_dir / "predictions.json").write_text(json.dumps(results, indent=1) + "\n")
            wrote = f"; wrote {out_dir / 'predictions.json'} and drawings in {out_dir}"
        results.lines = [f"{len(results)} boxes with score >= {score_thresh} on {results.count} images{wrote}"]
        for note in results.ids.notes():
            (results.notes if note.startswith("warning") else results.lines).append(note)
        return results
