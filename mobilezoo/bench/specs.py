"""Model specs of every benchmark: ours by name (as deployed, `eager:` as trained, `compile:`
compiled), a MobileDet architecture file, and peers built by their own libraries (`timm:NAME[@SIZE]`,
`tv:NAME`, `monai:SegResNet`).

What a model takes and what is timed is its task's to say (`Task.inputs`, `Task.network`,
`Task.bench_model_kwargs`); a peer names its task in the one table of peer builders, `PEERS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models import create_model, get_entry

OURS = ("mobilezoo", "eager", "compile")  # fused as deployed, unfused as trained, compiled
SOURCES = (*OURS, "timm", "tv", "monai")
ARCH_MODEL = "ssdlite_mobiledet"  # what an architecture file (e.g. from `mobilezoo search`) builds
_SPEC_RE = re.compile(r"(?:(?P<src>\w+):)?(?P<name>[\w.\-]+?)(?:@(?P<h>\d+)(?:x(?P<w>\d+))?)?")


class SpecError(UserError, ValueError):
    """A model spec that a benchmark cannot build; the message names it."""


def _whole(model: nn.Module) -> nn.Module:
    return model


def _timm(name: str) -> nn.Module:
    import timm
    return timm.create_model(name, pretrained=False)  # random init: nothing is downloaded


def _tv_ssdlite(name: str) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)


def _tv_ssdlite_heads(model: nn.Module) -> Callable:
    """Backbone + extra layers + heads: the raw outputs, as our detectors' `head_outputs`."""
    return lambda x: model.head(list(model.backbone(x).values()))


def _tv_ssdlite_end_to_end(model: nn.Module) -> Callable:
    """A uint8 image through torchvision's own transform (resize + normalise), network and postprocess."""
    return lambda image: model([image.float() / 255])


def _tv_video(name: str) -> nn.Module:
    import torchvision.models.video as tvv
    return getattr(tvv, name)(weights=None)


def _segresnet(name: str) -> nn.Module:
    from monai.networks.nets import SegResNet
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16,  # MONAI's BraTS tutorial
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


@dataclass(frozen=True)
class Peer:
    """A peer from another library: its task, how to build it, what is timed, its native sample shape,
    the published top-1 of its released weights, and how it runs end to end on a uint8 image."""

    task: str
    build: Callable[[str], nn.Module]
    network: Callable[[nn.Module], Callable] = _whole
    shape: tuple[int, ...] | None = None
    top1: float | None = None  # Kinetics-400 top-1 of the released weights (video)
    end_to_end: Callable[[nn.Module], Callable] | None = None
    bf16_autocast: bool = False  # bf16 under autocast rather than on a bf16 copy of the weights


PEERS: dict[str, Peer] = {
    "tv:ssdlite320_mobilenet_v3_large": Peer("detect", _tv_ssdlite, _tv_ssdlite_heads,
                                             end_to_end=_tv_ssdlite_end_to_end),
    "tv:r2plus1d_18": Peer("video", _tv_video, shape=(3, 16, 112, 112), top1=57.5),
    "tv:s3d": Peer("video", _tv_video, shape=(3, 16, 224, 224), top1=68.4),
    "tv:mvit_v2_s": Peer("video", _tv_video, shape=(3, 16, 224, 224), top1=80.8),
    "monai:SegResNet": Peer("segment3d", _segresnet, bf16_autocast=True),  # as the volumes of our 3-D task
}
TIMM = Peer("classify", _timm)  # any timm:NAME[@SIZE]


@dataclass(frozen=True)
class Spec:
    """A parsed model spec: the text as given, the model's name, its source (see `SOURCES`), its task,
    a forced input size (@HxW) and the architecture file it is built from, if any."""

    text: str
    name: str
    source: str
    task: str
    size: tuple[int, int] | None = None
    arch: str | None = None

    @property
    def ours(self) -> bool:
        """One of our models (in any of its forms), not a peer."""
        return self.source in OURS

    @property
    def peer(self) -> Peer | None:
        """The peer's entry of `PEERS` (timm: `TIMM`); None for ours."""
        if self.ours:
            return None
        return TIMM if self.source == "timm" else PEERS[f"{self.source}:{self.name}"]

    @property
    def task_class(self):
        """The Task class of this model's family."""
        from ..tasks import TASKS
        return TASKS[self.task]

    @property
    def bf16_autocast(self) -> bool:
        """bf16 runs under autocast instead of on a bf16 copy of the weights (3-D volumes: autocast keeps
        the reversible sequences in fp32)."""
        peer = self.peer
        return peer.bf16_autocast if peer else self.task_class.bf16_autocast

    @property
    def input_format(self) -> torch.memory_format:
        """The memory format of the deployed inputs."""
        return self.task_class.inputs.memory_format

    @property
    def weight_format(self) -> torch.memory_format:
        """The memory format of deployed weights: the inputs' one, and channels-last for the 2-D
        convolutions of a model whose inputs stay contiguous (video clips)."""
        fmt = self.input_format
        return torch.channels_last if fmt == torch.contiguous_format else fmt

    def sample_shape(self, quick: bool = False) -> tuple[int, ...]:
        """One sample's shape: a peer's native one, the forced @SIZE, else its task's (quick: small)."""
        peer = self.peer
        if peer and peer.shape and not quick:
            return peer.shape
        shape = self.task_class.inputs.sample_shape(quick)
        return (*shape[:-2], *self.size) if self.size and not quick else shape

    def build(self, shape: Sequence[int] | None = None) -> nn.Module:
        """The model in eval mode, random weights, built for timing on samples of `shape`."""
        peer = self.peer
        if peer:
            return peer.build(self.name).eval()
        kwargs = self.task_class.bench_model_kwargs(tuple(shape or self.sample_shape()))
        if self.arch:
            kwargs["arch"] = self.arch
        return create_model(self.name, **kwargs).eval()

    def network(self, model: nn.Module) -> Callable:
        """What is timed of `model` (detectors: up to the raw box and class outputs)."""
        peer = self.peer
        return peer.network(model) if peer else self.task_class.network(model)


def _forms(sources: Sequence[str]) -> str:
    forms = {"mobilezoo": "NAME", "eager": "eager:NAME", "compile": "compile:NAME", "timm": "timm:NAME[@SIZE]",
             "tv": "tv:NAME", "monai": "monai:SegResNet"}
    return ", ".join(forms[s] for s in sources)


def parse_spec(text: str, sources: Sequence[str] = SOURCES) -> Spec:
    """Parse "tiny_moat_0", "eager:moat_0", "timm:mobilevit_xs@256" (or @HxW), "tv:s3d", an architecture
    .json file, ...; SpecError (or the registry's unknown-model error) if it names nothing buildable
    from `sources`."""
    text = text.strip()
    if text.endswith(".json") and "mobilezoo" in sources:
        from ..models.mobiledet import validate_arch
        validate_arch(text)
        return Spec(text, ARCH_MODEL, "mobilezoo", get_entry(ARCH_MODEL).task, arch=text)
    m = _SPEC_RE.fullmatch(text)
    source = m and (m["src"] or "mobilezoo")
    if m is None or source not in sources:
        raise SpecError(f"bad model spec {text!r}: expected {_forms(sources)}, optionally with @SIZE")
    name = m["name"]
    size = (int(m["h"]), int(m["w"] or m["h"])) if m["h"] else None
    if source == "timm":
        import timm
        if not timm.is_model(name):
            raise SpecError(f"unknown peer {text!r}: timm has no model {name!r}")
        return Spec(text, name, source, TIMM.task, size)
    if source in OURS:
        return Spec(text, name, source, get_entry(name).task, size)
    key = f"{source}:{name}"
    if key not in PEERS or size:
        known = (["timm:NAME[@SIZE]"] if "timm" in sources else []) + [k for k in PEERS if k.split(":")[0] in sources]
        raise SpecError(f"unknown peer {text!r}; expected one of {', '.join(known)}")
    return Spec(text, name, source, PEERS[key].task)


def parse_specs(texts: Sequence[str], sources: Sequence[str] = SOURCES, task: str | None = None) -> list[Spec]:
    """Parse every spec; with `task`, each must be a model of that task (SpecError naming it if not)."""
    specs = [parse_spec(t, sources) for t in texts]
    for s in specs:
        if task is not None and s.task != task:
            raise SpecError(f"{s.text}: not a {task} model but a {s.task} one (see `mobilezoo list --task {task}`)")
    return specs
