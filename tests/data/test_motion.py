"""The embedded `motion` data: layout, encoding, and that only motion (never a single frame) tells the class."""
import math
from pathlib import Path

import av
import numpy as np
import pytest
from scipy import stats

from mobilezoo.data import motion

N_TRAIN, N_VAL = 16, 32  # val: 4 clips per class


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Generated once for the module, into a temporary folder (never the user's cache)."""
    return motion.ensure(tmp_path_factory.mktemp("gen") / "motion", num_train=N_TRAIN, num_val=N_VAL)


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_layout_lists_and_classes(root):
    assert (root / ".complete").is_file()
    assert (root / "classes.txt").read_text().split() == list(motion.CLASSES)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        files = sorted(p.relative_to(root).as_posix() for p in (root / split).rglob("*.mp4"))
        lines = [line.split() for line in (root / f"{split}_list.txt").read_text().splitlines()]
        assert sorted(rel for rel, _ in lines) == files and len(files) == n
        for rel, label in lines:  # the folder and the list agree on every clip's class
            assert Path(rel).parent.name == motion.CLASSES[int(label)]
        counts = np.bincount([int(label) for _, label in lines], minlength=8)
        assert (counts == n // 8).all()
    mtime = (root / ".complete").stat().st_mtime_ns
    assert motion.ensure(root, num_train=N_TRAIN, num_val=N_VAL) == root
    assert (root / ".complete").stat().st_mtime_ns == mtime  # complete: not rewritten
    assert not list(root.parent.glob("motion.partial*"))


def test_clips_are_h264_and_match_the_generator(root):
    path = next((root / "val" / "left").glob("*.mp4"))
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.width, s.height, s.frames) == (motion.SIZE, motion.SIZE, motion.FRAMES)
    i = int(path.stem.split("_")[-1]) - 1
    frames = decode(path)
    assert np.abs(frames.astype(int) - motion.render(motion.clip_params(i, "val"))).mean() < 4


def test_default_set_size():
    assert motion.NUM_TRAIN >= 400 and motion.NUM_VAL >= 120 and motion.NUM_TRAIN % 8 == motion.NUM_VAL % 8 == 0
    assert motion.FRAMES >= 32 and motion.SIZE == 64


def test_any_single_frame_is_distributed_the_same_under_every_class():
    # 100 clips per class; at the first, a middle and the last frame, each attribute of the object
    # (centre x, centre y, angle, log size) has the same distribution in every class: binned into 8,
    # a chi-square test of homogeneity across the 8 classes finds no difference, and each is uniform
    lo, hi = (math.log(s) for s in motion.SIZE_RANGE)
    trajs = [(motion.CLASSES[i % 8], motion.trajectory(motion.clip_params(i, "train"))) for i in range(800)]
    for f in (0, motion.FRAMES // 2, motion.FRAMES - 1):
        attrs = {"x": ([t["centre"][f, 0] for _, t in trajs], 0, motion.SIZE),
                 "y": ([t["centre"][f, 1] for _, t in trajs], 0, motion.SIZE),
                 "angle": ([t["angle"][f] for _, t in trajs], 0, 360),
                 "log size": ([math.log(t["size"][f]) for _, t in trajs], lo, hi)}
        for name, (values, a, b) in attrs.items():
            values = np.array(values)
            bins = np.clip(((values - a) / (b - a) * 8).astype(int), 0, 7)
            table = np.array([np.bincount(bins[c::8], minlength=8) for c in range(8)])
            p = stats.chi2_contingency(table).pvalue
            assert p > 1e-3, (f, name, table)
            assert stats.kstest((values - a) / (b - a), "uniform").pvalue > 1e-3, (f, name)
    # a generator that started objects where their motion leads away from (e.g. `left` on the right)
    # would fail this: the same test on the centre x of the *mean* position over the clip is fine,
    # but x at frame 0 shifted by +speed*T/2 for left and -speed*T/2 for right is not
    x0 = np.array([t["centre"][0, 0] for _, t in trajs])
    shift = np.where(np.arange(800) % 8 == 0, 12.0, np.where(np.arange(800) % 8 == 1, -12.0, 0.0))
    biased = np.clip(x0 + shift, 0, motion.SIZE - 1e-6)
    table = np.array([np.bincount((biased[c::8] / motion.SIZE * 8).astype(int), minlength=8) for c in range(8)])
    assert stats.chi2_contingency(table).pvalue < 1e-6  # the test has the power to see such a bias


def _circular_mean(v: np.ndarray, w: np.ndarray, period: float) -> float:
    a = 2 * np.pi * v / period
    return (math.atan2((w * np.sin(a)).sum(), (w * np.cos(a)).sum()) * period / (2 * np.pi)) % period


def _object_features(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per frame: circular centroid (x, y) on the torus, log area, orientation (degrees, mod 180)."""
    s = motion.SIZE
    mask = np.abs(frames.astype(np.float32) - background[None]).max(-1) > 40
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    out = []
    for m in mask:
        w = m.astype(float)
        cx, cy = _circular_mean(xx, w, s), _circular_mean(yy, w, s)
        dx = (xx - cx + s / 2) % s - s / 2
        dy = (yy - cy + s / 2) % s - s / 2
        mu20, mu02, mu11 = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
        theta = math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02)) % 180
        out.append((cx, cy, math.log(max(w.sum(), 1)), theta))
    return np.array(out)


def _wrap(d: np.ndarray, period: float) -> np.ndarray:
    return (d + period / 2) % period - period / 2


def test_the_class_is_recoverable_from_motion(root):
    # from the decoded pixels alone: the object's centroid, area and orientation change, frame to
    # frame (every 2nd frame, as the recipe samples), in the direction the label names
    lines = [line.split() for line in (root / "val_list.txt").read_text().splitlines()]
    step = 2
    right = 0
    for rel, label in lines:
        i = int(Path(rel).stem.split("_")[-1]) - 1
        p = motion.clip_params(i, "val")
        feats = _object_features(decode(root / rel), p["background"])
        d = feats[step:] - feats[:-step]
        dx, dy = np.median(_wrap(d[:, 0], motion.SIZE)), np.median(_wrap(d[:, 1], motion.SIZE))
        dlog, dtheta = np.median(d[:, 2]), np.median(_wrap(d[:, 3], 180))
        move, spin, grow = step * p["speed"], step * p["spin"], 2 * step * p["growth"]  # area ~ size^2
        scores = [-dx / move, dx / move, -dy / move, dy / move, dtheta / spin, -dtheta / spin,
                  dlog / grow, -dlog / grow]
        name = motion.CLASSES[int(label)]
        right += int(np.argmax(scores)) == int(label)
        # and the moving attribute changes at about the drawn rate
        k = int(np.argmax(scores))
        if k == int(label) and name in ("left", "right", "up", "down"):
            assert 0.7 < scores[k] < 1.3, (rel, scores)
    assert right >= 0.95 * len(lines), right
