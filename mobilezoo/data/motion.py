"""`motion`: generated mp4 clips whose class is defined only by how an object moves over time.

Eight classes: left, right, up, down (translation), clockwise, counterclockwise (rotation), grow,
shrink (scale). One light shape (triangle, bar, L or T; 14-42 px, tinted along its axis) on a dark,
mildly textured static background, 64x64, 36 frames, h264 yuv420p. Layout (both forms the video
task reads):

    motion/train/<class>/<class>_0001.mp4 ...    motion/val/<class>/...
    motion/train_list.txt, motion/val_list.txt    (`train/<class>/<file>.mp4 <label>` lines)
    motion/classes.txt                            (one class name a line, label i on line i)

A single frame says nothing about the class. Every attribute lives on a circle and moves at a
constant rate: the position on the 64x64 torus (the object wraps around the edges), the angle, and
the phase of a sawtooth over log-size (grow: steadily larger, then a jump back to the smallest size).
Every clip draws all attributes (centre, angle, size phase, speeds, shape, colours, background)
from the same distributions whatever its class, uniform on each circle; the class only picks which
attribute moves and in which direction. A uniform phase stays uniform under a constant rotation of
the circle, so the distribution of any one frame is exactly the same under every class.

What makes it learnable in a CPU-sized run (measured with squeezetime_mini, in-memory clips):
- Motion is sized for the recipe's sampling of every 2nd frame: per sampled frame 1.2-1.6 px,
  4-6 degrees or a 2.5-3.5% change of size, so that over a 16-frame clip an object moves 18-24 px
  (under half the torus: left and right cannot be confused through the wrap) and turns 60-90
  degrees (under the bar's 180-degree symmetry).
- The object is always lighter than the background. With random polarity (dark objects as often as
  light ones) the network separated the axes of motion but not their direction: 42% after 40 epochs
  of 1,600 clips. Light-on-dark gave 96% after 10 epochs of 800 clips: the direction of time then
  shows as a fixed-sign pattern (light arriving ahead, leaving behind) that the stem convolution,
  which sees all 16 frames at once, can pick up linearly.
Every clip is drawn from its own seed, so the set is the same on every machine."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import publish_splits

VERSION = 1  # bump when the generator changes: a cached set of another version is rewritten
SIZE = 64
FRAMES = 36
FPS = 25
NUM_TRAIN, NUM_VAL = 480, 160  # 60 and 20 clips per class
SEED = 4242
CLASSES = ("left", "right", "up", "down", "clockwise", "counterclockwise", "grow", "shrink")
SIZE_RANGE = (14.0, 42.0)  # longer side in pixels; grow/shrink run a sawtooth over log-size in this range
SPEED = (0.6, 0.8)  # pixels per frame
SPIN = (2.0, 3.0)  # degrees per frame
GROWTH = (0.0125, 0.0175)  # log-size per frame
NOISE = 2.0  # per-frame sensor noise (std, 0-255 scale)
BACKGROUND_LEVELS = (10.0, 100.0)  # background colours, per channel, before its +-12 texture
OBJECT_LEVELS = (160.0, 235.0)  # object colours, per channel: always lighter than the background
SUPERSAMPLE = 4  # sub-pixels per pixel side for anti-aliased edges (motion is sub-pixel per frame)


def _box(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


# Each shape as a union of polygons in units of its longer side, centred on 0 (x right, y down).
# None is symmetric under a small rotation, so turning is visible.
SHAPES: dict[str, list[np.ndarray]] = {
    "triangle": [np.array([[0.5, 0.0], [-0.5, -0.3], [-0.5, 0.3]])],
    "bar": [_box(-0.5, 0.5, -0.2, 0.2)],
    "ell": [_box(-0.5, 0.5, 0.2, 0.5), _box(-0.5, -0.2, -0.5, 0.5)],
    "tee": [_box(-0.5, 0.5, -0.5, -0.2), _box(-0.15, 0.15, -0.5, 0.5)],
}


def _background(rng: np.random.Generator) -> np.ndarray:
    """A float32 (S, S, 3) mild texture: a two-colour gradient plus low-amplitude soft blobs."""
    from PIL import Image
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    c0, c1 = (rng.uniform(*BACKGROUND_LEVELS, 3).astype(np.float32) for _ in range(2))
    ang = rng.uniform(0, 2 * np.pi)
    g = np.cos(ang) * xx + np.sin(ang) * yy
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c0 + (c1 - c0) * g[..., None] * np.float32(rng.uniform(0.2, 0.6))
    n = int(rng.integers(3, 7))
    coarse = rng.uniform(-1, 1, (n, n, 3)).astype(np.float32)
    up = np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((SIZE, SIZE), Image.BILINEAR))
                   for c in range(3)], -1)
    return img + np.float32(rng.uniform(6, 12)) * up


def clip_params(index: int, split: str) -> dict:
    """Everything that defines clip `index` of a split, drawn from its own seed.

    The label is `index % 8`; every other draw is made the same way for every class."""
    rng = np.random.default_rng([SEED, 0 if split == "train" else 1, index])
    label = index % len(CLASSES)
    names = list(SHAPES)
    p = {"label": label, "shape": names[int(rng.integers(len(names)))],
         "centre": rng.uniform(0, SIZE, 2), "angle": rng.uniform(0, 360.0), "phase": rng.uniform(0, 1),
         "speed": rng.uniform(*SPEED), "spin": rng.uniform(*SPIN), "growth": rng.uniform(*GROWTH),
         "background": _background(rng)}
    p["colour"] = rng.uniform(*OBJECT_LEVELS, 3)
    p["tint"] = rng.uniform(0.25, 0.45)  # the far end of the object is this much closer to white
    p["noise_seed"] = int(rng.integers(2 ** 31))
    return p


def trajectory(p: dict, frames: int = FRAMES) -> dict[str, np.ndarray]:
    """Per-frame centre (x, y) on the torus, angle (degrees, clockwise on screen) and size (px)."""
    t = np.arange(frames, dtype=np.float64)
    name = CLASSES[p["label"]]
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(name, (0, 0))
    centre = (p["centre"][None] + p["speed"] * t[:, None] * np.array(step, float)) % SIZE
    turn = {"clockwise": 1, "counterclockwise": -1}.get(name, 0)
    angle = (p["angle"] + turn * p["spin"] * t) % 360.0  # y points down, so +angle turns clockwise
    scale = {"grow": 1, "shrink": -1}.get(name, 0)
    phase = (p["phase"] + scale * p["growth"] * t / math.log(SIZE_RANGE[1] / SIZE_RANGE[0])) % 1.0
    size = SIZE_RANGE[0] * (SIZE_RANGE[1] / SIZE_RANGE[0]) ** phase
    return {"centre": centre, "angle": angle, "size": size}


def _alpha(p: dict, centre: np.ndarray, angle: float, size: float) -> np.ndarray:
    """Anti-aliased coverage (S, S) of the shape at one pose, wrapped around the torus."""
    from PIL import Image, ImageDraw
    k = SUPERSAMPLE
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    canvas = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in SHAPES[p["shape"]]:
        pts = poly @ rot.T * size + centre
        for ox in (-SIZE, 0, SIZE):  # the copies a neighbouring tile of the torus shows
            for oy in (-SIZE, 0, SIZE):
                q = (pts + (ox, oy)) * k
                if q[:, 0].max() >= 0 and q[:, 0].min() < SIZE * k and q[:, 1].max() >= 0 \
                        and q[:, 1].min() < SIZE * k:
                    draw.polygon([(float(x), float(y)) for x, y in q], fill=255)
    return np.asarray(canvas.reduce(k), np.float32) / 255.0


def render(p: dict, frames: int = FRAMES) -> np.ndarray:
    """The uint8 (T, S, S, 3) frames of a clip."""
    traj = trajectory(p, frames)
    grid = np.arange(SIZE, dtype=np.float32) + 0.5
    noise_rng = np.random.default_rng(p["noise_seed"])
    out = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    for f in range(frames):
        (cx, cy), angle, size = traj["centre"][f], traj["angle"][f], traj["size"][f]
        alpha = _alpha(p, traj["centre"][f], angle, size)[..., None]
        # a tint along the shape's own axis, so that turning changes the pixels even where the outline
        # is symmetric; offsets to the centre are taken on the torus
        dx = (grid[None, :] - cx + SIZE / 2) % SIZE - SIZE / 2
        dy = (grid[:, None] - cy + SIZE / 2) % SIZE - SIZE / 2
        a = math.radians(angle)
        u = (math.cos(a) * dx + math.sin(a) * dy) / size
        tint = (p["tint"] * np.clip(u + 0.5, 0, 1))[..., None]
        obj = (p["colour"] + (255.0 - p["colour"]) * tint).astype(np.float32)
        img = p["background"] * (1 - alpha) + obj * alpha
        img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(NOISE)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS, codec: str = "libx264") -> None:
    """Encode uint8 (T, H, W, 3) RGB frames as an mp4 (yuv420p) with PyAV."""
    import av
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "tune": "fastdecode"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_split(root: Path, split: str, count: int) -> None:
    """Write `count` clips as root/split/<class>/*.mp4 and their root/<split>_list.txt."""
    lines = []
    for i in range(count):
        p = clip_params(i, split)
        name = CLASSES[p["label"]]
        rel = Path(split) / name / f"{name}_{i + 1:04d}.mp4"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_mp4(root / rel, render(p))
        lines.append(f"{rel.as_posix()} {p['label']}")
    (root / f"{split}_list.txt").write_text("\n".join(lines) + "\n")


def ensure(root: Path | None = None, num_train: int | None = None, num_val: int | None = None) -> Path:
    """Write the dataset under `root` (default: the cache) unless already complete; return root.

    `num_train` / `num_val` (default NUM_TRAIN, NUM_VAL) shrink the set for tests; clip i is the
    same whatever the count. A cached set written with other counts or by another VERSION is
    rewritten."""
    counts = {"train": NUM_TRAIN if num_train is None else num_train, "val": NUM_VAL if num_val is None else num_val}
    return publish_splits("motion", root, counts, VERSION, SEED, write_split, prepare=_write_classes)


def _write_classes(root: Path) -> None:
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
