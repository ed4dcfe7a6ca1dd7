"""fit / evaluate: the single loop behind every task's train and eval commands."""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..errors import TrainingDiverged, UserError
from ..models.weights import load_backbone, load_pretrained
from ..recipes import Recipe
from .batchnorm import one_sample_batchnorm, recalibrate_bn
from .checkpoint import (
    RUN_FILES,
    STATE,
    checkpoint_epoch,
    load_checkpoint,
    save_checkpoint,
)
from .distributed import (
    DistInfo,
    ShardSampler,
    all_reduce_sum,
    broadcast_object,
    convert_sync_batchnorm,
    init_distributed,
    is_distributed,
)
from .finetune import FrozenBackbone, apply_checkpoint_metadata
from .optim import build_optimizer, build_scheduler
from .qat import FakeQuantizer, check_qat


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(name)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass
class Context:
    """Where and how the loop runs: device, precision, and the process's rank."""

    device: torch.device
    precision: str = "fp32"
    dist: DistInfo = DistInfo()
    channels_last: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (and to channels-last memory when enabled: 4-D tensors
        channels_last, 5-D ones channels_last_3d, whose depthwise 3-D conv backward is ~75x faster
        on CPU than the contiguous one)."""
        model = model.to(self.device)
        if not self.channels_last:
            return model
        for t in (*model.parameters(), *model.buffers()):
            if t.dim() in _CHANNELS_LAST:
                t.data = t.data.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        return model

    def batch(self, batch):
        """Move a batch to the device; 4-D / 5-D float tensors become channels-last when enabled."""
        batch = to_device(batch, self.device)
        if self.channels_last and isinstance(batch, dict):
            batch = {k: v.contiguous(memory_format=_CHANNELS_LAST[v.ndim])
                     if isinstance(v, torch.Tensor) and v.ndim in _CHANNELS_LAST and v.is_floating_point() else v
                     for k, v in batch.items()}
        return batch

    def autocast(self):
        """bf16 autocast on CPU or CUDA when precision is bf16, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def to_device(obj, device: torch.device):
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class SeededDataset(Dataset):
    """Each item is drawn under its own seed (seed, epoch, index): augmentation is reproducible
    whatever the number of workers or ranks, and across a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
            return self.dataset[index]


def _loader(task, dataset, batch_size: int, workers: int, sampler) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=task.collate, drop_last=isinstance(sampler, DistributedSampler),
                      persistent_workers=False)


def eval_loader(task, dataset: Dataset, recipe: Recipe, ctx: Context) -> DataLoader:
    """A loader that gives each rank a disjoint shard covering the dataset exactly once."""
    bs = recipe.data.eval_batch_size or recipe.data.batch_size
    return _loader(task, dataset, bs, recipe.data.workers,
                   ShardSampler(len(dataset), ctx.dist.rank, ctx.dist.world_size))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task, ctx: Context) -> dict:
    """Run the task's metric over the loader, summed over ranks."""
    model.eval()
    metric, skipped = task.metric(), 0
    for batch in loader:
        skipped += batch.pop("skipped", 0)
        if batch:
            with ctx.autocast():
                task.eval_step(model, ctx.batch(batch), metric)
    metric.reduce()
    out = metric.compute()
    out["skipped"] = int(all_reduce_sum(torch.tensor(float(skipped))).item())
    return out


def calibration_loader(task, recipe: Recipe, ctx: Context) -> DataLoader:
    """Training samples with eval transforms in a fixed shuffled order, equal batches per rank."""
    dataset = task.calibration_dataset()
    sampler = DistributedSampler(dataset, ctx.dist.world_size, ctx.dist.rank, shuffle=True,
                                 seed=12345, drop_last=True)
    world = ctx.dist.world_size
    bs = min(recipe.data.eval_batch_size or recipe.data.batch_size, len(dataset)) // world
    return _loader(task, dataset, max(1, bs), recipe.data.workers, sampler)


def _log(ctx: Context, msg: str) -> None:
    if ctx.dist.is_main:
        tqdm.write(msg)


def _prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, overwrite: bool) -> int | None:
    """Check what the run folder holds against the request; returns the epoch to resume from.

    A finished run is not resumed (it may be extended with more epochs); a folder holding a run is
    never trained into afresh unless `overwrite`, which first removes the old run's files."""
    if resume:
        epoch = checkpoint_epoch(run_dir)
        if epoch is not None and epoch >= recipe.train.epochs:
            raise UserError(f"{run_dir}: the run is complete ({epoch} of {recipe.train.epochs} epochs); "
                            f"to train it longer, resume with a larger --epochs")
        return epoch
    held = [n for n in (*RUN_FILES, "config.yaml") if (run_dir / n).exists()]
    if held and not overwrite:
        raise UserError(f"{run_dir}: already holds a run ({', '.join(held[:3])}); continue it with --resume "
                        f"or replace it with --overwrite")
    if held:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    return None


def _on_main(ctx: Context, fn):
    """`fn()` run on the main rank only, its result (or its UserError) given to every rank."""
    result = error = None
    if ctx.dist.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def _any_rank(flag: bool, ctx: Context) -> bool:
    """True when `flag` holds on any rank (on the device NCCL needs)."""
    if not is_distributed():
        return flag
    return all_reduce_sum(torch.tensor(float(flag), device=ctx.device)).item() > 0


def fit(recipe: Recipe, task, resume: bool = False, stop_after: int | None = None,
        overwrite: bool = False, progress: bool = True) -> dict:
    """Train per the recipe into `recipe.out`; with `resume`, continue from its last checkpoint
    (from the start if it has none yet); with `overwrite`, replace a run already in that folder.

    `stop_after` ends this invocation after that many epochs, leaving a resumable run; `progress`
    False prints the epoch lines without a per-step progress bar."""
    device = resolve_device(recipe.train.device)
    if recipe.train.qat:
        check_qat(recipe, task)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    ctx = Context(device, recipe.train.precision, init_distributed(device), recipe.train.channels_last)
    run_dir = Path(recipe.out)
    resume_from = _on_main(ctx, lambda: _prepare_run_dir(run_dir, recipe, resume, overwrite))
    if resume and resume_from is None:
        _log(ctx, f"{run_dir}: no checkpoint yet (killed in its first epoch): starting from epoch 1")
    resume = resume_from is not None
    world = ctx.dist.world_size
    if recipe.data.batch_size % world:
        raise UserError(f"data.batch_size {recipe.data.batch_size} is not divisible by the "
                        f"{world} processes (it is the global batch)")
    if ctx.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)

    bn_missing = False
    pretrained = recipe.model.checkpoint or recipe.model.backbone_checkpoint
    if pretrained and not resume:  # a resumed run's config.yaml already holds it
        notes, bn_missing = apply_checkpoint_metadata(recipe)
        for note in notes:
            _log(ctx, note)
    train_set, val_set = task.datasets()
    model = task.build_model()
    if recipe.model.checkpoint and not resume:
        reset = load_pretrained(model, recipe.model.checkpoint)
        if reset is not None:
            _log(ctx, str(reset))
    if recipe.model.backbone_checkpoint and not resume:
        _log(ctx, load_backbone(model, recipe.model.backbone_checkpoint))
    model = ctx.prepare(model)
    if world > 1:
        model = convert_sync_batchnorm(model, device)
    # Quantization-aware training: hooks that keep the state_dict as it is (see engine/qat.py).
    qat = FakeQuantizer(model, recipe.train.qat_freeze_bn) if recipe.train.qat else None
    freezer = FrozenBackbone(model, recipe.optim.freeze_backbone_epochs)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.train.ema_decay),
                         use_buffers=True) if recipe.train.ema_decay > 0 else None)
    ids = [device.index] if device.type == "cuda" else None
    train_model = DistributedDataParallel(model, device_ids=ids) if world > 1 else model

    seeded = SeededDataset(train_set, recipe.train.seed)
    sampler = DistributedSampler(seeded, world, ctx.dist.rank, shuffle=True,
                                 seed=recipe.train.seed, drop_last=True)
    train_loader = _loader(task, seeded, recipe.data.batch_size // world, recipe.data.workers, sampler)
    val_loader = eval_loader(task, val_set, recipe, ctx)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} training samples cannot fill one batch of "
                        f"{recipe.data.batch_size}; lower data.batch_size")
    total = steps_per_epoch * recipe.train.epochs
    optimizer = build_optimizer(model, recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.betas,
                                recipe.optim.name, recipe.optim.layer_decay)
    scheduler = build_scheduler(optimizer, total, round(recipe.optim.warmup_epochs * steps_per_epoch),
                                recipe.optim.min_lr_ratio)

    start_epoch, step, history = 0, 0, []
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, scheduler, ema)
        _log(ctx, f"resuming {run_dir} after epoch {state['epoch']} of {recipe.train.epochs}")
        start_epoch, step = state["epoch"], state["step"]
        # The checkpoint carries the records of its epochs: a run killed after a checkpoint but
        # before its metrics line got out loses no line.
        history = state["extra"].get("history") or _read_history(run_dir)[: start_epoch]
        if qat is not None:
            qat.load_state_dict(state["extra"].get("qat", {}))
    if ctx.dist.is_main:
        _write_history(run_dir, history)
        recipe.save(run_dir / "config.yaml")

    calib_loader = None
    if recipe.train.bn_recalibrate > 0:
        calib_loader = calibration_loader(task, recipe, ctx)
    if bn_missing and recipe.optim.freeze_backbone_epochs > 0:
        # A frozen backbone normalises with its running statistics, so they must exist before the head trains.
        recalibrate_bn(model, calib_loader, recipe.train.bn_recalibrate, task, ctx)
    eval_model = ema.module if ema is not None else model
    fake = " (fake-quantized INT8)" if qat is not None else ""
    metrics: dict = history[-1] if history else {}
    t_start = time.time()
    last_epoch = recipe.train.epochs if stop_after is None else min(recipe.train.epochs,
                                                                    start_epoch + stop_after)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        seeded.epoch = epoch
        torch.manual_seed(recipe.train.seed * 7919 + epoch * 104729 + ctx.dist.rank)
        if freezer.set_epoch(epoch) and world > 1:
            train_model = DistributedDataParallel(model, device_ids=ids)
        train_model.train()
        freezer.eval_batchnorms()
        if qat is not None:
            qat.set_epoch(epoch)
            qat.eval_batchnorms()
        t0, seen, loss_sum, skipped = time.time(), 0, 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{recipe.train.epochs}",
                   disable=not (progress and ctx.dist.is_main), leave=False, dynamic_ncols=True)
        for batch in bar:
            skipped += batch.pop("skipped", 0)
            # Every sample of a batch unreadable (on any rank): the step is skipped on all ranks
            # alike, so that DDP's gradient reduction stays in step.
            if _any_rank(not batch, ctx):
                continue
            batch = ctx.batch(batch)
            with ctx.autocast(), one_sample_batchnorm(train_model):
                loss = task.loss(train_model, batch)
            finite = torch.isfinite(loss.detach()).float()
            if all_reduce_sum(finite.clone()).item() < world:
                kept = (f"the last good checkpoint (epoch {epoch}) is kept in {run_dir}" if (run_dir / STATE).is_file()
                        else "no checkpoint was written yet")
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped; "
                                       f"{kept} (try a lower optim.lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            n = task.batch_size(batch)
            seen += n
            loss_sum += loss.item() * n
            bar.set_postfix(loss=f"{loss.item():.4f}", ips=f"{seen / (time.time() - t0):.1f}")
        stats = torch.tensor([loss_sum, float(seen), float(skipped)], dtype=torch.float64)
        all_reduce_sum(stats)
        record = {"epoch": epoch + 1, "step": step, "lr": max(scheduler.get_last_lr()),  # the head's
                  "train_loss": stats[0].item() / max(stats[1].item(), 1),
                  "train_skipped": int(stats[2].item()),
                  "samples_per_s": stats[1].item() / (time.time() - t0)}
        if (epoch + 1) % recipe.train.eval_every == 0 or epoch + 1 == recipe.train.epochs:
            if calib_loader is not None:
                recalibrate_bn(eval_model, calib_loader, recipe.train.bn_recalibrate, task, ctx,
                               keep=freezer.kept_batchnorms() + (qat.kept_batchnorms() if qat else []))
            metrics = evaluate(eval_model, val_loader, task, ctx)
            record.update({f"val_{k}": v for k, v in metrics.items() if not isinstance(v, list)})
            if qat is not None:
                record["val_fake_int8"] = True  # the val metrics are the fake-quantized model's
        history.append(record)
        if ctx.dist.is_main:
            save_checkpoint(run_dir, model, optimizer, scheduler, epoch + 1, step, ema,
                            {"history": history, **({"qat": qat.state_dict()} if qat else {})})
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            n_bad = record["train_skipped"]
            skipped_note = f", skipped {n_bad} bad samples" if n_bad else ""
            _log(ctx, f"epoch {epoch + 1}/{recipe.train.epochs}: loss {record['train_loss']:.4f}, "
                      f"{record['samples_per_s']:.1f} samples/s{skipped_note}"
                      + (f", val {task.summary(metrics)}{fake}" if "val_skipped" in record else ""))
    if is_distributed():
        torch.distributed.barrier()
    if ctx.dist.is_main and last_epoch == recipe.train.epochs:
        lines = task.report(run_dir, metrics, history)
        if qat is not None:
            lines += ["", "Trained with quantization-aware training (`train.qat`): the val metrics are those of the "
                          "fake-quantized INT8 model (`mobilezoo export RUN --tflite --int8` measures the file)."]
        from .report import write_report
        write_report(run_dir, recipe, history, lines)
        _log(ctx, f"done: {recipe.train.epochs} epochs ({time.time() - t_start:.0f} s this run), "
                  f"val {task.summary(metrics)}{fake}; run directory {run_dir}")
    return metrics


def _read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_history(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, run_dir / "metrics.jsonl")
