"""The search loop (TuNAS'): alternate shared-weight updates and REINFORCE controller updates.

Each step samples a choice vector from the controller, trains the supernet's weights of that
sub-network for one SGD step on a training batch, then evaluates the *same* sub-network on a
batch of the reward set and updates the controller with
R = quality + tau * |predicted latency / target - 1|.

* Reward set: a fixed `reward_fraction` (10%, mobilezoo's default: see docs/models/mobiledets.md)
  of the training split, never trained on; the val split is left for the final evaluation.
* Proxy quality: minus the detection loss (focal + box) of the sub-network on the reward batch,
  BatchNorm in batch-statistics mode, the running statistics untouched. mAP on a few images is
  mostly zero early in a short search and far noisier; the loss is its smooth stand-in.
* Latency: the linear cost model (`latency.py`) fit beforehand on the target machine.
* As in TuNAS, the controller is not updated during the first `rl_warmup` fraction of the steps
  (it samples uniformly while the shared weights warm up).
* Checkpoints (engine's atomic writer): supernet weights, SGD + schedule state, step, torch and
  Python RNG, controller logits + Adam state + baseline, the sampling generator and the history.
  The batch of a step is a function of (seed, step), so a resumed search is the same search.
The final architecture, written as the detection JSON format, is the controller's most likely
architecture whose predicted latency is within `final_tolerance` of the target (among its argmax
and 2,000 samples; `final_tolerance=None`: the plain per-decision argmax, as TuNAS reports). The
default 5% leaves room for the cost model's own error (held-out MAE ~3%) inside the 10% that the
measured latency must meet.
* `samples_per_step` K > 1 (an option; 1 is TuNAS' loop): K architectures per step, all scored
  on the same reward batch, leave-one-out advantages (`Controller.update_group`).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from .. import data as embedded
from ..engine.checkpoint import STATE, load_checkpoint, save_checkpoint
from ..errors import UserError
from ..tasks.detection.coco import CocoAnnotations, CocoDetection
from ..tasks.detection.task import fixed_subset
from ..tasks.detection.transforms import collate_detection, eval_transform, train_transform
from .controller import Controller, abs_reward
from .latency import LatencyModel
from .space import canonical, get_space, save_arch, to_arch
from .supernet import SuperDetector

CONFIG_KEYS = ("space", "seed", "batch_size", "reward_batch_size", "img_size", "steps", "tau", "target_ms",
               "lr", "controller_lr", "rl_warmup", "limit_train", "reward_fraction", "samples_per_step")


def split_train(data: str, img_size: int, reward_fraction: float, limit_train: int | None, seed: int):
    """(training set, reward set, class names): a fixed split of the train split of a COCO folder."""
    root = embedded.resolve(data)
    ann_file = Path(root) / "annotations" / "instances_train.json"
    if not ann_file.is_file():
        raise UserError(f"{ann_file}: not found (search data needs ROOT/train/ and "
                        f"ROOT/annotations/instances_train.json)")
    anns = CocoAnnotations(ann_file)
    ids = fixed_subset(anns.image_ids, limit_train, seed)
    if len(ids) < 2:
        raise UserError(f"{ann_file}: need at least 2 training images for a search, got {len(ids)}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g).tolist()
    n_reward = min(len(ids) - 1, max(1, round(len(ids) * reward_fraction)))
    reward_ids = sorted(ids[i] for i in order[:n_reward])
    train_ids = sorted(ids[i] for i in order[n_reward:])
    image_dir = Path(root) / "train"
    return (CocoDetection(image_dir, anns, train_transform(img_size), image_ids=train_ids),
            CocoDetection(image_dir, anns, eval_transform(img_size), image_ids=reward_ids), anns.class_names)


def batch_at(dataset, step: int, batch_size: int, seed: int) -> dict:
    """The batch of a step: consecutive slices of a per-epoch permutation seeded by (seed, epoch), each
    sample augmented under its own seed (seed, step, slot), so the batch is the same whichever process
    builds it and whenever (a resumed search is the same search, with or without loader workers)."""
    n, items, perms = len(dataset), [], {}
    for slot, k in enumerate(range(step * batch_size, (step + 1) * batch_size)):
        epoch, i = divmod(k, n)
        if epoch not in perms:  # a batch spans at most two epochs: one permutation each
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        perm = perms[epoch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1000003 + step) * 1009 + slot)
            items.append(dataset[int(perm[i])])
    return collate_detection(items)


class StepBatches(torch.utils.data.Dataset):
    """`batch_at` as a dataset indexed by step, for a DataLoader that builds batches ahead in workers."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> dict:
        return batch_at(self.dataset, step, self.batch_size, self.seed)


def step_batches(dataset, steps: range, batch_size: int, seed: int, workers: int):
    """The batches of `steps` in order; built ahead by `workers` processes when > 0."""
    if workers <= 0:
        return (batch_at(dataset, s, batch_size, seed) for s in steps)
    return iter(torch.utils.data.DataLoader(StepBatches(dataset, batch_size, seed), batch_size=None, sampler=steps,
                                            num_workers=workers, prefetch_factor=4))


def _plot_probs(history: list[dict], decisions, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    snaps = [h for h in history if "probs" in h]
    if not snaps:
        return
    cols = 6
    rows = math.ceil(len(decisions) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False, sharex=True)
    steps = [h["step"] for h in snaps]
    for d, (dec, ax) in enumerate(zip(decisions, axes.flat)):
        for o, name in enumerate(dec.options):
            ax.plot(steps, [h["probs"][d][o] for h in snaps], lw=1, label=str(name))
        ax.set_title(dec.name, fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
        if len(dec.options) <= 6:
            ax.legend(fontsize=5, loc="upper left")
    for ax in list(axes.flat)[len(decisions):]:
        ax.axis("off")
    fig.suptitle("controller choice probabilities over search steps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_quality(history: list[dict], target_ms: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sc = ax.scatter([h["latency_ms"] for h in history], [h["quality"] for h in history],
                    c=[h["step"] for h in history], s=10, cmap="viridis")
    ax.axvline(target_ms, color="k", ls="--", lw=1, label=f"target {target_ms:g} ms")
    ax.set(xlabel="predicted latency (ms)", ylabel="proxy quality (-detection loss, reward batch)",
           title="sampled architectures")
    fig.colorbar(sc, label="step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_search(data: str = "shapes", target_ms: float = 50.0, steps: int = 1000, out_dir: str | Path = "search",
               resume: bool = False, space="ibn_fused_tucker", latency_model: str | Path | LatencyModel | None = None,
               tau: float = -0.5, batch_size: int = 8, reward_batch_size: int | None = None, img_size: int = 320,
               lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 4e-5, controller_lr: float = 5e-3,
               rl_warmup: float = 0.25, reward_fraction: float = 0.1, limit_train: int | None = None,
               seed: int = 0, ckpt_every: int = 50, prob_every: int | None = None, device: str = "cpu",
               threads: int | None = None, progress: bool = True, stop_after: int | None = None,
               workers: int = 0, final_tolerance: float | None = 0.05, samples_per_step: int = 1) -> Path:
    """Run (or resume) a search; returns the path of the final architecture JSON (out_dir/arch.json).

    `workers` > 0 builds the training and reward batches ahead in that many loader processes each.

    `samples_per_step` K > 1: K architectures per step, the first trained, all K scored on the same
    reward batch, the controller updated with leave-one-out advantages (`Controller.update_group`).

    `stop_after` ends the run at that step with a checkpoint, as an interruption would."""
    from tqdm import tqdm
    space = get_space(space)
    if latency_model is None:
        raise UserError("a search needs a latency model: fit one first (`fit_latency_model` / "
                        "`mobilezoo search latency-model`) and pass its JSON file")
    lat_model = latency_model if isinstance(latency_model, LatencyModel) else LatencyModel.load(latency_model)
    if lat_model.space.to_dict() != space.to_dict():
        raise UserError(f"latency model was fit for search space {lat_model.space.name} "
                        f"({lat_model.space.to_dict()}), the search uses {space.to_dict()}")
    if steps < 1 or batch_size < 1 or samples_per_step < 1:
        raise UserError(f"steps, batch_size and samples_per_step must be >= 1, got {steps}, {batch_size} "
                        f"and {samples_per_step}")
    abs_reward(0.0, target_ms, target_ms, tau)  # validates tau and target early
    if threads:
        torch.set_num_threads(threads)
    reward_batch_size = reward_batch_size or batch_size
    config = {k: v for k, v in dict(space=space.to_dict(), seed=seed, batch_size=batch_size,
                                    reward_batch_size=reward_batch_size, img_size=img_size, steps=steps, tau=tau,
                                    target_ms=target_ms, lr=lr, controller_lr=controller_lr, rl_warmup=rl_warmup,
                                    limit_train=limit_train, reward_fraction=reward_fraction,
                                    samples_per_step=samples_per_step).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (out_dir / STATE).exists():
        raise UserError(f"{out_dir}: holds a search checkpoint; pass resume=True (--resume) or another folder")

    random.seed(seed)
    torch.manual_seed(seed)
    train_set, reward_set, class_names = split_train(data, img_size, reward_fraction, limit_train, seed)
    dev = torch.device(device)
    net = SuperDetector(space, num_classes=len(class_names)).to(dev)
    controller = Controller(space.sizes, lr=controller_lr)
    decay = [p for n, p in net.named_parameters() if p.dim() > 1]  # conv weights only, as TF's l2 regularizer
    rest = [p for n, p in net.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    start = 0
    if resume and (out_dir / STATE).exists():
        state = load_checkpoint(out_dir, net, opt, sched)
        extra = state["extra"]
        diff = [k for k in CONFIG_KEYS if extra["config"].get(k) != config.get(k)]
        if diff:
            raise UserError(f"{out_dir}: cannot resume, the checkpoint's {', '.join(diff)} differ from this run's")
        controller.load_full_state(extra["controller"])
        gen.set_state(extra["generator"])
        history, start = extra["history"], state["step"]

    def checkpoint(step: int) -> None:
        save_checkpoint(out_dir, net, opt, sched, 0, step,
                        extra={"config": config, "controller": controller.full_state(),
                               "generator": gen.get_state(), "history": history})

    prob_every = prob_every or max(1, steps // 200)
    warm_steps = int(rl_warmup * steps)
    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(range(start, end), desc="search", disable=not progress, initial=start, total=end)
    train_batches = step_batches(train_set, range(start, end), batch_size, seed, workers)
    reward_batches = step_batches(reward_set, range(start, end), reward_batch_size, seed + 1, workers)
    for step in bar:
        group = [controller.sample(gen) for _ in range(samples_per_step)]
        choices = group[0]
        net.train()
        net.update_stats = True
        batch = next(train_batches)
        losses = net(batch["image"].to(dev), [{k: v.to(dev) for k, v in t.items()} for t in batch["target"]],
                     choices)
        loss = sum(losses.values())
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"search diverged at step {step} (loss {loss_value}); lower lr (now {lr})")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            net.update_stats = False
            rb = next(reward_batches)
            images, targets = rb["image"].to(dev), [{k: v.to(dev) for k, v in t.items()} for t in rb["target"]]
            quality = [-float(sum(net(images, targets, c).values())) for c in group]
        latency = [lat_model.predict(c) for c in group]
        reward = [abs_reward(q, ms, target_ms, tau) for q, ms in zip(quality, latency)]
        if step < warm_steps:
            advantage = [0.0] * samples_per_step
        elif samples_per_step == 1:
            advantage = [controller.update(choices, reward[0])]
        else:
            advantage = controller.update_group(group, reward)
        for i in range(samples_per_step):
            rec = {"step": step + 1, "train_loss": loss_value, "quality": quality[i], "latency_ms": latency[i],
                   "reward": reward[i], "advantage": advantage[i]}
            history.append(rec)
        if (step + 1) % prob_every == 0 or step == 0 or step + 1 == steps:
            rec["probs"] = controller.probs()
        bar.set_postfix(loss=f"{loss_value:.3f}", q=f"{quality[0]:.3f}", ms=f"{latency[0]:.1f}")
        if (step + 1) % ckpt_every == 0 and step + 1 < end:
            checkpoint(step + 1)
    checkpoint(end)
    final, met = (controller.most_likely_within(lat_model.predict, target_ms, final_tolerance, seed=seed)
                  if final_tolerance is not None else (controller.argmax(), True))
    if not met:
        print(f"search: no sampled architecture within {final_tolerance:.0%} of {target_ms} ms; "
              f"writing the argmax ({lat_model.predict(final):.1f} ms predicted)")
    arch_path = save_arch(to_arch(space, final), out_dir / "arch.json",
                          # the canonical vector: the one `from_arch` reads back from the written layers
                          search={"space": space.to_dict(), "choices": canonical(space, final), "step": end,
                                  "steps": steps,
                                  "target_ms": target_ms, "tau": tau, "final_tolerance": final_tolerance,
                                  "predicted_ms": lat_model.predict(final)})
    with open(out_dir / "search_log.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    _plot_probs(history, space.decisions, out_dir / "choice_probs.png")
    _plot_quality(history, target_ms, out_dir / "quality_vs_latency.png")
    return arch_path
