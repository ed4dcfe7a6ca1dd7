"""Slow: squeezetime_mini learns the embedded `motion` classes from time, and cannot from one repeated frame.

Both runs take the real training path (generated mp4 files, PyAV decoding, whole-clip transforms, the
engine's fit) with the packaged `video_motion` recipe; the second only sets data.augment.single_frame,
so every clip, in training and validation, is its middle frame repeated 16 times."""
import json

import pytest

from mobilezoo.data import motion
from mobilezoo.engine.loop import fit
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks.video import VideoTask


def _train(tmp_path, name: str, **overrides) -> tuple[dict, dict]:
    pytest.importorskip("mobilezoo.models.squeezetime")
    root = motion.ensure()  # the default set in the cache (generated once, about half a minute)
    recipe = load_recipe("video_motion", {"data.name": str(root), "out": str(tmp_path / name), **overrides})
    metrics = fit(recipe, VideoTask(recipe))
    last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    return metrics, last


@pytest.mark.slow
def test_squeezetime_mini_learns_motion(tmp_path):
    metrics, last = _train(tmp_path, "motion")
    assert last["epoch"] == load_recipe("video_motion").train.epochs
    assert metrics["count"] == motion.NUM_VAL
    assert metrics["top1"] >= 0.90, metrics


@pytest.mark.slow
def test_a_single_repeated_frame_stays_near_chance(tmp_path):
    metrics, _ = _train(tmp_path, "single_frame", **{"data.augment.single_frame": True})
    assert metrics["count"] == motion.NUM_VAL
    assert metrics["top1"] <= 0.25, metrics  # chance is 1/8; a frame carries no class information
