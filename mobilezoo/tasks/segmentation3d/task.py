"""The segment3d task: BraTS NIfTI cases, Dice + BCE on (WT, TC, ET), Dice/HD95, predict + overlays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn
from torch.utils.data import Dataset

from ... import data as embedded
from ...models import create_model
from ..base import InputSpec, OnBadSample, Predictions, Task, readable
from .brats import MODALITIES, REGIONS, find_cases, regions_to_labels, split_cases
from .dataset import BratsDataset, collate_volumes
from .metric import HD95_MAX, BratsMetric
from .predict import infer, overlay_png, predict_case
from .transforms import augment, center_crop, check_options

GALLERY = 3  # val cases drawn into the report
LAYOUT = "ROOT/train/<case>/ and ROOT/val/<case>/ (BraTS case folders), or one folder of case folders"


class Segmentation3DTask(Task):
    """Train/eval/predict a 3-D tumour segmenter on BraTS-format data: `data.name` is
    `brats-phantom` (generated) or a dataset root (see LAYOUT and `brats.py` for the naming).

    The model maps (N, 4, D, H, W) z-scored (flair, t1, t1ce, t2) to (N, 3, D, H, W) logits of the
    overlapping regions (WT, TC, ET), each a sigmoid. Training samples are random crops of
    `data.augment.crop` (default data.img_size^3); evaluation and prediction run MONAI's
    sliding-window inference with that window over the whole brain. Other options in
    `data.augment`: see transforms.DEFAULT_OPTIONS."""

    name = "segment3d"
    headline = "dice"
    inputs = InputSpec("volume", (4, 128, 128, 128), 1, (4, 32, 32, 32), 1, torch.channels_last_3d, spatial=3)
    fully_convolutional = True  # volumes of any size: sliding windows, or whole brains
    bf16_autocast = True  # autocast keeps the reversible sequences' inversion in fp32
    collate = staticmethod(collate_volumes)

    def __init__(self, recipe):
        super().__init__(recipe)
        self.opts = check_options(recipe.data.augment, recipe.data.img_size)
        # MONAI's DiceCELoss applies softmax cross-entropy to multi-channel input, which is wrong
        # for overlapping regions, so the BCE term is torch's own BCE-with-logits.
        self.dice_loss = DiceLoss(sigmoid=True, batch=True)
        self._gallery: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    # --- data -----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Dataset root (see LAYOUT)."""
        return embedded.resolve(self.recipe.data.name)

    @property
    def roi(self) -> tuple[int, int, int]:
        """Training crop = sliding-window size (D, H, W)."""
        return self.opts["crop"]

    def _cases(self, split: str, limit: int | None):
        cases = split_cases(self.root, split)
        self.recipe.data.class_names = list(REGIONS)
        return cases[:limit] if limit else cases

    def datasets(self) -> tuple[Dataset, Dataset]:
        d = self.recipe.data
        train = BratsDataset(self._cases("train", d.limit_train), augment(self.opts), self.opts["cache"],
                             d.skip_bad_samples)
        return train, self.val_dataset()

    def val_dataset(self) -> Dataset:
        """Whole (brain-cropped) val volumes, no augmentation."""
        d = self.recipe.data
        return BratsDataset(self._cases("val", d.limit_val), None, self.opts["cache"], d.skip_bad_samples)

    def calibration_dataset(self) -> Dataset:
        """Training cases, centre crops of the window size (fixed shape, so they batch)."""
        d = self.recipe.data
        return BratsDataset(self._cases("train", d.limit_train), center_crop(self.opts), self.opts["cache"],
                            d.skip_bad_samples)

    # --- model, loss, metric --------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        args = {"in_channels": len(MODALITIES), "out_channels": len(REGIONS), **self.recipe.model.args}
        return create_model(self.recipe.model.name, **args)

    def batch_size(self, batch: dict) -> int:
        return len(batch["image"])

    def region_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice (over the batch, per region) + binary cross-entropy, both on sigmoid outputs."""
        logits, target = logits.float(), target.float()
        return self.dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self.region_loss(model(batch["image"]), batch["label"])

    def metric(self) -> BratsMetric:
        self._gallery = []
        return BratsMetric()

    def eval_step(self, model: nn.Module, batch: dict, metric: BratsMetric) -> None:
        for i, shape in enumerate(batch["shape"].tolist()):
            crop = (slice(None),) + tuple(slice(0, s) for s in shape)  # undo the collate's padding
            image, target = batch["image"][i][crop][None], batch["label"][i][crop][None]
            logits = infer(model, image, self.roi, self.opts)
            loss = self.region_loss(logits, target).item()
            pred = logits[0] > 0
            case = batch["case"][i]
            metric.update(case, pred, target[0].bool(), batch["spacing"][i].tolist(), loss)
            if len(self._gallery) < GALLERY:
                self._gallery.append((case, image[0, 0].float().cpu().numpy(),
                                      regions_to_labels(target[0]), regions_to_labels(pred)))

    # --- reporting ------------------------------------------------------------------------------

    def summary(self, m: dict) -> str:
        return (f"mean Dice {m['dice']:.3f} (WT {m['dice_wt']:.3f}, TC {m['dice_tc']:.3f}, "
                f"ET {m['dice_et']:.3f}), HD95 {m['hd95_wt']:.1f}/{m['hd95_tc']:.1f}/{m['hd95_et']:.1f} mm "
                f"on {m['count']} cases")

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        if "dice" not in metrics:
            return []
        lines = [f"**val mean Dice {metrics['dice']:.3f}** over WT, TC, ET on {metrics['count']} cases "
                 f"(sliding window {'x'.join(map(str, self.roi))}, overlap {self.opts['sw_overlap']}, "
                 "Gaussian blending)", "",
                 "| region | Dice | HD95 (mm) |", "|---|---|---|"]
        lines += [f"| {r} | {metrics[f'dice_{r.lower()}']:.3f} | {metrics[f'hd95_{r.lower()}']:.2f} |"
                  for r in REGIONS]
        lines += ["", f"Empty regions: both empty gives Dice 1 / HD95 0, one empty gives Dice 0 / HD95 "
                  f"{HD95_MAX} mm.", ""]
        for case, flair, target, pred in self._gallery:
            name = f"val_{case}.png"
            overlay_png(flair, [target, pred], Path(run_dir) / name, ["truth", "predicted"],
                        f"{case} (FLAIR): necrosis red, oedema green, enhancing yellow")
            lines += [f"![{case}]({name})", ""]
        rows = [f"| {c['case']} | " + " | ".join(f"{c[f'dice_{r.lower()}']:.3f}" for r in REGIONS) + " | "
                + " | ".join(f"{c[f'hd95_{r.lower()}']:.1f}" for r in REGIONS) + " |"
                for c in metrics.get("per_case", [])]
        return lines + ["| case | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |",
                        "|---|---|---|---|---|---|---|", *rows]

    # --- prediction -----------------------------------------------------------------------------

    predicts_into_folder = True

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None) -> Predictions:
        """Segment case folders (or folders of case folders): writes OUT/<case>_seg.nii.gz with BraTS
        labels on each input's own voxel grid (shape, affine, header) and OUT/<case>_overlay.png.

        Returns one dict per case: case, file, overlay, voxels (count per label value) and, for
        labelled cases, dice and hd95 per region. A case that cannot be read goes to `on_bad_sample`
        and is left out, or without it raises BadSampleError."""
        cases = find_cases(inputs, on_bad_sample)
        out = Path(out) if out is not None else Path("predictions")
        model.eval()

        def segment(case):
            return predict_case(model, case, out, self.roi, self.opts, device)
        results = [result for _, result in readable(cases, segment, on_bad_sample)]
        return Predictions(results, lines=[json.dumps(results, indent=2)])
