"""Video recognition: clips of video files -> class, with multi-view (clips x crops) testing."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ... import data as embedded
from ...errors import DataError
from ...models import create_model
from ..base import InputSpec, OnBadSample, Predictions, Task, readable, task_options
from ..classification import ClassificationMetric, stratified_subset, topk_predictions, topk_record
from .dataset import VideoClips, folder_samples, list_samples
from .decode import expand_videos, read_clip
from .sampling import OUT_OF_BOUND
from .transforms import to_video

# Options under data.augment (a recipe's `data.augment` mapping overrides any of them).
DEFAULT_OPTIONS = {
    # sampling (mmaction2 SampleFrames; the SqueezeTime configs use 16 frames, 4 apart). Frames past the
    # end of a short video: "loop" (mmaction2's default), "repeat_last", or "error" (a bad sample).
    # single_frame: every clip is its middle frame repeated (a no-motion control), in train and eval.
    "clip_len": 16, "frame_interval": 4, "out_of_bound": "loop", "single_frame": False,
    # training augmentation (SqueezeTime configs / mmaction2 defaults); short_side None: img_size * 8 / 7.
    # hflip flips half the clips; flip_label_map {class: class} relabels the classes a flip swaps (e.g.
    # left/right motion), others keep theirs. time_reverse plays that fraction of the clips backwards,
    # only for classes in reverse_label_map, which names each one's reversed class.
    "short_side": None, "scales": [1, 0.875, 0.75, 0.66, 0.5], "max_wh_scale_gap": 1,
    "hflip": True, "flip_label_map": None, "time_reverse": 0.0, "reverse_label_map": None,
    "color_jitter": [0.5, 0.5, 0.5, 0.1], "erase_prob": 0.25,
    # evaluation: `val_*` during training (one centred clip, centre crop), `test_*` for `mobilezoo eval`
    # and predict (10 clips x 3 crops, short side = img_size, softmax averaged over the views)
    "val_clips": 1, "val_crops": 1, "test_clips": 10, "test_crops": 3, "test_short_side": None,
    # layout: auto = the list files if `train_list` exists under the root, else class folders
    "layout": "auto", "train_list": "train_list.txt", "val_list": "val_list.txt", "classes_file": "classes.txt",
}


class VideoMetric(ClassificationMetric):
    """ClassificationMetric over view-averaged probabilities; top-5 only with at least 5 classes."""

    def compute(self) -> dict:
        out = super().compute()
        if self.num_classes < 5:
            out.pop("top5")
        return out


class VideoTask(Task):
    """Train/eval/predict a video classifier (e.g. SqueezeTime) on class folders or list files of videos."""

    name = "video"
    headline = "top1"
    input_key = "video"
    # (C, T, H, W) clips; SqueezeTime squeezes time into channels, so contiguous NCTHW is its layout
    inputs = InputSpec("video", (3, 16, 224, 224), 4, (3, 8, 64, 64), 2, torch.contiguous_format)

    @classmethod
    def bench_model_kwargs(cls, shape: tuple[int, ...]) -> dict:
        return {"num_classes": 400, "num_frames": shape[1]}  # Kinetics-400, as the released models

    def input_shape(self) -> tuple[int, ...]:
        s = self.recipe.data.img_size
        return (3, self.opts["clip_len"], s, s)

    def __init__(self, recipe):
        super().__init__(recipe)
        o = task_options(recipe.data.augment, DEFAULT_OPTIONS)
        size = recipe.data.img_size
        o["short_side"] = o["short_side"] or round(size * 8 / 7)  # 256 for 224, as the configs
        o["test_short_side"] = o["test_short_side"] or size
        for key in ("clip_len", "frame_interval", "val_clips", "test_clips"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise DataError(f"data.augment.{key} must be a positive integer, got {o[key]!r}")
        choices = {"layout": ("auto", "folders", "list"), "out_of_bound": OUT_OF_BOUND,
                   "val_crops": (1, 3), "test_crops": (1, 3)}
        for key, allowed in choices.items():
            if o[key] not in allowed:
                raise DataError(f"data.augment.{key} must be one of {', '.join(map(str, allowed))}, "
                                f"got {o[key]!r}")
        self.opts = o

    @property
    def root(self) -> Path:
        """Dataset root holding train/ and val/ (or the list files)."""
        return embedded.resolve(self.recipe.data.name)

    def _layout(self) -> str:
        if self.opts["layout"] != "auto":
            return self.opts["layout"]
        return "list" if (self.root / self.opts["train_list"]).is_file() else "folders"

    def samples(self, split: str) -> tuple[list[str], list[tuple[str, int]]]:
        """(class names, [(path, label)]) of a split in the dataset's layout."""
        root = self.root
        if self._layout() == "list":
            return list_samples(root, root / self.opts[f"{split}_list"], root / self.opts["classes_file"])
        return folder_samples(root / split)

    def _split(self, split: str, train: bool, views: str | None, limit: int | None) -> Dataset:
        classes, samples = self.samples(split)
        names = self.recipe.data.class_names
        if names is not None and classes != list(names):
            raise DataError(f"{self.root} ({split}): classes {classes} differ from the run's {list(names)}")
        if not samples:
            raise DataError(f"{self.root} ({split}): no video files ({self._layout()} layout)")
        if len(classes) < 2:
            # One class trains to loss 0 without learning anything: refuse it up front.
            where = self.root / split
            if self._layout() == "list":
                names_file = self.root / self.opts["classes_file"]
                where = names_file if names_file.is_file() else self.root / self.opts[f"{split}_list"]
            raise DataError(f"{where}: found only the class {classes[0]!r}; "
                            "video classification needs at least 2 classes")
        self.recipe.data.class_names = classes
        o, d = self.opts, self.recipe.data
        clips, crops = (o[f"{views}_clips"], o[f"{views}_crops"]) if views else (1, 1)
        short = o["test_short_side"] if views == "test" else o["short_side"]
        ds = VideoClips(samples, classes, o, d.img_size, train, clips, crops, short, d.skip_bad_samples,
                        self.normalisation())
        return Subset(ds, stratified_subset(samples, limit)) if limit and limit < len(ds) else ds

    def datasets(self):
        d = self.recipe.data
        return self._split("train", True, None, d.limit_train), self._split("val", False, "val", d.limit_val)

    def val_dataset(self) -> Dataset:
        """The val split with the full test protocol (test_clips x test_crops views)."""
        return self._split("val", False, "test", self.recipe.data.limit_val)

    def calibration_dataset(self):
        return self._split("train", False, "val", self.recipe.data.limit_train)

    def example_inputs(self, count: int) -> torch.Tensor:
        """`count` single-view clips (N, C, T, H, W): the network's input, without the views axis."""
        return super().example_inputs(count).flatten(0, 1)[:count]

    @property
    def num_classes(self) -> int:
        """Number of classes (from the data if not yet known)."""
        if self.recipe.data.class_names is None:
            self.recipe.data.class_names = self.samples("val")[0]
        return len(self.recipe.data.class_names)

    def build_model(self) -> nn.Module:
        return create_model(self.recipe.model.name, num_classes=self.num_classes,
                            **{"num_frames": self.opts["clip_len"], **self.recipe.model.args})

    def forward(self, model, batch):
        video = batch["video"]
        return model(video.flatten(0, 1) if video.dim() == 6 else video)

    def loss(self, model, batch):
        return F.cross_entropy(model(batch["video"]), batch["label"],
                               label_smoothing=self.recipe.optim.label_smoothing)

    def probs(self, model: nn.Module, video: torch.Tensor) -> torch.Tensor:
        """(N, K) class probabilities, softmax averaged over the views of (N, V, C, T, H, W) clips."""
        if video.dim() == 5:
            video = video[:, None]
        n, v = video.shape[:2]
        flat = video.flatten(0, 1)
        step = max(1, self.recipe.data.batch_size)  # views per forward pass: what training fits in memory
        out = torch.cat([model(flat[i:i + step]).float().softmax(1) for i in range(0, len(flat), step)])
        return out.view(n, v, -1).mean(1)

    def metric(self):
        return VideoMetric(self.num_classes)

    def eval_step(self, model, batch, metric):
        # log of the averaged probabilities: argmax and top-k as mmaction2's average_clips='prob', and
        # the metric's cross-entropy becomes the NLL of the averaged prediction
        metric.update(self.probs(model, batch["video"]).clamp_min(1e-12).log(), batch["label"])

    def summary(self, m: dict) -> str:
        top5 = f", top-5 {100 * m['top5']:.2f}%" if "top5" in m else ""
        return f"top-1 {100 * m['top1']:.2f}%{top5} on {m['count']} videos"

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        from ...engine.report import confusion_png
        names = self.recipe.data.class_names
        confusion_png(metrics["confusion"], names, run_dir / "confusion.png")
        rows = "\n".join(f"| {n} | {100 * a:.1f}% |" for n, a in zip(names, metrics["per_class_acc"]))
        return [f"**val {self.summary(metrics)}**", "", "![confusion matrix](confusion.png)", "",
                "| class | accuracy |", "|---|---|", rows]

    predict_options = ("topk",)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None, topk: int = 5) -> Predictions:
        """Top-k labels with probabilities for each video file (folders are expanded), averaged over the
        test views (test_clips x test_crops), as a JSON file `out` (or the lines, without it)."""
        files = expand_videos(inputs)
        names = self.recipe.data.class_names or []
        if not names:
            raise DataError("the run has no class names (data.class_names); was it trained?")
        o = self.opts
        views = VideoClips([], names, o, self.recipe.data.img_size, False, o["test_clips"], o["test_crops"],
                           o["test_short_side"], normalisation=self.normalisation())
        model.eval()
        records = []
        for f, (frames, _) in readable(files, lambda f: read_clip(f, views.indices), on_bad_sample):
            x = torch.cat([views.transform(to_video(c)) for c in frames])[None].to(device)
            records.append(topk_record(f, self.probs(model, x)[0], names, topk))
        return topk_predictions(records, out)
