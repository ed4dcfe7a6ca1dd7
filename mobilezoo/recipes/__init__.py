"""Recipes: a task + model + data + schedule, as dataclasses loaded from YAML with every field defaulted."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

RECIPE_DIR = Path(__file__).parent


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-5` or `3E4`, with no dot, as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text as Python values, numbers with an exponent read as floats."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelCfg:
    """Which model to build and with which constructor overrides."""

    name: str = "tiny_moat_0"
    args: dict = field(default_factory=dict)
    checkpoint: str | None = None  # weights to start from (safetensors or weights-only .pt)
    # A classifier's weights for the backbone of a detector or segmenter (e.g. a converted ImageNet MOAT);
    # its final norm and head are left out, everything else starts fresh.
    backbone_checkpoint: str | None = None
    source: str | None = None  # the official file `checkpoint` was converted from (filled in from its metadata)


@dataclass
class DataCfg:
    """Where the data is and how it is loaded; `name` is an embedded dataset or a folder."""

    name: str = "digits"
    img_size: int = 224
    batch_size: int = 64
    eval_batch_size: int | None = None
    workers: int = 0
    skip_bad_samples: bool = False
    limit_train: int | None = None  # use only the first N training samples (debugging, tests)
    limit_val: int | None = None
    augment: dict = field(default_factory=dict)  # task-specific augmentation options
    class_names: list | None = None  # filled in from the data at training time
    # Input normalisation per channel, for pixels in [0, 1] (None: the task's default); filled in at
    # training time from model.checkpoint's metadata when the recipe leaves it open.
    mean: list | None = None
    std: list | None = None


@dataclass
class OptimCfg:
    """AdamW (or SGD) with linear warm-up and cosine decay, per step."""

    name: str = "adamw"  # adamw | sgd (Nesterov, momentum = betas[0])
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    layer_decay: float | None = None  # timm's layer-wise lr decay: the head at lr, each layer below x this
    freeze_backbone_epochs: int = 0  # train only the model's head for this many epochs (fine-tuning)


@dataclass
class TrainCfg:
    """The loop: length, precision, device, seed, EMA, BN recalibration, evaluation cadence."""

    epochs: int = 10
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    ema_decay: float = 0.0  # 0 disables the exponential moving average of weights
    bn_recalibrate: int = 0  # recompute BN statistics on this many train batches before eval
    eval_every: int = 1
    threads: int | None = None
    channels_last: bool = True  # NHWC memory: ~1.5x faster convolutions on CPU
    # Quantization-aware training (`train --qat`, engine/qat.py): train through fake INT8 weights and
    # activations as `export --tflite --int8` computes them; for fine-tuning a trained run.
    qat: bool = False
    qat_freeze_bn: int | None = 1  # with qat: BatchNorm statistics stop moving after this many epochs (null: never)


@dataclass
class Recipe:
    """A full training setup; `out` is the run directory."""

    task: str = "classify"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    out: str = "runs/default"

    def to_dict(self) -> dict:
        """Plain nested dict (YAML-ready)."""
        d = asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def save(self, path: str | Path) -> None:
        """Write the fully resolved recipe as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls, values: dict, where: str, section: str = "", source: str = ""):
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                          f"expected some of {', '.join(known)}")
    kwargs = {}
    for k, v in values.items():
        default = getattr(cls(), k) if k in known else None
        if isinstance(v, dict) and not isinstance(default, dict) and not is_dataclass(default):
            raise RecipeError(f"{where}.{k}: is a value, not a section (got {v!r})")
        kwargs[k] = (_build(type(default), v, f"{where}.{k}", f"{section}{k}.", source or where)
                     if is_dataclass(default) else _coerce(v, known[k].type, f"{section}{k}", source or where))
    return cls(**kwargs)


def _number(v, kind: type):
    """`v` as an int or float, from a number or from any way a person writes one ('1e-5', '3E-4',
    '1_000', '.5'): YAML 1.1 reads '1e-5' (no dot) as a string. None if it is not one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip()) if kind is float else _int_text(v.strip())
        except ValueError:
            return None
    if kind is float and isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if kind is int and isinstance(v, float) and v.is_integer():
        return int(v)  # 1e3 or 1000.0 for an integer field
    return v if isinstance(v, kind) else None


def _int_text(text: str) -> int | float:
    try:
        return int(text, 0)
    except ValueError:
        return float(text)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(value, annotation: str, name: str, where: str | None = None):
    """A scalar field's value as its declared type (optionally None): numbers from any spelling,
    a number given for a text field as its text. A value of the wrong type is a RecipeError
    naming the field."""
    kinds = [t.strip() for t in str(annotation).split("|")]
    kind = next((_SCALARS[t] for t in kinds if t in _SCALARS), None)
    if kind is None or (value is None and "None" in kinds):
        return value
    if kind is str:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        converted = str(value) if ok else value
    elif kind is bool:
        converted = value
    else:
        converted = _number(value, kind)
    if not isinstance(converted, kind) or (kind is not bool and isinstance(converted, bool)):
        expected = {int: "an integer", float: "a number", str: "text", bool: "true or false"}[kind]
        raise RecipeError(f"{name} must be {expected}{' or null' if 'None' in kinds else ''}, got {value!r}"
                          + (f" (in {where})" if where else ""))
    return converted


def coerce_like(value, default, name: str):
    """`value` typed after `default` (a task's default option): numbers from any spelling, a list
    of numbers element by element (or null), bools and text as they are; a value of another type
    is a RecipeError naming `name`. A default of None takes any value."""
    if default is None or value is None and isinstance(default, (list, tuple, dict)):  # a list or map: off
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{name} must be a list like {list(default)!r}, got {value!r}")
        if default and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            return [_coerce(v, "float", f"{name}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise RecipeError(f"{name} must be a mapping, got {value!r}")
        return value
    return _coerce(value, type(default).__name__, name)


def recipe_path(name_or_path: str) -> Path:
    """A packaged recipe by name (`classify_digits`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"{p}: recipe file not found")
        return p
    packaged = RECIPE_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = ", ".join(list_recipes())
        raise RecipeError(f"unknown recipe {name_or_path!r}; packaged recipes: {names}")
    return packaged


def list_recipes() -> list[str]:
    """Names of the packaged recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Load a recipe (defaults if None) and apply `key.sub=value` overrides (values parsed as YAML)."""
    values: dict = {}
    where = "recipe"
    if name_or_path:
        path = recipe_path(name_or_path)
        where = str(path)
        try:
            values = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for key, value in _pairs(overrides):
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {part} is not a section")
        node[leaf] = value
    recipe = _build(Recipe, values, where)
    _validate(recipe)
    return recipe


def _pairs(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
        key, raw = item.split("=", 1)
        try:
            pairs.append((key.strip(), parse_yaml(raw)))
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: value is not valid YAML") from None
    return pairs


def _validate(r: Recipe) -> None:
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    checks = [
        ("optim.name", r.optim.name, r.optim.name in ("adamw", "sgd"), "adamw or sgd"),
        ("train.precision", r.train.precision, r.train.precision in ("fp32", "bf16"), "fp32 or bf16"),
        ("train.device", r.train.device,
         r.train.device in ("auto", "cpu", "cuda") or str(r.train.device).startswith("cuda:"),
         "auto, cpu or cuda"),
        ("train.epochs", r.train.epochs, positive_int(r.train.epochs), "a positive integer"),
        ("data.batch_size", r.data.batch_size, positive_int(r.data.batch_size), "a positive integer"),
        ("data.img_size", r.data.img_size, positive_int(r.data.img_size) and r.data.img_size >= 8,
         "an integer >= 8"),
        ("optim.lr", r.optim.lr, isinstance(r.optim.lr, (int, float)) and r.optim.lr > 0,
         "a positive number"),
        ("train.ema_decay", r.train.ema_decay,
         isinstance(r.train.ema_decay, (int, float)) and 0.0 <= r.train.ema_decay < 1.0, "in [0, 1)"),
        ("optim.layer_decay", r.optim.layer_decay, r.optim.layer_decay is None or 0 < r.optim.layer_decay <= 1,
         "in (0, 1] or null"),
        ("optim.freeze_backbone_epochs", r.optim.freeze_backbone_epochs, r.optim.freeze_backbone_epochs >= 0,
         "a non-negative integer"),
        ("train.qat_freeze_bn", r.train.qat_freeze_bn, r.train.qat_freeze_bn is None or r.train.qat_freeze_bn >= 0,
         "a non-negative integer or null"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise RecipeError(f"{name} must be {expected}, got {value!r}")
    r.optim.betas = tuple(r.optim.betas)
    for name in ("mean", "std"):
        value = getattr(r.data, name)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not value:
            raise RecipeError(f"data.{name} must be a list of numbers, one per channel, or null; got {value!r}")
        value = [_coerce(v, "float", f"data.{name}[{i}]") for i, v in enumerate(value)]
        if name == "std" and not all(v > 0 for v in value):
            raise RecipeError(f"data.std must be positive, got {value!r}")
        setattr(r.data, name, value)


__all__ = ["Recipe", "ModelCfg", "DataCfg", "OptimCfg", "TrainCfg", "load_recipe", "list_recipes", "coerce_like",
           "recipe_path", "dataclasses"]
