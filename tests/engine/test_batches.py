"""Training batches that lose samples: one-sample batches reaching 1x1 maps (BatchNorm has no batch
statistics there) and batches whose every sample is unreadable, in each task's real model."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from mobilezoo.data import brats_phantom, motion, shapes
from mobilezoo.engine import fit
from mobilezoo.engine.batchnorm import one_sample_batchnorm
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task


def _records(recipe_name: str, data, out, **overrides) -> list[dict]:
    """metrics.jsonl of a 2-epoch batch-1 run that skips unreadable samples."""
    recipe = load_recipe(recipe_name, {"data.name": str(data), "out": str(out), "data.batch_size": 1,
                                       "data.skip_bad_samples": True, "train.epochs": 2, "train.threads": 1,
                                       "train.device": "cpu", "train.eval_every": 2, **overrides})
    fit(recipe, build_task(recipe))
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _spoil(path) -> None:
    path.write_bytes(np.random.default_rng(3).bytes(400))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_one_sample_batchnorm_trains_where_plain_batchnorm_fails():
    net = _bn_net().train()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(x)
    last = net[4]
    running = last.running_mean.clone(), last.running_var.clone()
    tracked = net[1].num_batches_tracked.item()
    with one_sample_batchnorm(net):
        net(x).sum().backward()
    # the 1x1 layer normalised with its running statistics, left them alone, and still learns
    assert torch.equal(last.running_mean, running[0]) and torch.equal(last.running_var, running[1])
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert net[1].num_batches_tracked == tracked + 1  # 16 values per channel on its 4x4 map: batch statistics
    assert all(m.training for m in net.modules())
    assert not net[1]._forward_pre_hooks and not net[1]._forward_hooks


def test_one_sample_batchnorm_changes_nothing_for_larger_batches():
    x = torch.randn(3, 3, 6, 6)
    plain, guarded = _bn_net().train(), _bn_net().train()
    with one_sample_batchnorm(guarded):
        assert torch.equal(guarded(x), plain(x))


def test_batch_size_one_with_unreadable_samples_trains_and_counts_them(shapes_folder, tiny_overrides, tmp_path,
                                                                       make_image_folder):
    """tiny-MOAT-0 at 32 px ends on 1x1 maps: batch 1 hit BatchNorm's error, and a batch whose only
    sample is unreadable came back without an 'image'."""
    root = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3, size=16)
    for name in ("a/a_0.png", "b/b_1.png"):
        (root / "train" / name).write_bytes(np.random.default_rng(1).bytes(300))
    recipe = load_recipe(None, tiny_overrides(root, tmp_path / "run", epochs=2, batch=1,
                                              **{"data.skip_bad_samples": True}))
    fit(recipe, build_task(recipe))
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_skipped"] for r in records] == [2, 2]
    assert [r["step"] for r in records] == [4, 8]  # 6 batches an epoch, 2 of them empty
    assert all(np.isfinite(r["train_loss"]) for r in records)


def test_detection_at_batch_one_with_an_unreadable_image(tmp_path):
    """SSDLite's last extra layer is 1x1 at 128 px; one of the 3 training images is unreadable."""
    root = shapes.ensure(tmp_path / "shapes", num_train=3, num_val=2)
    _spoil(root / "train" / "000002.jpg")
    records = _records("detect_shapes", root, tmp_path / "run", **{"data.img_size": 128, "data.eval_batch_size": 2,
                                                                   "train.bn_recalibrate": 1})
    assert [(r["step"], r["train_skipped"]) for r in records] == [(2, 1), (4, 1)]
    assert all(np.isfinite(r["train_loss"]) for r in records) and records[-1]["val_count"] == 2


def test_video_at_batch_one_with_an_unreadable_clip(tmp_path):
    root = motion.ensure(tmp_path / "motion", num_train=3, num_val=2)
    clip = sorted((root / "train").rglob("*.mp4"))[1]
    _spoil(clip)
    records = _records("video_motion", root, tmp_path / "run", **{"data.eval_batch_size": 2,
                                                                  "optim.warmup_epochs": 0})
    assert [(r["step"], r["train_skipped"]) for r in records] == [(2, 1), (4, 1)]
    assert all(np.isfinite(r["train_loss"]) for r in records)


def test_segmentation_at_batch_one_with_an_unreadable_case(tmp_path):
    """segment_brats trains at batch 1: an unreadable case is a batch with nothing in it."""
    root = brats_phantom.ensure(tmp_path / "phantom", num_train=2, num_val=1, shape=(24, 24, 20))
    flair = sorted((root / "train").rglob("*_flair.nii.gz"))[0]
    flair.write_bytes(flair.read_bytes()[:200])
    records = _records("segment_brats_phantom", root, tmp_path / "run",
                       **{"data.img_size": 16, "data.augment.cache": False})
    assert [(r["step"], r["train_skipped"]) for r in records] == [(1, 1), (2, 1)]
    assert all(np.isfinite(r["train_loss"]) for r in records)
