"""The MobileDets search space as data (the paper's IBN, fused IBN and Tucker ops): skeleton,
per-layer op choices, per-block widths.

An architecture of the space is a *choice vector*: one int per decision, in `space.decisions`
order. The decisions are, block by block, the block's output-width multiplier, then one op per
layer. The stem and the 7 blocks follow TuNAS' ProxylessNAS skeleton with detection endpoints;
layers 2-4 of blocks 2-6 are residual and may be skipped. `to_arch` turns a choice vector into
the layer list that `models.mobiledet` builds (the detection architecture JSON format), and
`from_arch` maps such a list back (round trip), naming the layer that does not fit the space.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..layers.ibn import scale_filters
from ..models.mobiledet import ACTIVATIONS, validate_arch  # validate_arch: re-exported from its new home


@dataclass(frozen=True)
class Block:
    """One block of the skeleton: first-layer stride, layer count, base output width."""

    stride: int
    layers: int
    base: int


# TuNAS' skeleton: stem + 7 blocks. The base widths are mobilezoo's (block 3: 40, the EdgeTPU value);
# docs/models/mobiledets.md says why.
SKELETON = (Block(2, 1, 32), Block(1, 1, 16), Block(2, 4, 24), Block(2, 4, 40), Block(2, 4, 96),
            Block(1, 4, 96), Block(2, 4, 160), Block(1, 1, 192))

# Every op of the IBN+Fused+Tucker space (the MobileDets paper), as the layer fields it sets.
OPS: dict[str, dict] = {
    **{f"ibn_k{k}_e{e}": {"type": "ibn", "kernel": k, "expansion": e} for k in (3, 5) for e in (4, 8)},
    **{f"fused_k{k}_e{e}": {"type": "fused", "kernel": k, "expansion": e} for k in (3, 5) for e in (4, 8)},
    **{f"tucker_{a}_{b}": {"type": "tucker", "kernel": 3, "ratios": [a, b]}
       for a in (0.25, 0.75) for b in (0.25, 0.75)},
    # Block 1 (stride 1, one layer) is a depthwise-separable conv in TuNAS and in MobileDet-CPU/DSP.
    **{f"ibn_noexp_k{k}": {"type": "ibn_noexp", "kernel": k} for k in (3, 5)},
    "skip": {},
}
FAMILY = {name: (spec.get("type") or "skip") for name, spec in OPS.items()}
# TuNAS' ProxylessNAS-Enlarged set is (0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 2.0); the default keeps its
# middle so that a CPU-sized supernet and a cost model fit from ~100 measurements stay practical.
DEFAULT_MULTIPLIERS = (0.5, 0.75, 1.0, 1.25)


@dataclass(frozen=True)
class Decision:
    """One categorical decision: its name, the layer position it belongs to (-1: width) and options."""

    name: str
    options: tuple
    position: int = -1


@dataclass(frozen=True)
class SearchSpace:
    """A restriction of the MobileDets space: op families, width multipliers, activation and SE."""

    name: str = "ibn_fused_tucker"
    families: tuple[str, ...] = ("ibn", "fused", "tucker")
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS
    act: str = "relu6"
    se: bool = False
    skeleton: tuple[Block, ...] = SKELETON
    decisions: tuple[Decision, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        bad = set(self.families) - {"ibn", "fused", "tucker"}
        if bad or "ibn" not in self.families:
            raise UserError(f"search space families must include ibn and be among ibn, fused, tucker; "
                            f"got {self.families}")
        if self.act not in ACTIVATIONS:
            raise UserError(f"search space act must be one of {tuple(ACTIVATIONS)}, got {self.act!r}")
        if not self.multipliers or any(m <= 0 for m in self.multipliers):
            raise UserError(f"search space multipliers must be positive, got {self.multipliers}")
        decisions = []
        for b, block in enumerate(self.skeleton):
            decisions.append(Decision(f"block{b}.width", tuple(self.multipliers)))
            if b == 0:
                continue  # the stem is a fixed 3x3 conv: only its width is searched
            for j in range(block.layers):
                pos = self.position(b, j)
                decisions.append(Decision(f"block{b}.layer{j}.op", self.layer_ops(b, j), pos))
        object.__setattr__(self, "decisions", tuple(decisions))

    def layer_ops(self, block: int, layer: int) -> tuple[str, ...]:
        """The op names allowed at one layer (skip only for layers 2-4 of a block)."""
        if block == 1:
            ops = ["ibn_noexp_k3", "ibn_noexp_k5"]
        else:
            ops = [n for n, f in FAMILY.items() if f in ("ibn", "fused") and f in self.families]
        if "tucker" in self.families:
            ops += [n for n, f in FAMILY.items() if f == "tucker"]
        if layer > 0:
            ops.append("skip")
        return tuple(ops)

    def position(self, block: int, layer: int) -> int:
        """Index of a layer among all layer positions (stem = 0, skipped layers counted)."""
        return sum(b.layers for b in self.skeleton[:block]) + layer

    @property
    def num_positions(self) -> int:
        """Number of layer positions, the stem included."""
        return sum(b.layers for b in self.skeleton)

    @property
    def sizes(self) -> list[int]:
        """Number of options of each decision."""
        return [len(d.options) for d in self.decisions]

    def width(self, block: int, multiplier: float) -> int:
        """Output channels of a block at a width multiplier (TF `_scale_filters` rounding)."""
        return scale_filters(self.skeleton[block].base, multiplier)

    def max_width(self, block: int) -> int:
        """The widest output of a block."""
        return max(self.width(block, m) for m in self.multipliers)

    def to_dict(self) -> dict:
        """JSON-serialisable description (what `space_from_dict` reads back)."""
        return {"name": self.name, "families": list(self.families), "multipliers": list(self.multipliers),
                "act": self.act, "se": self.se,
                "skeleton": [[b.stride, b.layers, b.base] for b in self.skeleton]}


SPACES = {
    "ibn": SearchSpace("ibn", ("ibn",)),
    "ibn_fused": SearchSpace("ibn_fused", ("ibn", "fused")),
    "ibn_fused_tucker": SearchSpace("ibn_fused_tucker", ("ibn", "fused", "tucker")),
    # MobileDet-CPU style: hard-swish and SE in every IBN/fused layer.
    "cpu_ibn_fused_tucker": SearchSpace("cpu_ibn_fused_tucker", ("ibn", "fused", "tucker"), act="hswish", se=True),
}


def get_space(space) -> SearchSpace:
    """A SearchSpace from itself, a preset name (also 'ibn+fused+tucker'), or a `to_dict` dict."""
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, dict):
        return space_from_dict(space)
    key = str(space).replace("+", "_")
    if key not in SPACES:
        raise UserError(f"unknown search space {space!r}; expected one of {', '.join(SPACES)}")
    return SPACES[key]


def space_from_dict(d: dict) -> SearchSpace:
    """Inverse of `SearchSpace.to_dict`."""
    try:
        skeleton = tuple(Block(*b) for b in d.get("skeleton", [[b.stride, b.layers, b.base] for b in SKELETON]))
        return SearchSpace(d["name"], tuple(d["families"]), tuple(d["multipliers"]), d.get("act", "relu6"),
                           bool(d.get("se", False)), skeleton)
    except (KeyError, TypeError) as e:
        raise UserError(f"search space description: missing or bad field {e}") from None


def sample(space: SearchSpace, rng: random.Random | None = None) -> list[int]:
    """A choice vector drawn uniformly per decision."""
    rng = rng or random.Random()
    return [rng.randrange(n) for n in space.sizes]


def validate_choices(space: SearchSpace, choices) -> list[int]:
    """The choice vector as a list of ints; UserError naming the decision that is out of range."""
    choices = list(choices)
    if len(choices) != len(space.decisions):
        raise UserError(f"choice vector has {len(choices)} entries, space {space.name} has "
                        f"{len(space.decisions)} decisions")
    for c, d in zip(choices, space.decisions):
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(d.options):
            raise UserError(f"decision {d.name}: choice {c!r} not in 0..{len(d.options) - 1}")
    return [int(c) for c in choices]


def layer_plan(space: SearchSpace, choices) -> list[dict]:
    """Per layer position: block, layer, op name, input and output width, stride, residual."""
    choices = validate_choices(space, choices)
    plan, c_in, k = [], 3, 0
    for b, block in enumerate(space.skeleton):
        out = space.width(b, space.decisions[k].options[choices[k]])
        k += 1
        for j in range(block.layers):
            if b == 0:
                op = "conv"
            else:
                op = space.decisions[k].options[choices[k]]
                k += 1
            plan.append({"block": b, "layer": j, "op": op, "in": c_in, "out": out,
                         "stride": block.stride if j == 0 else 1, "residual": j > 0 and b > 0})
            c_in = out
    return plan


def to_arch(space: SearchSpace, choices) -> list[dict]:
    """The detection architecture (list of layer dicts, skipped layers left out) of a choice vector."""
    arch = []
    for p in layer_plan(space, choices):
        if p["op"] == "skip":
            continue
        layer = {"type": "conv", "kernel": 3} if p["op"] == "conv" else dict(OPS[p["op"]])
        layer.update(stride=p["stride"], out=p["out"], residual=p["residual"], act=space.act,
                     se=space.se and layer["type"] in ("ibn", "ibn_noexp", "fused"))
        arch.append(layer)
    return arch


def canonical(space: SearchSpace, choices) -> list[int]:
    """The choice vector with each block's skips moved to its end (skipping layer 2 or layer 3 of a
    block leaves the same network) and the first multiplier of each width: the form `from_arch` returns."""
    choices = validate_choices(space, choices)
    out, k = [], 0
    for b, block in enumerate(space.skeleton):
        # Multipliers that round to the same width are the same network: keep the first.
        widths = [space.width(b, m) for m in space.multipliers]
        out.append(widths.index(widths[choices[k]]))
        k += 1
        if b == 0:
            continue
        ops = [space.decisions[k + j].options[choices[k + j]] for j in range(block.layers)]
        kept = [op for op in ops if op != "skip"]
        kept += ["skip"] * (len(ops) - len(kept))
        out += [space.decisions[k + j].options.index(op) for j, op in enumerate(kept)]
        k += block.layers
    return out


def _op_name(layer: dict) -> str:
    t = layer["type"]
    if t == "tucker":
        return f"tucker_{layer['ratios'][0]}_{layer['ratios'][1]}"
    if t == "ibn_noexp":
        return f"ibn_noexp_k{layer['kernel']}"
    return f"{t}_k{layer['kernel']}_e{layer['expansion']}"


def from_arch(space: SearchSpace, arch) -> list[int]:
    """The (canonical) choice vector of an architecture of the space; UserError naming the layer that
    does not fit."""
    arch = validate_arch(arch)
    choices, i = [], 0
    for b, block in enumerate(space.skeleton):
        widths: dict[int, int] = {}
        for n, m in enumerate(space.multipliers):
            widths.setdefault(space.width(b, m), n)
        if i >= len(arch):
            raise UserError(f"architecture ends before block {b} of space {space.name}")
        if arch[i]["out"] not in widths:
            raise UserError(f"architecture layer {i}: out {arch[i]['out']} is not a width of block {b} "
                            f"(expected one of {sorted(widths)})")
        width = arch[i]["out"]
        choices.append(widths[width])
        for j in range(block.layers):
            if b == 0:
                if arch[i]["type"] != "conv":
                    raise UserError("architecture layer 0: expected the stem conv")
                i += 1
                continue
            ops = space.layer_ops(b, j)
            # A residual layer of the same width continues the block; anything else is a skip.
            here = i < len(arch) and (j == 0 or (arch[i].get("residual") and arch[i]["out"] == width))
            if not here:
                if "skip" not in ops:
                    raise UserError(f"architecture layer {i}: expected layer {j} of block {b}")
                choices.append(ops.index("skip"))
                continue
            layer, name = arch[i], _op_name(arch[i]) if arch[i]["type"] != "conv" else "conv"
            if name not in ops:
                raise UserError(f"architecture layer {i}: op {name} is not allowed at block {b} layer {j} "
                                f"of space {space.name} (allowed: {', '.join(ops)})")
            stride = block.stride if j == 0 else 1
            if layer["stride"] != stride or layer["out"] != width:
                raise UserError(f"architecture layer {i}: expected stride {stride} and out {width} "
                                f"(block {b} layer {j}), got stride {layer['stride']}, out {layer['out']}")
            choices.append(ops.index(name))
            i += 1
    if i != len(arch):
        raise UserError(f"architecture has {len(arch) - i} layers beyond the skeleton of space {space.name}")
    return choices


def save_arch(arch: list[dict], path: str | Path, **meta) -> Path:
    """Write an architecture as the detection JSON format ({"layers": [...], **meta})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"layers": validate_arch(arch), **meta}, indent=1) + "\n")
    tmp.replace(path)
    return path
