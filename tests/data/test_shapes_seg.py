"""The embedded `shapes-seg` data: the `shapes` images with class masks that agree with its COCO annotations."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilezoo import data as embedded
from mobilezoo.data import shapes, shapes_seg

N_TRAIN, N_VAL = 4, 24  # val: a crowd at i = 5 and 21, an empty image at i = 7


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """(shapes, shapes-seg) written with the same counts into a temporary folder (never the cache)."""
    base = tmp_path_factory.mktemp("gen")
    return (shapes.ensure(base / "shapes", num_train=N_TRAIN, num_val=N_VAL),
            shapes_seg.ensure(base / "shapes-seg", num_train=N_TRAIN, num_val=N_VAL))


def test_layout_classes_and_palette_masks(roots):
    _, root = roots
    assert (root / "classes.txt").read_text().split() == ["background", "ellipse", "rectangle", "triangle",
                                                           "star", "cross"]
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        images = sorted(p.stem for p in (root / split / "images").glob("*.jpg"))
        masks = sorted(p.stem for p in (root / split / "masks").glob("*.png"))
        assert images == masks and len(images) == n
    with Image.open(root / "val" / "masks" / "000001.png") as m:
        assert m.mode == "P" and m.size == (320, 320)  # class indices with a palette, as VOC ships them


def test_images_are_the_shapes_images(roots):
    coco, seg = roots
    for split in ("train", "val"):
        for p in (coco / split).glob("*.jpg"):
            assert (seg / split / "images" / p.name).read_bytes() == p.read_bytes()


def _boxes_by_class(coco: Path, split: str) -> dict:
    doc = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
    label = {c["id"]: i + 1 for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    out: dict = {}
    for a in doc["annotations"]:
        out.setdefault(names[a["image_id"]], {}).setdefault(label[a["category_id"]], []).append(a)
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_agree_with_the_coco_boxes_and_areas(roots, split):
    """Per class, the mask's pixels are the union of that class's visible shapes: their count is the
    sum of the annotations' areas (crowds included), each pixel lies in one of its boxes, and a
    class with one shape in the image has exactly its box as extent."""
    coco, seg = roots
    anns = _boxes_by_class(coco, split)
    checked_single = 0
    for p in sorted((seg / split / "masks").glob("*.png")):
        mask = np.asarray(Image.open(p))
        per_class = anns.get(f"{p.stem}.jpg", {})
        assert set(np.unique(mask)) - {0} == set(per_class)
        for k, boxes in per_class.items():
            pixels = mask == k
            assert pixels.sum() == sum(a["area"] for a in boxes), (p.name, k)
            inside = np.zeros_like(pixels)
            for a in boxes:
                x, y, w, h = (int(v) for v in a["bbox"])
                inside[y: y + h, x: x + w] = True
            assert not (pixels & ~inside).any(), (p.name, k)
            if len(boxes) == 1:
                ys, xs = np.nonzero(pixels)
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == boxes[0]["bbox"]
                checked_single += 1
        assert (mask == 0).sum() == mask.size - sum(a["area"] for b in per_class.values() for a in b)
    assert checked_single >= 5
    if split == "val":  # the crowd's small shapes are labelled with the crowd's class
        crowd = [a for a in (x for b in anns["000006.jpg"].values() for x in b) if a["iscrowd"]]
        assert len(crowd) == 1 and crowd[0]["area"] > 0


def test_own_cache_folder_beside_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes, "NUM_TRAIN", 2)
    monkeypatch.setattr(shapes, "NUM_VAL", 2)
    root = embedded.resolve("shapes-seg")
    assert root == tmp_path / "shapes-seg" and (root / "val" / "masks" / "000002.png").is_file()
    assert not (tmp_path / "shapes").exists()  # `shapes` itself is neither written nor changed
