"""Engine: resume equivalence, NaN stop, unsafe trainer state, EMA and BN recalibration."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mobilezoo.engine import fit
from mobilezoo.engine.checkpoint import load_checkpoint
from mobilezoo.engine.loop import recalibrate_bn
from mobilezoo.errors import TrainingDiverged
from mobilezoo.models import CheckpointError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task


def _fit(overrides, **kw):
    recipe = load_recipe(None, overrides)
    return fit(recipe, build_task(recipe), **kw)


def _weights(run, name="model.safetensors"):
    return load_file(str(run / name))


def test_resume_continues_exactly(shapes_folder, tiny_overrides, tmp_path):
    """4 epochs straight == 2 epochs, killed, then --resume for the rest (weights, EMA, metrics)."""
    extra = {"train.ema_decay": 0.9}
    _fit(tiny_overrides(shapes_folder, tmp_path / "straight", **extra))
    _fit(tiny_overrides(shapes_folder, tmp_path / "split", **extra), stop_after=2)
    half = json.loads((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()[-1])
    assert half["epoch"] == 2
    _fit(tiny_overrides(shapes_folder, tmp_path / "split", **extra), resume=True)
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = _weights(tmp_path / "straight", name), _weights(tmp_path / "split", name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    split = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(straight) == len(split) == 4
    for x, y in zip(straight, split):
        x, y = json.loads(x), json.loads(y)
        assert x["train_loss"] == y["train_loss"] and x["val_top1"] == y["val_top1"]


def test_training_learns_and_weights_change(shapes_folder, tiny_overrides, tmp_path):
    """A few epochs on a colour-coded 3-class set beat chance clearly (the loop really trains)."""
    metrics = _fit(tiny_overrides(shapes_folder, tmp_path / "run", epochs=6, **{"optim.lr": 3e-3}))
    assert metrics["count"] == 18
    assert metrics["top1"] >= 0.8


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes_folder, tiny_overrides, tmp_path, monkeypatch):
    from mobilezoo.tasks.classification import ClassificationTask
    real, calls = ClassificationTask.loss, {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        out = real(self, model, batch)
        return out * float("nan") if calls["n"] == 7 else out  # 4 steps/epoch: step 7 is epoch 2

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="nan"):
        _fit(tiny_overrides(shapes_folder, run, batch=8))
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v.float()).all() for v in _weights(run).values())


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_resume_refuses_pickle_with_code(shapes_folder, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=1))
    torch.save({"epoch": 1, "payload": _Evil()}, run / "trainer_state.pt")
    recipe = load_recipe(str(run / "config.yaml"))
    task = build_task(recipe)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_checkpoint(run, model, opt, sched)


def test_bn_recalibration_matches_data_statistics():
    """After recalibration the running mean/var of the first BN equal the batch statistics."""
    from mobilezoo.engine.loop import Context
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3, momentum=0.01)

    class Task:
        def forward(self, model, batch):
            return model(batch["image"])

    data = [{"image": torch.randn(16, 3, 4, 4) * 5 + 2} for _ in range(3)]
    recalibrate_bn(bn, data, 3, Task(), Context(torch.device("cpu")))
    x = torch.cat([d["image"] for d in data])
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([d["image"].var((0, 2, 3), unbiased=True) for d in data]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, rtol=1e-4)
    assert bn.momentum == 0.01


def test_channels_last_context_uses_the_3d_layout_for_volumes():
    from mobilezoo.engine.loop import Context
    ctx = Context(torch.device("cpu"), channels_last=True)
    model = ctx.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv3d(4, 4, 3, groups=4)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    batch = ctx.batch({"image": torch.randn(2, 3, 8, 8), "volume": torch.randn(2, 4, 6, 6, 6),
                       "label": torch.zeros(2, 6, 6, 6, dtype=torch.long)})
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["volume"].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["label"].is_contiguous() and batch["label"].dtype == torch.long
