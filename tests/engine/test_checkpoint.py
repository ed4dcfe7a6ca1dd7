"""Checkpoints as one unit: a failure inside any write keeps the previous checkpoint, a kill between
the renames is finished on resume, a mismatched weights/state pair is refused; finished and
existing runs."""
import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mobilezoo.engine import checkpoint as ckpt
from mobilezoo.engine import fit
from mobilezoo.errors import TrainingDiverged, UserError
from mobilezoo.models import CheckpointError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task

EMA = {"train.ema_decay": 0.9}


def _fit(overrides, **kw):
    recipe = load_recipe(None, overrides)
    return fit(recipe, build_task(recipe), **kw)


def _files(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _same_weights(a, b):
    for name in ("model.safetensors", "model_ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{name}:{k} differs"


@pytest.fixture(scope="module")
def straight(shapes_folder, tmp_path_factory, tiny_overrides):
    """3 epochs without interruption (with EMA): what every interrupted run must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA))
    return run


class Killed(BaseException):
    """Stands for the process dying (kill -9): nothing after it runs, no handler sees it."""


@pytest.mark.parametrize("failing_write", [0, 1, 2])  # weights, EMA weights, the pending state
def test_a_failed_write_keeps_the_previous_checkpoint(shapes_folder, tiny_overrides, tmp_path, monkeypatch,
                                                      failing_write, straight):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), stop_after=1)
    before = _files(run)
    real, calls = ckpt._write, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) - 1 == failing_write:
            real(path, data[: len(data) // 2])  # the disk fills half-way through this file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", full_disk)
    with pytest.raises(CheckpointError) as e:
        _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    message = str(e.value)
    assert str(calls[failing_write]) in message and "No space left" in message and "kept" in message
    after = _files(run)
    for name in ("model.safetensors", "model_ema.safetensors", "trainer_state.pt"):
        assert after[name] == before[name], f"{name} changed by the failed checkpoint"
    assert not [n for n in after if n.endswith((".tmp", ".pending"))]
    monkeypatch.setattr(ckpt, "_write", real)
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    _same_weights(run, straight)


@pytest.mark.parametrize("renames_done", [0, 1, 2])  # killed before / between / after the weight renames
def test_killed_between_the_renames_resumes_bit_exact(shapes_folder, tiny_overrides, tmp_path, monkeypatch,
                                                      renames_done, straight):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), stop_after=1)
    real, count = os.replace, {"n": 0}

    def dying_replace(src, dst):
        if not str(src).endswith((".safetensors.tmp", ".pending")):  # not a checkpoint file
            return real(src, dst)
        if count["n"] == renames_done:
            raise Killed
        count["n"] += 1
        real(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    monkeypatch.setattr(os, "replace", real)
    # The state on disk is still epoch 1's; the pending epoch-2 checkpoint is complete.
    assert torch.load(run / "trainer_state.pt", weights_only=True)["epoch"] == 1
    assert ckpt.checkpoint_epoch(run) == 2
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    _same_weights(run, straight)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_killed_while_writing_the_state_falls_back_to_the_last_checkpoint(shapes_folder, tiny_overrides,
                                                                          tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), stop_after=1)
    real = ckpt._write

    def dying_write(path, data):
        if path.name.endswith(".pending"):
            real(path, data[:100])  # a torn file, then the process is gone
            raise Killed
        real(path, data)

    monkeypatch.setattr(ckpt, "_write", dying_write)
    with pytest.raises(Killed):
        _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    monkeypatch.setattr(ckpt, "_write", real)
    assert ckpt.checkpoint_epoch(run) == 1
    assert not (run / "trainer_state.pt.pending").exists() and not (run / "model.safetensors.tmp").exists()
    _fit(tiny_overrides(shapes_folder, run, epochs=3, **EMA), resume=True)
    _same_weights(run, straight)


def test_weights_that_do_not_belong_to_the_state_are_refused(shapes_folder, tiny_overrides, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _fit(tiny_overrides(shapes_folder, run, epochs=2), stop_after=1)
    _fit(tiny_overrides(shapes_folder, other, epochs=2, **{"train.seed": 5}), stop_after=1)
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors: not the weights the trainer state of epoch 1"):
        _fit(tiny_overrides(shapes_folder, run, epochs=2), resume=True)


def test_a_finished_run_is_not_resumed_but_can_be_extended(shapes_folder, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=1))
    with pytest.raises(UserError, match=r"complete \(1 of 1 epochs\).*larger --epochs"):
        _fit(tiny_overrides(shapes_folder, run, epochs=1), resume=True)
    metrics = _fit(tiny_overrides(shapes_folder, run, epochs=2), resume=True)
    epochs = [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and metrics["count"] == 18
    assert torch.load(run / "trainer_state.pt", weights_only=True)["epoch"] == 2


def test_training_into_an_existing_run_needs_overwrite(shapes_folder, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=1))
    before = _files(run)
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        _fit(tiny_overrides(shapes_folder, run, epochs=1, **{"train.seed": 3}))
    assert _files(run) == before
    _fit(tiny_overrides(shapes_folder, run, epochs=1, **{"train.seed": 3}), overwrite=True)
    assert _files(run)["model.safetensors"] != before["model.safetensors"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_before_any_checkpoint_says_none_was_kept(shapes_folder, tiny_overrides, tmp_path, monkeypatch):
    from mobilezoo.tasks.classification import ClassificationTask
    real = ClassificationTask.loss
    monkeypatch.setattr(ClassificationTask, "loss", lambda self, m, b: real(self, m, b) * float("nan"))
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        _fit(tiny_overrides(shapes_folder, run))
    assert not (run / "trainer_state.pt").exists()
