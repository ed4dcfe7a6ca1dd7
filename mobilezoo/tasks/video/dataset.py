"""Video datasets in two layouts, and the clip dataset that samples, decodes and transforms them.

Layouts under a dataset root:
  folders: `train/<class>/*.mp4`, `val/<class>/...` (any of VIDEO_EXTENSIONS), classes sorted by name;
  list:    `train_list.txt` / `val_list.txt` with `relative/path label` lines (mmaction2 style): paths
           relative to the root; the label an index into `classes.txt` (digits are always an index) or
           a class name; without classes.txt, integer labels name classes "0", "1", ... and names are
           sorted. `#` comments and blank lines are ignored; a comma may separate the two fields."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import find_classes, make_dataset

from ...errors import BadSampleError, DataError
from .decode import VIDEO_EXTENSIONS, read_clip
from .sampling import clip_indices, eval_offsets, single_frame, train_offsets
from .transforms import MEAN, STD, EvalViews, TrainClip, to_video


def folder_samples(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of a class-per-folder split."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such folder (expected class-per-folder videos)")
    try:
        classes, class_to_idx = find_classes(str(split_dir))
        return classes, make_dataset(str(split_dir), class_to_idx, VIDEO_EXTENSIONS)
    except FileNotFoundError as e:
        raise DataError(f"{split_dir}: {e}") from None


def read_classes(path: Path) -> list[str]:
    """Class names, one a line (blank lines ignored)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat")
    return names


def list_samples(root: Path, list_file: Path, classes_file: Path | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of a `path label` list file; paths are relative to `root`."""
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file not found (expected `relative/path label` lines)")
    rows = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{list_file}:{n}: expected `relative/path label`, got {line!r}")
        rows.append((n, parts[0].strip(), parts[1].strip()))
    if not rows:
        raise DataError(f"{list_file}: no samples")
    if classes_file is not None and classes_file.is_file():
        classes = read_classes(classes_file)
    elif all(label.isdigit() for _, _, label in rows):
        classes = [str(i) for i in range(max(int(label) for _, _, label in rows) + 1)]
    else:
        classes = sorted({label for _, _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for n, rel, label in rows:
        if label.isdigit() and int(label) < len(classes):  # an index, as mmaction2 writes them
            k = int(label)
        elif not label.isdigit() and label in index:
            k = index[label]
        else:
            raise DataError(f"{list_file}:{n}: label {label!r} is not a class index below {len(classes)} "
                            f"nor a name in {classes_file or 'the list'}")
        samples.append((str(root / rel), k))
    return classes, samples


def label_map(mapping: dict | None, classes: list[str], option: str) -> dict[int, int]:
    """A {class name: class name} option as {label: label}; unknown names are a DataError."""
    if not mapping:
        return {}
    unknown = sorted(str(k) for k in [*mapping, *mapping.values()] if str(k) not in classes)
    if unknown:
        raise DataError(f"data.augment.{option}: unknown class name(s) {', '.join(unknown)}; "
                        f"classes are {', '.join(classes)}")
    return {classes.index(str(a)): classes.index(str(b)) for a, b in mapping.items()}


class VideoClips(Dataset):
    """Items {"video", "label"}: training gives one augmented clip (C, T, S, S); evaluation gives
    `clips` x `crops` views (V, C, T, S, S) in clip-major order. A bad video raises BadSampleError or,
    when skipping, gives None (counted by the collate function)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], opts: dict, size: int, train: bool,
                 clips: int = 1, crops: int = 1, short_side: int | None = None, skip_bad: bool = False,
                 normalisation=(MEAN, STD)):
        self.samples, self.classes, self.opts, self.train, self.clips = samples, classes, opts, train, clips
        self.skip_bad = skip_bad
        if train:
            self.transform = TrainClip(size, opts, *normalisation)
            self.flip_map = label_map(opts["flip_label_map"], classes, "flip_label_map")
            self.reverse_map = label_map(opts["reverse_label_map"], classes, "reverse_label_map")
        else:
            self.transform = EvalViews(size, short_side or size, crops, *normalisation)

    def __len__(self) -> int:
        return len(self.samples)

    def indices(self, total: int, reverse: bool = False):
        """(clips, clip_len) frame numbers for a video of `total` frames (random offset when training)."""
        o = self.opts
        n, t = o["clip_len"], o["frame_interval"]
        offsets = train_offsets(total, n, t) if self.train else eval_offsets(total, n, t, self.clips)
        inds = clip_indices(offsets, total, n, t, o["out_of_bound"])
        if o["single_frame"]:
            inds = single_frame(inds)
        return inds[:, ::-1] if reverse else inds

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        o = self.opts
        # time reversal applies only to classes with a reversed counterpart (reverse_label_map)
        reverse = (self.train and o["time_reverse"] > 0 and label in self.reverse_map
                   and float(torch.rand(())) < o["time_reverse"])
        try:
            frames, _ = read_clip(path, lambda total: self.indices(total, reverse))
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
        if not self.train:
            return {"video": torch.cat([self.transform(to_video(c)) for c in frames]), "label": label}
        if reverse:
            label = self.reverse_map[label]
        flip = o["hflip"] and float(torch.rand(())) < 0.5
        if flip:
            label = self.flip_map.get(label, label)
        return {"video": self.transform(to_video(frames[0]), flip), "label": label}
