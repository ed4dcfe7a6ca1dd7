"""Fine-tuning from pretrained weights: the file's metadata into the recipe, and a frozen backbone."""
from __future__ import annotations

import inspect
import json

from torch import nn

from ..errors import UserError
from ..models.registry import get_entry, list_models
from ..models.weights import (
    META_BN_STATS,
    META_MEAN,
    META_MODEL,
    META_MODEL_ARGS,
    META_SOURCE,
    META_STD,
    CheckpointError,
    head_keys,
    read_metadata,
)
from ..recipes import Recipe

BN_RECALIBRATE = 50  # batches (classify_imagefolder's value) when a file lacks BN statistics and the recipe sets none


def _json(meta: dict, key: str, path: str, kind: type):
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = None
    numbers = kind is not list or (value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value))
    if not isinstance(value, kind) or not numbers:
        what = "list of numbers" if kind is list else kind.__name__
        raise CheckpointError(f"{path}: metadata {key} is not a JSON {what} ({meta[key]!r})")
    return value


def apply_checkpoint_metadata(recipe: Recipe) -> tuple[list[str], bool]:
    """Fill in what the metadata of `model.checkpoint` (or `model.backbone_checkpoint`) says and the
    recipe leaves open: data.mean and data.std, model.source, the model's arguments (merged, the
    recipe's values win; a backbone file's go into `model.args.backbone_args`, its model name into
    `model.args.backbone`) and, for a file without BatchNorm statistics, train.bn_recalibrate.
    Returns (lines for the user, statistics missing)."""
    model, data = recipe.model, recipe.data
    if model.checkpoint and model.backbone_checkpoint:
        raise UserError("model.checkpoint and model.backbone_checkpoint are both set: give the whole model's "
                        "weights or its backbone's, not both")
    path = model.checkpoint or model.backbone_checkpoint
    meta = read_metadata(path) if path else {}
    if META_MEAN in meta and data.mean is None:
        data.mean = _json(meta, META_MEAN, path, list)
    if META_STD in meta and data.std is None:
        data.std = _json(meta, META_STD, path, list)
    if META_SOURCE in meta and model.source is None:
        model.source = meta[META_SOURCE]
    args = _json(meta, META_MODEL_ARGS, path, dict) if META_MODEL_ARGS in meta else {}
    if model.checkpoint:
        model.args = {**args, **model.args}
    elif path:
        if "backbone" not in inspect.signature(get_entry(model.name).factory).parameters:
            with_one = [n for n in list_models() if "backbone" in inspect.signature(get_entry(n).factory).parameters]
            raise UserError(f"model.backbone_checkpoint: {model.name} has no backbone to load it into "
                            f"(models with one: {', '.join(with_one)})")
        # A detector's or segmenter's file: only its backbone part loads; its model and options are not the backbone's.
        if META_MODEL in meta and not _whole_model(meta[META_MODEL]):
            named = model.args.get("backbone")
            if named not in (None, meta[META_MODEL]):
                raise UserError(f"model.backbone_checkpoint: {path} holds a {meta[META_MODEL]}, but "
                                f"model.args.backbone is {named}")
            model.args["backbone"] = meta[META_MODEL]
            model.args["backbone_args"] = {**args, **model.args.get("backbone_args", {})}
    missing = meta.get(META_BN_STATS) == "missing"
    lines = []
    if missing:
        recipe.train.bn_recalibrate = recipe.train.bn_recalibrate or BN_RECALIBRATE
        lines.append(f"{path}: the file has no BatchNorm statistics; they will be recomputed on "
                     f"{recipe.train.bn_recalibrate} training batches (train.bn_recalibrate)")
    return lines, missing


def _whole_model(name: str | None) -> bool:
    """True for a registered model of a task other than classification (a detector, a segmenter)."""
    return name in list_models() and get_entry(name).task not in ("classify", "backbone")


class FrozenBackbone:
    """`optim.freeze_backbone_epochs`: for the first epochs only the model's head (`head_keys`)
    trains; everything else is frozen, its BatchNorms in eval mode so that their statistics stay
    the pretrained ones the head learns on."""

    def __init__(self, model: nn.Module, epochs: int):
        head = set(head_keys(model))
        if epochs and not head:
            raise UserError(f"optim.freeze_backbone_epochs: {type(model).__name__} names no head to train alone")
        self.epochs, self.frozen = epochs, False
        self.params = [p for n, p in model.named_parameters() if n not in head]
        self.batchnorms = {n: m for n, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.running_mean" not in head}

    def set_epoch(self, epoch: int) -> bool:
        """Freeze or unfreeze for 0-based `epoch`; True if what trains changed (DDP is then rebuilt,
        as it registers the trainable parameters once)."""
        frozen = epoch < self.epochs
        if frozen == self.frozen:
            return False
        for p in self.params:
            p.requires_grad_(not frozen)
        self.frozen = frozen
        return True

    def kept_batchnorms(self) -> list[str]:
        """Names of the BatchNorms whose statistics must not move now (the frozen ones)."""
        return list(self.batchnorms) if self.frozen else []

    def eval_batchnorms(self) -> None:
        """While frozen, put the backbone's BatchNorms in eval mode (after `model.train()`)."""
        for bn in self.batchnorms.values() if self.frozen else ():
            bn.eval()
