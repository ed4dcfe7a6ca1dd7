"""Image classification on class-per-folder images (the ImageNet / ImageFolder layout)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from .. import data as embedded
from ..engine.metrics import SumMetric
from ..errors import BadSampleError, DataError
from ..models import create_model
from .base import OnBadSample, Predictions, Task, expand_images, read_image, readable, task_options  # noqa: F401

GALLERY = 16  # val images drawn with their predictions in the report

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # MOAT input normalisation option 1
DEFAULT_AUGMENT = {"scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "hflip": True,
                   "affine_degrees": 0.0, "affine_translate": 0.0, "crop_pct": 0.875}


def train_transform(size: int, aug: dict, mean=MEAN, std=STD) -> v2.Compose:
    """Random resized crop, optional flip and affine jitter, then float + normalise."""
    ops = [v2.RandomResizedCrop(size, scale=tuple(aug["scale"]), ratio=tuple(aug["ratio"]),
                                antialias=True)]
    if aug["hflip"]:
        ops.append(v2.RandomHorizontalFlip())
    if aug["affine_degrees"] or aug["affine_translate"]:
        t = aug["affine_translate"]
        ops.append(v2.RandomAffine(aug["affine_degrees"], translate=(t, t) if t else None))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def eval_transform(size: int, crop_pct: float, mean=MEAN, std=STD) -> v2.Compose:
    """Resize the short side to size / crop_pct, center-crop, float + normalise."""
    return v2.Compose([v2.Resize(round(size / crop_pct), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class ImageFolder(Dataset):
    """Class-per-folder images read with torchvision.io; bad files raise or, if skipping, give None."""

    def __init__(self, root: str | Path, transform, skip_bad: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected class-per-folder images)")
        try:
            self.classes, self.class_to_idx = find_classes(str(root))
            self.samples = make_dataset(str(root), self.class_to_idx, IMG_EXTENSIONS)
        except FileNotFoundError as e:
            raise DataError(f"{root}: {e}") from None
        if len(self.classes) < 2:
            # One class trains to loss 0 without learning anything: refuse it up front.
            raise DataError(f"{root}: found only the class folder {self.classes[0]!r}; "
                            "classification needs at least 2 classes (one folder per class)")
        self.root, self.transform, self.skip_bad = root, transform, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = read_image(path)
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
        return {"image": self.transform(image), "label": label}


class ClassificationMetric(SumMetric):
    """Confusion matrix, top-5 hits and loss sum; computes top-1/top-5 and per-class accuracy."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.state = {"confusion": torch.zeros(num_classes, num_classes, dtype=torch.float64),
                      "top5": torch.zeros((), dtype=torch.float64),
                      "loss": torch.zeros((), dtype=torch.float64)}

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of logits and integer labels."""
        logits, labels = logits.float().cpu(), labels.cpu()
        k = self.num_classes
        self.add("confusion", torch.bincount(labels * k + logits.argmax(1), minlength=k * k).view(k, k))
        top = logits.topk(min(5, k), dim=1).indices
        self.add("top5", (top == labels[:, None]).any(1).sum())
        self.add("loss", F.cross_entropy(logits, labels, reduction="sum"))

    def compute(self) -> dict:
        cm = self.state["confusion"]
        n = cm.sum().clamp_min(1)
        per_class = (cm.diag() / cm.sum(1).clamp_min(1)).tolist()
        return {"top1": (cm.diag().sum() / n).item(), "top5": (self.state["top5"] / n).item(),
                "loss": (self.state["loss"] / n).item(), "count": int(cm.sum().item()),
                "per_class_acc": per_class, "confusion": cm.long().tolist()}


class ClassificationTask(Task):
    """Train/eval/predict an image classifier on a folder with train/ and val/ class folders."""

    name = "classify"
    headline = "top1"

    @classmethod
    def openvino_int8_options(cls) -> dict:
        """MOAT for NNCF: a transformer (its attention quantized as such), the gathers that index the
        relative-position tables left in float."""
        return {"model_type": "transformer", "ignored_types": ["Gather"]}

    def __init__(self, recipe):
        super().__init__(recipe)
        self.aug = task_options(recipe.data.augment, DEFAULT_AUGMENT)

    @property
    def root(self) -> Path:
        """Dataset root holding train/ and val/."""
        return embedded.resolve(self.recipe.data.name)

    def _split(self, split: str, transform, limit: int | None) -> Dataset:
        ds = ImageFolder(self.root / split, transform, self.recipe.data.skip_bad_samples)
        names = self.recipe.data.class_names
        if names is not None and ds.classes != list(names):
            raise DataError(f"{self.root / split}: classes {ds.classes} differ from the run's "
                            f"{list(names)}")
        self.recipe.data.class_names = ds.classes
        return Subset(ds, stratified_subset(ds.samples, limit)) if limit and limit < len(ds) else ds

    def eval_transform(self):
        """The deterministic transform used for val, calibration and predict."""
        return eval_transform(self.recipe.data.img_size, self.aug["crop_pct"], *self.normalisation())

    def datasets(self):
        d = self.recipe.data
        train = self._split("train", train_transform(d.img_size, self.aug, *self.normalisation()), d.limit_train)
        val = self._split("val", self.eval_transform(), d.limit_val)
        return train, val

    def val_dataset(self) -> Dataset:
        """The val split with eval transforms."""
        return self._split("val", self.eval_transform(), self.recipe.data.limit_val)

    def calibration_dataset(self):
        return self._split("train", self.eval_transform(), self.recipe.data.limit_train)

    @property
    def num_classes(self) -> int:
        """Number of classes (from the data if not yet known)."""
        if self.recipe.data.class_names is None:
            self._split("val", self.eval_transform(), None)
        return len(self.recipe.data.class_names)

    def build_model(self) -> nn.Module:
        return create_model(self.recipe.model.name, num_classes=self.num_classes,
                            **self.recipe.model.args)

    def loss(self, model, batch):
        return F.cross_entropy(model(batch["image"]), batch["label"],
                               label_smoothing=self.recipe.optim.label_smoothing)

    def metric(self):
        self._gallery = GallerySample(GALLERY)  # (image, predicted, true) for the report
        return ClassificationMetric(self.num_classes)

    def eval_step(self, model, batch, metric):
        logits = model(batch["image"])
        metric.update(logits, batch["label"])
        for image, pred, label in zip(batch["image"], logits.argmax(1).tolist(), batch["label"].tolist()):
            self._gallery.add((image.float().cpu(), pred, label), pred, label)

    def summary(self, m: dict) -> str:
        return f"top-1 {100 * m['top1']:.2f}%, top-5 {100 * m['top5']:.2f}% on {m['count']} images"

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        from ..engine.report import confusion_png, gallery_png
        names = self.recipe.data.class_names
        confusion_png(metrics["confusion"], names, run_dir / "confusion.png")
        rows = "\n".join(f"| {n} | {100 * a:.1f}% |" for n, a in zip(names, metrics["per_class_acc"]))
        gallery = []
        sample = getattr(self, "_gallery", None)
        items = sample.picked() if sample is not None else []
        if items:
            gallery_png(items, names, run_dir / "predictions.png")
            wrong = sum(pred != true for _, pred, true in items)
            shown = len({true for _, _, true in items})
            gallery = [f"Predictions on {len(items)} val images spread over {shown} of {len(names)} classes, "
                       f"misclassified ones first ({wrong} of {sample.wrong} wrong shown; "
                       "predicted / true; red: wrong):", "",
                       "![predictions](predictions.png)", ""]
        return [*gallery, f"**val top-1 {100 * metrics['top1']:.2f}%**, top-5 {100 * metrics['top5']:.2f}% "
                f"on {metrics['count']} images", "", "![confusion matrix](confusion.png)", "",
                "| class | accuracy |", "|---|---|", rows]

    @classmethod
    def output_info(cls, name: str, model: nn.Module, x: torch.Tensor, out, kwargs: dict) -> dict:
        """The logits and, for a classifier (not a backbone already), its feature maps by stride."""
        info = super().output_info(name, model, x, out, kwargs)
        if not kwargs.get("features_only"):
            backbone = create_model(name, **{**kwargs, "features_only": True, "num_classes": None}).eval()
            reductions = [backbone.feature_info[i]["reduction"] for i in backbone.out_indices]
            info["output_shapes"].update({f"stride{r}": list(f.shape) for r, f in zip(reductions, backbone(x))})
        return info

    predict_options = ("topk",)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None, topk: int = 5) -> Predictions:
        """Top-k labels with probabilities for each image file (folders are expanded), as a JSON
        file `out` (or the lines, without it)."""
        files = expand_images(inputs)
        tf, names = self.eval_transform(), self.recipe.data.class_names
        records = []
        for f, image in readable(files, read_image, on_bad_sample):
            probs = model(tf(image)[None].to(device)).float().softmax(1)[0]
            records.append(topk_record(f, probs, names, topk))
        return topk_predictions(records, out)


def topk_record(file, probs: torch.Tensor, names: list[str], topk: int) -> dict:
    """{"file", "topk": [{"label", "prob"}, ...]} of one input's class probabilities."""
    val, idx = probs.topk(min(topk, len(names)))
    return {"file": str(file), "topk": [{"label": names[i], "prob": round(v, 6)}
                                        for v, i in zip(val.tolist(), idx.tolist())]}


def topk_predictions(records: list[dict], out: str | Path | None) -> Predictions:
    """Top-k records written as JSON to `out` with one summary line per input, or, without `out`,
    the JSON as the lines."""
    text = json.dumps(records, indent=2)
    if out is None:
        return Predictions(records, lines=[text])
    Path(out).write_text(text + "\n")
    return Predictions(records, lines=[f"{r['file']}: {r['topk'][0]['label']} ({100 * r['topk'][0]['prob']:.1f}%)"
                                       for r in records])


def stratified_subset(samples: list[tuple[str, int]], limit: int, seed: int = 0) -> list[int]:
    """`limit` indices drawn round-robin over classes from a fixed shuffle: every class is kept."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(samples), generator=g).tolist():
        by_class.setdefault(samples[i][1], []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return sorted(picked)


class GallerySample:
    """Up to `limit` items kept from a stream: wrong predictions first, each group round-robin over true classes."""

    def __init__(self, limit: int):
        self.limit, self.wrong = limit, 0
        self._seen: Counter = Counter()  # (correct, true class) -> items seen so far
        self._pool: list[tuple[tuple[bool, int, int], object]] = []

    def add(self, item, pred: int, true: int) -> None:
        """Offer one item with its predicted and true class."""
        correct = pred == true
        self.wrong += not correct
        # A key fixed on arrival (group, rank within its class, arrival) makes keeping only the best
        # `limit` so far equal to choosing over the whole stream, so memory stays bounded.
        key = (correct, self._seen[correct, true], sum(self._seen.values()))
        self._seen[correct, true] += 1
        self._pool.append((key, item))
        if len(self._pool) > 4 * self.limit:
            self._pool = sorted(self._pool, key=lambda p: p[0])[:self.limit]

    def picked(self) -> list:
        """The kept items in display order."""
        return [item for _, item in sorted(self._pool, key=lambda p: p[0])[:self.limit]]


def select_gallery(preds: list[int], trues: list[int], limit: int = GALLERY) -> list[int]:
    """Indices of the samples the report draws: misclassified first, spread across true classes."""
    sample = GallerySample(limit)
    for i, (p, t) in enumerate(zip(preds, trues)):
        sample.add(i, p, t)
    return sample.picked()
