"""What a task gives the engine: datasets, a model, a loss, a metric, and its own report."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ..engine.metrics import SumMetric
from ..errors import BadSampleError, DataError
from ..recipes import Recipe


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 RGB tensor (3, H, W) of an image file; BadSampleError naming the file otherwise."""
    from torchvision.io import ImageReadMode, decode_image
    if not Path(path).is_file():
        raise BadSampleError(f"{path}: image file not found")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise BadSampleError(f"{path}: cannot read image ({str(e).splitlines()[0]})") from None


def expand_images(paths: list[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under named folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, paths))}")
    return files


def collate_skipping(samples: list) -> dict:
    """default_collate over the samples that loaded; `None` marks a skipped one and is counted."""
    good = [s for s in samples if s is not None]
    batch = default_collate(good) if good else {}
    batch["skipped"] = len(samples) - len(good)
    return batch


class Task:
    """Base class; one subclass per task, registered in `tasks.TASKS` under `name`."""

    name = "base"
    input_key = "image"  # the batch field the model reads (export, calibration, latency)
    headline = ""  # the metric key that summarizes a run (e.g. to compare fp32 and INT8)

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets; also fills `recipe.data.class_names`."""
        raise NotImplementedError

    def val_dataset(self) -> Dataset:
        """The val split with evaluation transforms (used by `mobilezoo eval`)."""
        raise NotImplementedError

    def calibration_dataset(self) -> Dataset:
        """Training samples with evaluation transforms (BN recalibration, INT8 calibration)."""
        raise NotImplementedError

    def example_inputs(self, count: int) -> torch.Tensor:
        """`count` real training samples with evaluation transforms, batched: what export checks
        and INT8 calibration run on."""
        ds = self.calibration_dataset()
        samples = [s for s in (ds[i] for i in range(min(count, len(ds)))) if s is not None]
        return torch.stack([s[self.input_key] for s in samples]).float()

    def build_model(self) -> nn.Module:
        """The model the recipe names, sized for this task's data."""
        raise NotImplementedError

    collate = staticmethod(collate_skipping)

    def batch_size(self, batch: dict) -> int:
        """How many samples a batch holds (for throughput)."""
        return len(batch["label"])

    def forward(self, model: nn.Module, batch: dict):
        """The model's raw output on a batch (used for BN recalibration and export checks)."""
        return model(batch["image"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Training loss of one batch (model in train mode)."""
        raise NotImplementedError

    def metric(self) -> SumMetric:
        """A fresh metric accumulator for one evaluation."""
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch: dict, metric: SumMetric) -> None:
        """Run the model on a batch (eval mode, no grad) and add to the metric."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """A short human line for the headline metric."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        """Write task-specific figures; return markdown lines for report.md."""
        return []
