"""`shapes-seg`: the `shapes` images with per-pixel class masks, in the semantic-segmentation layout.

Layout (the same as any user dataset the segment task reads, VOC / ADE20K style):

    shapes-seg/classes.txt                       background, ellipse, rectangle, triangle, star, cross
    shapes-seg/train/images/000001.jpg ...       shapes-seg/train/masks/000001.png ...
    shapes-seg/val/images/000001.jpg ...         shapes-seg/val/masks/000001.png ...

Image i of a split is image i of `shapes` (same seed, same JPEG). Its mask is a palette PNG of
class indices (as VOC ships them): 0 background, 1..5 the shape classes in `shapes`' category
order, each pixel labelled by the shape it shows (what is visible wins an overlap), the small
shapes of a val crowd by the crowd's class. So the pixels of class c are exactly the union of
the visible pixels of the class-c annotations of `shapes`: their areas sum to the pixel count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import publish_splits, shapes

VERSION = 1  # bump when the generator changes: a cached set of another version is rewritten
CLASSES = ("background", *shapes.CATEGORIES.values())
# VOC's first colours, what palette-aware viewers show; all 256 entries, as Pillow remaps indices
# beyond a shorter palette when it saves
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128] + [255] * (768 - 18)


def class_mask(owner: np.ndarray, anns: list[dict]) -> np.ndarray:
    """uint8 class indices of one image from `shapes.make_image`'s map of shapes and annotations."""
    label_of = {cat: i + 1 for i, cat in enumerate(shapes.CATEGORIES)}
    mask = np.zeros(owner.shape, np.uint8)
    crowd = [a for a in anns if a["iscrowd"]]
    shown = [a for a in anns if not a["iscrowd"]]  # in drawing order: index j is owner value j
    for j, a in enumerate(shown):
        mask[owner == j] = label_of[a["category_id"]]
    if crowd:
        mask[owner == shapes.CROWD] = label_of[crowd[0]["category_id"]]
    return mask


def write_mask(mask: np.ndarray, path: Path) -> None:
    """A palette PNG of class indices."""
    im = Image.fromarray(mask, mode="P")
    im.putpalette(PALETTE)
    im.save(path)


def write_split(root: Path, split: str, count: int) -> None:
    """Write `count` JPEGs to root/split/images and their masks to root/split/masks."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels, anns, owner = shapes.make_image(i, split)
        Image.fromarray(pixels).save(root / split / "images" / f"{i + 1:06d}.jpg", quality=92)
        write_mask(class_mask(owner, anns), root / split / "masks" / f"{i + 1:06d}.png")


def _classes(root: Path) -> None:
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def ensure(root: Path | None = None, num_train: int | None = None, num_val: int | None = None) -> Path:
    """Write the dataset under `root` (default: the cache folder `shapes-seg`) unless already
    complete; return root. Counts default to those of `shapes`; image i is the same whatever the count."""
    counts = {"train": shapes.NUM_TRAIN if num_train is None else num_train,
              "val": shapes.NUM_VAL if num_val is None else num_val}
    return publish_splits("shapes-seg", root, counts, VERSION, shapes.SEED, write_split, prepare=_classes)
