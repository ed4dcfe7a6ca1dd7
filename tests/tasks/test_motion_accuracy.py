"""Slow: squeezetime_mini learns the embedded `motion` classes from time, and cannot from one repeated frame.

Both runs take the real training path (generated mp4 files, PyAV decoding, whole-clip transforms, the
engine's fit) with the packaged `video_motion` recipe; the second only sets data.augment.single_frame,
so every clip, in training and validation, is its middle frame repeated 16 times."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from mobilezoo.data import motion
from mobilezoo.deploy.compiled import compile_for_inference
from mobilezoo.engine.loop import fit
from mobilezoo.layers.fuse import fuse_for_inference
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import load_run
from mobilezoo.tasks.video import VideoTask


def _train(tmp_path, name: str, **overrides) -> tuple[dict, dict]:
    pytest.importorskip("mobilezoo.models.squeezetime")
    root = motion.ensure()  # the default set in the cache (generated once, about half a minute)
    recipe = load_recipe("video_motion", {"data.name": str(root), "out": str(tmp_path / name), **overrides})
    metrics = fit(recipe, VideoTask(recipe))
    last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    return metrics, last


def _val_predictions(model, task, dtype) -> torch.Tensor:
    """Single-view top-1 class of every val clip (the split training validates on), in `dtype`."""
    loader = DataLoader(task.datasets()[1], batch_size=16, collate_fn=task.collate)
    with torch.inference_mode():  # (N, views=1, C, T, H, W) -> (N, C, T, H, W)
        return torch.cat([model(batch["video"].flatten(0, 1).to(dtype)).argmax(1) for batch in loader])


@pytest.mark.slow
def test_squeezetime_mini_learns_motion_and_bf16_keeps_its_predictions(tmp_path):
    metrics, last = _train(tmp_path, "motion")
    assert last["epoch"] == load_recipe("video_motion").train.epochs
    assert metrics["count"] == motion.NUM_VAL
    assert metrics["top1"] >= 0.90, metrics
    # bf16 as benchmarked (BN folded in fp32, then weights and activations cast): same top-1 per clip
    _, task, model = load_run(tmp_path / "motion")
    fp32 = _val_predictions(fuse_for_inference(model), task, torch.float32)
    bf16 = _val_predictions(fuse_for_inference(model).to(torch.bfloat16), task, torch.bfloat16)
    assert len(fp32) == motion.NUM_VAL
    assert (fp32 == bf16).float().mean() >= 0.99, f"{int((fp32 != bf16).sum())} of {len(fp32)} clips changed"
    # and compiled (TorchInductor, frozen bf16 weights), the video benchmark's fastest row
    compiled = _val_predictions(compile_for_inference(model, torch.bfloat16), task, torch.bfloat16)
    assert (fp32 == compiled).float().mean() >= 0.99, f"{int((fp32 != compiled).sum())} clips changed"


@pytest.mark.slow
def test_a_single_repeated_frame_stays_near_chance(tmp_path):
    metrics, _ = _train(tmp_path, "single_frame", **{"data.augment.single_frame": True})
    assert metrics["count"] == motion.NUM_VAL
    assert metrics["top1"] <= 0.25, metrics  # chance is 1/8; a frame carries no class information
