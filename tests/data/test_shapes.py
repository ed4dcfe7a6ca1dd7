"""The embedded `shapes` data: a generated COCO-format detection set (small counts here for speed)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilezoo import data as embedded
from mobilezoo.data import shapes
from mobilezoo.tasks.detection import CocoAnnotations

N_TRAIN, N_VAL = 24, 40  # val: 40 images hold crowds at i = 5, 21, 37 and empty images at 7, 27


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Generated once for the module, into a temporary folder (never the user's cache)."""
    return shapes.ensure(tmp_path_factory.mktemp("gen") / "shapes", num_train=N_TRAIN, num_val=N_VAL)


def _doc(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_layout_and_counts(root):
    assert (root / ".complete").is_file()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        doc = _doc(root, split)
        files = sorted(p.name for p in (root / split).iterdir())
        assert len(files) == len(doc["images"]) == n
        assert sorted(im["file_name"] for im in doc["images"]) == files
        assert len({im["id"] for im in doc["images"]}) == n
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
    assert not list(root.parent.glob("shapes.partial*"))  # the temporary folder is gone


def test_default_counts_meet_the_issue():
    assert shapes.NUM_TRAIN >= 1000 and shapes.NUM_VAL >= 200 and shapes.SIZE == 320


def test_images_are_rgb_320(root):
    for p in list((root / "train").iterdir())[:5] + list((root / "val").iterdir())[:5]:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (320, 320)


def test_category_ids_have_gaps_and_every_class_appears(root):
    for split in ("train", "val"):
        doc = _doc(root, split)
        ids = sorted(c["id"] for c in doc["categories"])
        assert 4 <= len(ids) <= 6
        assert ids != list(range(1, len(ids) + 1))  # not contiguous
        assert len({c["name"] for c in doc["categories"]}) == len(ids)
        assert {a["category_id"] for a in doc["annotations"]} <= set(ids)
    used = {a["category_id"] for s in ("train", "val") for a in _doc(root, s)["annotations"]}
    assert used == set(ids)


def test_boxes_inside_images_with_varied_sizes(root):
    sides = []
    for split in ("train", "val"):
        doc = _doc(root, split)
        size = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            W, H = size[a["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W and y + h <= H
            assert 0 < a["area"] <= w * h
            assert a["iscrowd"] in (0, 1)
            if not a["iscrowd"]:
                sides.append(max(w, h))
    assert min(sides) < 40 and max(sides) > 100  # small and large objects both occur


def test_objects_per_image_crowds_and_empty_images(root):
    val = _doc(root, "val")
    crowd = [a for a in val["annotations"] if a["iscrowd"]]
    assert sorted(a["image_id"] for a in crowd) == [6, 22, 38]  # 1-based ids of i = 5, 21, 37
    assert not any(a["iscrowd"] for a in _doc(root, "train")["annotations"])
    for doc in (val, _doc(root, "train")):
        per = {im["id"]: 0 for im in doc["images"]}
        for a in doc["annotations"]:
            per[a["image_id"]] += 1 - a["iscrowd"]
        assert max(per.values()) <= 6
        assert 0 in per.values()  # some images have no objects
        assert len(set(per.values())) >= 4  # and the others a varied number


def test_boxes_are_tight_around_the_visible_shape():
    """Each box is the extent of the pixels its shape shows; every shape keeps >= 60% visible."""
    for i in range(6):
        pixels, anns, owner = shapes.make_image(i, "val")
        assert pixels.shape == (320, 320, 3) and pixels.dtype == np.uint8
        objects = [a for a in anns if not a["iscrowd"]]
        assert owner.max() + 1 == len(objects)
        for k, a in enumerate(objects):
            ys, xs = np.nonzero(owner == k)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == len(xs)


def test_shapes_differ_from_background(root):
    """Colour is random but contrasts: each shape's mean colour differs from the background's."""
    for i in range(4):
        pixels, anns, owner = shapes.make_image(i, "train")
        background = pixels[owner == -1].astype(float).mean(0)
        for k in range(owner.max() + 1):
            assert np.linalg.norm(pixels[owner == k].astype(float).mean(0) - background) > 30


def test_deterministic_and_prefix_stable(root, tmp_path):
    small = shapes.ensure(tmp_path / "again", num_train=4, num_val=6)
    for split, n in (("train", 4), ("val", 6)):
        a, b = _doc(root, split), _doc(small, split)
        assert a["images"][:n] == b["images"]
        ids = {im["id"] for im in b["images"]}
        assert [x for x in a["annotations"] if x["image_id"] in ids] == b["annotations"]
        for im in b["images"]:
            name = im["file_name"]
            assert (small / split / name).read_bytes() == (root / split / name).read_bytes()


def test_ensure_reuses_a_complete_set_and_rewrites_another(tmp_path):
    r = shapes.ensure(tmp_path / "s", num_train=2, num_val=2)
    stamp = (r / "train" / "000001.jpg").stat().st_mtime_ns
    assert shapes.ensure(r, num_train=2, num_val=2) == r
    assert (r / "train" / "000001.jpg").stat().st_mtime_ns == stamp
    shapes.ensure(r, num_train=3, num_val=2)  # other counts: rewritten
    assert len(list((r / "train").iterdir())) == 3


def test_resolve_generates_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shapes, "NUM_TRAIN", 3)
    monkeypatch.setattr(shapes, "NUM_VAL", 2)
    assert "shapes" in embedded.EMBEDDED
    root = embedded.resolve("shapes")
    assert root == tmp_path / "cache" / "shapes"
    assert len(list((root / "val").iterdir())) == 2


def test_read_back_by_the_coco_loader(root):
    anns = CocoAnnotations(root / "annotations" / "instances_val.json")
    assert anns.fixes == {"clipped_boxes": 0}
    assert anns.cat_ids == sorted(shapes.CATEGORIES)
    assert anns.class_names == [shapes.CATEGORIES[c] for c in sorted(shapes.CATEGORIES)]
    assert len(anns.image_ids) == N_VAL
