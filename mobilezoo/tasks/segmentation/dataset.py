"""Image + class-mask folders (ROOT/{train,val}/images, ROOT/{train,val}/masks, ROOT/classes.txt).

A mask is a single-channel PNG of class indices with the image's stem (`masks/<stem>.png`), as
VOC, ADE20K and Cityscapes (trainIds) ship them, palette PNGs included; 255 marks pixels to
ignore. Layout problems (a missing folder or classes.txt, no images) raise DataError; a sample
whose image or mask is missing, unreadable, of another size or holds an index that is not a class
raises BadSampleError naming the file (or gives None with skip_bad)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS

from ...errors import BadSampleError, DataError
from ..base import read_image, short_reason

IGNORE = 255  # mask value of pixels that count in neither the loss nor the metric
LAYOUT = "ROOT/classes.txt, ROOT/{train,val}/images/*.jpg|png and ROOT/{train,val}/masks/*.png (same stems)"


def read_classes(root: Path) -> list[str]:
    """Class names, one per line of ROOT/classes.txt (index = line; blank lines at the end dropped)."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found (expected one class name per line; layout {LAYOUT})")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) < 2 or not all(names):
        raise DataError(f"{path}: expected at least 2 non-empty class names, one per line, got {names}")
    if len(names) > IGNORE:
        raise DataError(f"{path}: {len(names)} classes; at most {IGNORE} (mask value {IGNORE} means ignore)")
    return names


def read_mask(path: Path, num_classes: int, reduce_zero_label: bool = False) -> torch.Tensor:
    """uint8 class indices (H, W) of a mask PNG, checked against the classes; BadSampleError naming the file.

    Read with Pillow, whose image mode tells a palette, greyscale or 16-bit mask from an RGB one
    before anything is converted (an RGB mask is a colour rendering, not class indices)."""
    from PIL import Image
    if not path.is_file():
        raise BadSampleError(f"{path}: mask not found (each image needs masks/<stem>.png)")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L", "I", "I;16", "1"):
                raise BadSampleError(f"{path}: mask is {mode}; expected a single-channel PNG of class "
                                     "indices (palette or greyscale)")
            arr = np.asarray(im, dtype=np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, BadSampleError):
            raise
        raise BadSampleError(f"{path}: cannot read mask ({short_reason(e)})") from None
    if reduce_zero_label:  # ADE20K: 0 is "other" (ignored), classes are 1..150; 255 stays ignore (mmseg's rule)
        arr = np.where((arr == 0) | (arr == IGNORE), IGNORE, arr - 1)
    bad = np.unique(arr[((arr < 0) | (arr >= num_classes)) & (arr != IGNORE)])
    if bad.size:
        shown = ", ".join(map(str, bad[:5].tolist())) + (" ..." if bad.size > 5 else "")
        raise BadSampleError(f"{path}: class index {shown} out of range (expected 0..{num_classes - 1} for "
                             f"{num_classes} classes, or {IGNORE} = ignore)")
    return torch.from_numpy(arr.astype(np.uint8))


def split_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask path) of every image in ROOT/split/images, sorted; the mask need not exist yet."""
    images = Path(root) / split / "images"
    if not images.is_dir():
        raise DataError(f"{images}: no such folder (expected {LAYOUT})")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(f"{images}: no images ({', '.join(IMG_EXTENSIONS)})")
    masks = Path(root) / split / "masks"
    return [(f, masks / f"{f.stem}.png") for f in files]


class SegmentationFolder(Dataset):
    """(image, mask) pairs of one split; each item is `transform`ed from {"image", "mask"} tv_tensors."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, transform, skip_bad: bool = False,
                 reduce_zero_label: bool = False):
        self.pairs, self.num_classes, self.transform = pairs, num_classes, transform
        self.skip_bad, self.reduce_zero_label = skip_bad, reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image (3, H, W), uint8 mask (H, W)) of item i; BadSampleError for a bad file."""
        image_path, mask_path = self.pairs[i]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.num_classes, self.reduce_zero_label)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise BadSampleError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                 f"{image_path.name} is {image.shape[2]}x{image.shape[1]}")
        return image, mask

    def __getitem__(self, i: int):
        try:
            image, mask = self.load(i)
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
        return self.transform({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)})
