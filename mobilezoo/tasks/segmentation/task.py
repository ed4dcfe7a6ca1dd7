"""The segment task: image + class-mask folders, DeepLabv3+, cross-entropy, mIoU, predict-and-draw."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.io import write_png
from torchvision.utils import make_grid

from ... import data as embedded
from ...errors import DataError
from ...models import create_model
from ..base import InputSpec, OnBadSample, Predictions, Task, expand_images, read_image, readable
from .dataset import IGNORE, LAYOUT, SegmentationFolder, read_classes, split_pairs
from .draw import iou_figure, overlay, write_mask_png
from .infer import image_logits
from .metric import SegmentationMetric
from .transforms import EvalTransform, check_options, collate_segmentation, train_transform

GALLERY = 6  # val images drawn with truth and prediction in the report


def fixed_subset(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """`limit` indices of n drawn from a fixed shuffle (all without a limit), in order."""
    if not limit or limit >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


def to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalised image (3, H, W) back to uint8 pixels."""
    x = x.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def resize_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map (H, W) resized to `size` by nearest neighbour (drawn over the fitted image)."""
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()


class SegmentationTask(Task):
    """Train/eval/predict a semantic segmenter: `data.name` is `shapes-seg` (generated) or a folder
    holding classes.txt and {train,val}/{images,masks}/ (see dataset.LAYOUT). Options in
    `data.augment`: see transforms.DEFAULT_OPTIONS (scale jitter, flip, photometric, eval_mode
    whole|slide, crop, stride, resize, reduce_zero_label)."""

    name = "segment"
    headline = "miou"
    inputs = InputSpec("image", (3, 512, 512), 8, (3, 128, 128), 2)
    # Not exported with dynamic sides: MOAT's attention indexes its relative-position table for one map
    # size, which the trace records as a constant, so a graph is right at the size it was exported at only.
    fully_convolutional = False
    collate = staticmethod(collate_segmentation)

    def __init__(self, recipe):
        super().__init__(recipe)
        self.opts = check_options(recipe.data.augment, recipe.data.img_size)
        self._gallery: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def openvino_int8_options(cls) -> dict:
        """MOAT backbones for NNCF: a transformer, the relative-position gathers left in float."""
        return {"model_type": "transformer", "ignored_types": ["Gather"]}

    @classmethod
    def bench_model_kwargs(cls, shape: tuple[int, ...]) -> dict:
        return {"num_classes": 150}  # ADE20K, where MOAT reports its segmentation results

    def input_shape(self) -> tuple[int, ...]:
        """What the network takes at evaluation, and so the exported graph: the `resize` square, or with
        `eval_mode: slide` the `crop` window (training crops are data.img_size)."""
        side = self.opts["crop"] if self.opts["eval_mode"] == "slide" else self.opts["resize"]
        return (3, side, side)

    def example_inputs(self, count: int) -> torch.Tensor:
        """Real training images as the network sees them at evaluation (export checks, INT8 calibration):
        fitted into the `resize` square, or with `eval_mode: slide` their first (top-left) window, padded
        with 0 (the mean) where the image is smaller, as the sliding window pads it."""
        x = super().example_inputs(count)
        side = self.input_shape()[-1]
        if x.shape[-1] == side:
            return x
        return F.pad(x, (0, max(0, side - x.shape[-1]), 0, max(0, side - x.shape[-2])))[..., :side, :side]

    # --- data -----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Dataset root (see dataset.LAYOUT)."""
        root = embedded.resolve(self.recipe.data.name)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected {LAYOUT})")
        return root

    def class_names(self) -> list[str]:
        """Names from ROOT/classes.txt, checked against the run's (recipe.data.class_names)."""
        names = read_classes(self.root)
        run = self.recipe.data.class_names
        if run is not None and list(run) != names:
            raise DataError(f"{self.root / 'classes.txt'}: classes {names} differ from the run's {list(run)}")
        self.recipe.data.class_names = names
        return names

    @property
    def num_classes(self) -> int:
        """Number of classes, background included (mask values 0..K-1)."""
        if self.recipe.data.class_names is None:
            self.class_names()
        return len(self.recipe.data.class_names)

    def eval_transform(self) -> EvalTransform:
        """Fit into the `resize` square and normalise (val, calibration, export checks, predict)."""
        return EvalTransform(self.opts["resize"], *self.normalisation())

    def _split(self, split: str, transform, limit: int | None) -> Dataset:
        names = self.class_names()
        pairs = split_pairs(self.root, split)
        ds = SegmentationFolder(pairs, len(names), transform, self.recipe.data.skip_bad_samples,
                                self.opts["reduce_zero_label"])
        keep = fixed_subset(len(ds), limit)
        return ds if len(keep) == len(ds) else Subset(ds, keep)

    def datasets(self) -> tuple[Dataset, Dataset]:
        d = self.recipe.data
        train = self._split("train", train_transform(d.img_size, self.opts, *self.normalisation()), d.limit_train)
        return train, self.val_dataset()

    def val_dataset(self) -> Dataset:
        """The val split with eval transforms (masks at their original size)."""
        return self._split("val", self.eval_transform(), self.recipe.data.limit_val)

    def calibration_dataset(self) -> Dataset:
        return self._split("train", self.eval_transform(), self.recipe.data.limit_train)

    # --- model, loss, metric --------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        return create_model(self.recipe.model.name, num_classes=self.num_classes, **self.recipe.model.args)

    def batch_size(self, batch: dict) -> int:
        return len(batch["image"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Pixel cross-entropy, averaged over the labelled pixels (0 for a crop that is all ignore,
        where torch's mean would be NaN)."""
        target = batch["mask"]
        total = F.cross_entropy(model(batch["image"]).float(), target, ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp_min(1)

    def metric(self) -> SegmentationMetric:
        self._gallery = []
        return SegmentationMetric(self.num_classes)

    def eval_step(self, model: nn.Module, batch: dict, metric: SegmentationMetric) -> None:
        logits = image_logits(model, batch["image"], batch["valid"], batch["size"], self.opts)
        for i, (lg, (h, w)) in enumerate(zip(logits, batch["size"].tolist())):
            pred = metric.update(lg, batch["mask"][i, :h, :w])
            if len(self._gallery) < GALLERY:
                vh, vw = batch["valid"][i].tolist()
                image = to_uint8(batch["image"][i, :, :vh, :vw], *self.normalisation())
                truth = batch["mask"][i, :h, :w].cpu()
                self._gallery.append((image, resize_labels(truth, (vh, vw)), resize_labels(pred, (vh, vw))))

    # --- reporting ------------------------------------------------------------------------------

    def summary(self, m: dict) -> str:
        return f"mIoU {m['miou']:.3f}, pixel accuracy {100 * m['pixel_acc']:.2f}% on {m['count']} images"

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        if "miou" not in metrics:
            return []
        names = self.recipe.data.class_names
        run_dir = Path(run_dir)
        iou_figure(metrics, names, run_dir / "iou.png")
        mode = (f"sliding {self.opts['crop']} px windows every {self.opts['stride']} px"
                if self.opts["eval_mode"] == "slide" else "whole images")
        lines = [f"**val mIoU {metrics['miou']:.3f}**, pixel accuracy {100 * metrics['pixel_acc']:.2f}%, mean "
                 f"class accuracy {100 * metrics['mean_acc']:.2f}% on {metrics['count']} images ({mode} fitted into "
                 f"{self.opts['resize']} px, scored at the masks' own size; label {IGNORE} ignored)", "",
                 "![IoU per class and confusion](iou.png)", ""]
        if self._gallery:
            tiles = [t for image, truth, pred in self._gallery
                     for t in (image, overlay(image, truth, names), overlay(image, pred, names))]
            side = max(max(t.shape[1:]) for t in tiles)
            tiles = [F.pad(t, (0, side - t.shape[2], 0, side - t.shape[1]), value=255) for t in tiles]
            write_png(make_grid(tiles, nrow=3, padding=4, pad_value=255), str(run_dir / "segmentations.png"))
            lines += [f"The first {len(self._gallery)} val images: image, truth, prediction:", "",
                      "![segmentations](segmentations.png)", ""]
        rows = [f"| {n} | {'-' if v is None else f'{v:.3f}'} |" for n, v in zip(names, metrics["per_class_iou"])]
        return lines + ["| class | IoU |", "|---|---|", *rows]

    # --- prediction -----------------------------------------------------------------------------

    predicts_into_folder = True

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None) -> Predictions:
        """For each image file (folders are expanded): OUT/<stem>.png, a palette PNG of class indices
        at the image's own size, and OUT/<stem>_overlay.png, the classes painted over the image.
        Records: file, mask, overlay, size [H, W] and the fraction of pixels per class present."""
        files = expand_images(inputs)
        names = self.recipe.data.class_names or self.class_names()
        out_dir = Path(out) if out is not None else Path("predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        tf, stems = self.eval_transform(), [f.stem for f in files]
        model.eval()
        records, lines = [], []
        for (idx, f), image in readable(enumerate(files), lambda item: read_image(item[1]), on_bad_sample):
            x, hw = tf.fit(image)
            logits = image_logits(model, x[None].to(device), [hw], [tuple(image.shape[1:])], self.opts)[0]
            mask = logits.argmax(0).cpu()
            stem = f.stem if stems.count(f.stem) == 1 else f"{f.stem}_{idx + 1}"
            mask_file, overlay_file = out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png"
            write_mask_png(mask, mask_file)
            write_png(overlay(image, mask, names), str(overlay_file))
            counts = torch.bincount(mask.flatten(), minlength=len(names)).tolist()
            share = {n: round(c / mask.numel(), 5) for n, c in zip(names, counts) if c}
            records.append({"file": str(f), "mask": str(mask_file), "overlay": str(overlay_file),
                            "size": list(mask.shape), "pixels": share})
            top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{f}: {mask_file.name} ({mask.shape[1]}x{mask.shape[0]}): "
                         + ", ".join(f"{100 * v:.1f}% {n}" for n, v in top))
        lines.append(f"{len(records)} masks and overlays written to {out_dir}")
        return Predictions(records, lines=lines)
