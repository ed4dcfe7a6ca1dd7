"""`shapes`: a generated COCO-format detection set of flat-coloured shapes on textured backgrounds.

Layout (the same as any user COCO dataset the detection task reads):

    shapes/train/000001.jpg ...          shapes/annotations/instances_train.json
    shapes/val/000001.jpg ...            shapes/annotations/instances_val.json

Five classes told apart by form only (colour is random), with category ids that have gaps
(1, 3, 4, 7, 9) so the id <-> label mapping is exercised. Each image is 320x320 with 1-6 shapes
(none in every 20th image) of 20-160 px (longer side), random aspect and rotation, partial
overlap (every shape keeps at least 60% of its pixels visible), on a gradient + stripes/blobs +
fine-noise background. A box is the exact extent of the shape's visible pixels and `area` their
count (COCO's modal convention). Every 16th val image also holds a crowd: a cluster of small
same-class shapes annotated by one iscrowd=1 box. Every image is drawn from its own seed, so the
set is the same on every machine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import publish_splits

VERSION = 1  # bump when the generator changes: a cached set of another version is rewritten
SIZE = 320
NUM_TRAIN, NUM_VAL = 1000, 200
SEED = 2024
CATEGORIES = {1: "ellipse", 3: "rectangle", 4: "triangle", 7: "star", 9: "cross"}
SIZE_RANGE = (20, 160)  # longer side of a shape, in pixels (log-uniform)
ASPECT_RANGE = (0.6, 1.0 / 0.6)
MAX_OBJECTS = 6
EMPTY_EVERY = 20  # images i with i % 20 == 7 have no shapes (5%)
CROWD_EVERY = 16  # val images i with i % 16 == 5 hold a crowd (about 6%)
MIN_VISIBLE = 0.6
MIN_CONTRAST = 110.0  # RGB distance between a shape and the background under it
CROWD = -2  # in make_image's map of shapes: a pixel of the crowd's small shapes


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each class as a polygon in [-1, 1]^2 (before aspect, rotation and scale)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    star_t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
    star_r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    a = 0.33  # half-width of a cross arm
    tri_t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
    return {
        "ellipse": np.stack([np.cos(t), np.sin(t)], 1),
        "rectangle": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
        "triangle": np.stack([np.cos(tri_t), np.sin(tri_t)], 1),
        "star": np.stack([star_r * np.cos(star_t), star_r * np.sin(star_t)], 1),
        "cross": np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                           [-a, a], [-1, a], [-1, -a], [-a, -a]], float),
    }


POLYGONS = _unit_polygons()
MAX_ROTATION = {"ellipse": 180.0, "rectangle": 25.0, "triangle": 180.0, "star": 180.0, "cross": 25.0}


def _background(rng: np.random.Generator) -> np.ndarray:
    """A float32 (S, S, 3) texture: a two-colour gradient plus stripes or soft blobs."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    g = np.cos(ang) * xx + np.sin(ang) * yy
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c0 + (c1 - c0) * g[..., None]
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and period
        period, ang2 = rng.uniform(8, 40), rng.uniform(0, np.pi)
        phase = (np.cos(ang2) * xx + np.sin(ang2) * yy) * SIZE * 2 * np.pi / period
        sign = rng.choice([-1, 1], 3).astype(np.float32)
        img += np.float32(rng.uniform(15, 40)) * np.sin(phase)[..., None] * sign
    elif kind == 1:  # soft blobs: a coarse random grid upsampled bilinearly
        n = int(rng.integers(3, 9))
        coarse = rng.uniform(-1, 1, (n, n, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
            (SIZE, SIZE), Image.BILINEAR)) for c in range(3)], -1)
        img += np.float32(rng.uniform(20, 50)) * up
    return img


def _shape_mask(name: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A boolean mask of one shape in its own tight canvas, with its height and width."""
    longer = math.exp(rng.uniform(math.log(SIZE_RANGE[0]), math.log(SIZE_RANGE[1])))
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    sx, sy = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    rot = math.radians(rng.uniform(-MAX_ROTATION[name], MAX_ROTATION[name]))
    pts = POLYGONS[name] * [sx / 2, sy / 2]
    r = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    pts = pts @ r.T
    pts -= pts.min(0)
    w, h = int(math.ceil(pts[:, 0].max())) + 2, int(math.ceil(pts[:, 1].max())) + 2
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(float(x) + 1, float(y) + 1) for x, y in pts], fill=255)
    mask = np.asarray(canvas) > 0
    ys, xs = np.nonzero(mask)
    mask = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    return mask, mask.shape[0], mask.shape[1]


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean background colour `under`."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        d = float(np.linalg.norm(c - under))
        if d >= MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _place(owner: np.ndarray, full_area: list[int], mask: np.ndarray, rng: np.random.Generator,
           forbid: np.ndarray | None) -> tuple[int, int] | None:
    """A top-left corner where `mask` leaves every earlier shape >= MIN_VISIBLE visible, or None."""
    h, w = mask.shape
    for _ in range(30):
        y, x = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
        region = owner[y: y + h, x: x + w]
        if forbid is not None and (forbid[y: y + h, x: x + w] & mask).any():
            continue
        covered = region[mask]
        ok = True
        for j in np.unique(covered[covered >= 0]):
            visible = int((owner == j).sum()) - int((covered == j).sum())
            if visible < MIN_VISIBLE * full_area[j]:
                ok = False
                break
        if ok:
            return y, x
    return None


def _box(m: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] of the pixels set in a full-image mask (pixel edges, so w = x1 - x0 + 1)."""
    ys, xs = np.nonzero(m)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def make_image(index: int, split: str) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """One uint8 (S, S, 3) image, its annotations (without ids) and the map of which shape each
    pixel shows (-1: background, CROWD: a pixel of the crowd), drawn from its own seed."""
    rng = np.random.default_rng([SEED, 0 if split == "train" else 1, index])
    img = _background(rng)
    names = list(CATEGORIES.values())
    cat_of = {v: k for k, v in CATEGORIES.items()}
    owner = np.full((SIZE, SIZE), -1, np.int32)  # index of the shape each pixel shows
    shapes: list[tuple[str, np.ndarray]] = []  # (class, colour) per drawn shape
    full_area: list[int] = []
    anns: list[dict] = []
    forbid = None
    if split == "val" and index % CROWD_EVERY == 5:
        # a crowd: 6-10 small shapes of one class in a patch, one iscrowd box for all of them
        name = names[int(rng.integers(len(names)))]
        ph, pw = int(rng.integers(60, 110)), int(rng.integers(60, 110))
        py, px = int(rng.integers(0, SIZE - ph)), int(rng.integers(0, SIZE - pw))
        crowd = np.zeros((SIZE, SIZE), bool)
        for _ in range(int(rng.integers(6, 11))):
            s = int(rng.integers(10, 17))
            canvas = Image.new("L", (s, s), 0)
            pts = POLYGONS[name] * (s / 2 - 0.5) + s / 2
            ImageDraw.Draw(canvas).polygon([(float(a), float(b)) for a, b in pts], fill=255)
            m = np.asarray(canvas) > 0
            y, x = py + int(rng.integers(0, ph - s)), px + int(rng.integers(0, pw - s))
            under = img[y: y + s, x: x + s][m].mean(0)
            img[y: y + s, x: x + s][m] = _colour(rng, under)
            crowd[y: y + s, x: x + s] |= m
        anns.append({"category_id": cat_of[name], "bbox": _box(crowd), "area": float(crowd.sum()),
                     "iscrowd": 1})
        owner[crowd] = CROWD  # its class is that of the crowd annotation (the first)
        forbid = np.zeros((SIZE, SIZE), bool)
        x, y, w, h = (int(v) for v in anns[0]["bbox"])
        forbid[y: y + h, x: x + w] = True
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if index % EMPTY_EVERY != 7 else 0
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        mask, h, w = _shape_mask(name, rng)
        at = _place(owner, full_area, mask, rng, forbid)
        if at is None:
            continue
        y, x = at
        colour = _colour(rng, img[y: y + h, x: x + w][mask].mean(0))
        owner[y: y + h, x: x + w][mask] = len(shapes)
        img[y: y + h, x: x + w][mask] = colour
        shapes.append((name, colour))
        full_area.append(int(mask.sum()))
    for i, (name, _) in enumerate(shapes):
        visible = owner == i
        anns.append({"category_id": cat_of[name], "bbox": _box(visible),
                     "area": float(visible.sum()), "iscrowd": 0})
    # fine noise over background and shapes alike
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3, 8))
    return np.clip(img, 0, 255).astype(np.uint8), anns, owner


def write_split(root: Path, split: str, count: int) -> None:
    """Write `count` JPEGs to root/split and their COCO instances JSON to root/annotations."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, anns, _ = make_image(i, split)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(pixels).save(root / split / name, quality=92)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    doc = {"info": {"description": f"mobilezoo generated shapes v{VERSION}, {split}", "version": VERSION},
           "licenses": [], "images": images, "annotations": annotations,
           "categories": [{"id": k, "name": v, "supercategory": "shape"} for k, v in CATEGORIES.items()]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


def ensure(root: Path | None = None, num_train: int | None = None, num_val: int | None = None) -> Path:
    """Write the dataset under `root` (default: the cache) unless already complete; return root.

    `num_train` / `num_val` (default NUM_TRAIN, NUM_VAL) shrink the set for tests; image i is the
    same whatever the count. A cached set written with other counts or by another VERSION is
    rewritten."""
    counts = {"train": NUM_TRAIN if num_train is None else num_train, "val": NUM_VAL if num_val is None else num_val}
    return publish_splits("shapes", root, counts, VERSION, SEED, write_split)
