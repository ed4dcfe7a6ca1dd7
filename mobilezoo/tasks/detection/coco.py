"""COCO instances files read with pycocotools, checked and cleaned, and a Dataset over them.

Checked when a file is loaded (errors name the file and the annotation or image id):
missing keys, boxes that are not four finite numbers or have width/height <= 0, boxes wholly
outside their image, unknown category or image ids, duplicate ids. Boxes that stick out of their
image are clipped to it (COCO practice); the count is kept in `fixes` and logged once. `area`
defaults to the box area and `iscrowd` to 0 when absent. Image files are read lazily: a missing
or unreadable file raises BadSampleError naming it (or gives None with skip_bad)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ...errors import BadSampleError, DataError
from ..base import read_image

log = logging.getLogger("mobilezoo")
MAX_LISTED = 5  # problems spelled out in one error message; the rest are counted



def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class CocoAnnotations:
    """One validated instances file: images, cleaned annotations, and the category <-> label map.

    Labels are contiguous 0..K-1 in order of increasing category id; `coco` is a pycocotools COCO
    object over the cleaned annotations (what the evaluation compares against)."""

    def __init__(self, ann_file: str | Path):
        self.file = Path(ann_file)
        self.fixes = {"clipped_boxes": 0}
        doc = self._load()
        self._problems: list[str] = []
        cats = self._categories(doc["categories"])
        images = self._images(doc["images"])
        anns = self._annotations(doc["annotations"], images, cats)
        if self._problems:
            n = len(self._problems)
            more = f" (and {n - MAX_LISTED} more problems)" if n > MAX_LISTED else ""
            raise DataError("; ".join(self._problems[:MAX_LISTED]) + more)
        self.cat_ids = sorted(cats)
        self.class_names = [cats[c] for c in self.cat_ids]
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.images = images
        self.image_ids = sorted(images)
        self.by_image: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        for a in anns:
            self.by_image[a["image_id"]].append(a)
        self.coco = COCO()
        self.coco.dataset = {"images": [images[i] for i in self.image_ids], "annotations": anns,
                             "categories": [{"id": c, "name": cats[c]} for c in self.cat_ids]}
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        if self.fixes["clipped_boxes"]:
            from ...engine.distributed import is_distributed
            if not is_distributed() or torch.distributed.get_rank() == 0:
                log.warning("%s: clipped %d boxes that extended outside their image",
                            self.file, self.fixes["clipped_boxes"])

    def label_to_cat(self, label: int) -> int:
        """The category id of a contiguous label."""
        return self.cat_ids[label]

    def _load(self) -> dict:
        if not self.file.is_file():
            raise DataError(f"{self.file}: annotation file not found (expected a COCO instances JSON)")
        try:
            doc = json.loads(self.file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.file}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise DataError(f"{self.file}: expected a JSON object with images, annotations, categories")
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
        if missing:
            raise DataError(f"{self.file}: missing or not a list: {', '.join(missing)} "
                            "(expected a COCO instances file)")
        return doc

    def _problem(self, what: str, msg: str) -> None:
        self._problems.append(f"{self.file}: {what}: {msg}")

    def _categories(self, cats: list) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, c in enumerate(cats):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
                self._problem(f"categories[{i}]", "expected an object with integer 'id' and 'name'")
            elif c["id"] in out:
                self._problem(f"category id {c['id']}", "duplicate id")
            else:
                out[c["id"]] = str(c["name"])
        if not out and not self._problems:
            raise DataError(f"{self.file}: no categories")
        return out

    def _entry(self, obj, where: str, kind: str, id_types: tuple, keys: tuple[str, ...]) -> str | None:
        """'<kind> id N' for an object with an id of `id_types` and every one of `keys`; else the
        problem is recorded and None returned."""
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), id_types):
            self._problem(where, "missing integer 'id'" if id_types == (int,) else "missing 'id' (an integer)")
            return None
        what = f"{kind} id {obj['id']}"
        missing = [k for k in keys if k not in obj]
        if missing:
            self._problem(what, f"missing key(s) {', '.join(missing)}")
            return None
        return what

    def _images(self, images: list) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for i, im in enumerate(images):
            what = self._entry(im, f"images[{i}]", "image", (int,), ("file_name", "width", "height"))
            if what is None:
                continue
            if not (_positive_int(im["width"]) and _positive_int(im["height"])):
                self._problem(what, f"width/height must be positive integers, got "
                                    f"{im['width']!r} x {im['height']!r}")
            elif im["id"] in out:
                self._problem(what, "duplicate id")
            else:
                out[im["id"]] = {"id": im["id"], "file_name": str(im["file_name"]),
                                 "width": im["width"], "height": im["height"]}
        return out

    def _annotations(self, anns: list, images: dict[int, dict], cats: dict[int, str]) -> list[dict]:
        out, seen = [], set()
        for i, a in enumerate(anns):
            what = self._entry(a, f"annotations[{i}]", "annotation", (int, str), ("image_id", "category_id", "bbox"))
            if what is None:
                continue
            if a["id"] in seen:
                self._problem(what, "duplicate id")
                continue
            seen.add(a["id"])
            if a["image_id"] not in images:
                self._problem(what, f"unknown image_id {a['image_id']!r}")
                continue
            what += f" (image id {a['image_id']})"
            if a["category_id"] not in cats:
                self._problem(what, f"unknown category_id {a['category_id']!r}; known ids: "
                                    f"{', '.join(map(str, sorted(cats)))}")
                continue
            box = a["bbox"]
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(_number, box))):
                self._problem(what, f"bbox {box!r} is not [x, y, width, height] (four numbers)")
                continue
            x, y, w, h = map(float, box)
            if w <= 0 or h <= 0:
                self._problem(what, f"bbox {box!r} has non-positive width or height "
                                    "(expected [x, y, width, height] with width, height > 0)")
                continue
            crowd = a.get("iscrowd", 0)
            if crowd not in (0, 1):
                self._problem(what, f"iscrowd must be 0 or 1, got {crowd!r}")
                continue
            im = images[a["image_id"]]
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(im["width"])), min(y + h, float(im["height"]))
            if x1 <= x0 or y1 <= y0:
                self._problem(what, f"bbox {box!r} lies outside its {im['width']}x{im['height']} "
                                    f"image {im['file_name']}")
                continue
            area = a.get("area", w * h)
            if not _number(area) or area < 0:
                self._problem(what, f"area must be a non-negative number, got {area!r}")
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                self.fixes["clipped_boxes"] += 1
                area = min(area, (x1 - x0) * (y1 - y0))
            out.append({"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd)})
        return out


class CocoDetection(Dataset):
    """Images of a COCO instances file; each item is `transform`ed into a detection sample dict.

    Crowd boxes are left out of the training targets (COCOeval handles them at evaluation);
    images without boxes are kept."""

    def __init__(self, image_dir: str | Path, anns: CocoAnnotations, transform,
                 skip_bad: bool = False, image_ids: list[int] | None = None):
        self.image_dir, self.anns, self.transform, self.skip_bad = Path(image_dir), anns, transform, skip_bad
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: no such image folder (for {anns.file})")
        self.ids = list(anns.image_ids if image_ids is None else image_ids)

    @property
    def fixes(self) -> dict:
        """Counts of annotation fixes made when loading (e.g. boxes clipped to the image)."""
        return self.anns.fixes

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, image_id: int) -> dict:
        """Training target of one image: non-crowd boxes (xyxy, pixels) and contiguous labels."""
        anns = [a for a in self.anns.by_image[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.anns.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels}

    def load(self, i: int) -> tuple[torch.Tensor, dict, dict]:
        """(uint8 image, target, image record) of item i; BadSampleError for a bad image file."""
        info = self.anns.images[self.ids[i]]
        path = self.image_dir / info["file_name"]
        image = read_image(path)
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise BadSampleError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but "
                                 f"{self.anns.file} (image id {info['id']}) says "
                                 f"{info['width']}x{info['height']}")
        return image, self.target(info["id"]), info

    def __getitem__(self, i: int):
        try:
            image, target, info = self.load(i)
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
        h, w = image.shape[1:]
        sample = self.transform({
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w)),
            "labels": target["labels"]})
        return {"image": sample["image"].as_subclass(torch.Tensor),
                "target": {"boxes": sample["boxes"].as_subclass(torch.Tensor).float(),
                           "labels": sample["labels"]},
                "image_id": info["id"], "orig_size": torch.tensor([h, w])}
