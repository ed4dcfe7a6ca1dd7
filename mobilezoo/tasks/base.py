"""What a task gives the engine: datasets, a model, a loss, a metric, and its own report."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from ..engine.metrics import SumMetric
from ..errors import BadSampleError, DataError, ParityError
from ..recipes import Recipe, coerce_like

T = TypeVar("T")
OnBadSample = Callable[[BadSampleError], None] | None
# "decode_png, /build/dir/torchvision/csrc/io/image/cpu/decode_png.cpp:79, " before a decoder's complaint
_SOURCE_LOCATION = re.compile(r"^.*?[^\s,]+\.(?:cpp|cc|cxx|c|h|hpp)(?::\d+)?,?\s*")


def short_reason(e: BaseException) -> str:
    """A library error as a short phrase: its first sentence, without the library's source location."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    text = _SOURCE_LOCATION.sub("", lines[0] if lines else "").strip()
    text = text.split(". ")[0].rstrip(". ")
    if not text:
        return type(e).__name__
    return text[0].lower() + text[1:] if text[1:2].islower() else text


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 of a decoded image; 16-bit images (PNG) are scaled 0..65535 -> 0..255, as
    `ToDtype(scale=True)` would, so that every task (and drawing) sees the same 8-bit pixels."""
    if image.dtype == torch.uint16:
        return (image.to(torch.float32) / 257).round().to(torch.uint8)
    return image


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 RGB tensor (3, H, W) of an image file (8- or 16-bit); BadSampleError naming the file otherwise."""
    from torchvision.io import ImageReadMode, decode_image
    if not Path(path).is_file():
        raise BadSampleError(f"{path}: image file not found")
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        raise BadSampleError(f"{path}: cannot read image ({short_reason(e)})") from None
    return to_uint8(image)


def readable(items: Iterable[T], load: Callable[[T], object],
             on_bad_sample: OnBadSample = None) -> Iterator[tuple]:
    """(item, load(item)) for each item. An item whose load raises BadSampleError is handed to
    `on_bad_sample` and skipped; without a handler the error propagates (the first bad input stops all)."""
    for item in items:
        try:
            loaded = load(item)
        except BadSampleError as e:
            if on_bad_sample is None:
                raise
            on_bad_sample(e)
            continue
        yield item, loaded


def expand_files(paths: list[str], extensions, kind: str) -> list[Path]:
    """Files named directly, or found (recursively, sorted) under named folders by their extension."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in extensions)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(f"no {kind} files ({', '.join(extensions)}) in {', '.join(map(str, paths))}")
    return files


def expand_images(paths: list[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under named folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return expand_files(paths, IMG_EXTENSIONS, "image")


def task_options(given: dict, defaults: dict, where: str = "data.augment") -> dict:
    """A task's options: `given` over `defaults`, each typed after its default (numbers in any
    spelling); a name it does not know or a value of another type is an error naming it."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DataError(f"{where}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(defaults)}")
    return {**defaults, **{k: coerce_like(v, defaults[k], f"{where}.{k}") for k, v in given.items()}}


def collate_skipping(samples: list) -> dict:
    """default_collate over the samples that loaded; `None` marks a skipped one and is counted."""
    good = [s for s in samples if s is not None]
    batch = default_collate(good) if good else {}
    batch["skipped"] = len(samples) - len(good)
    return batch


@dataclass(frozen=True)
class InputSpec:
    """What a task's networks take, for export, benchmarks and latency: one sample's shape (no
    batch) at the benchmark size and at a quick size, the throughput batches, and the memory
    layout of inputs and weights when deployed."""

    name: str  # the input's name in an exported graph
    shape: tuple[int, ...]
    batch: int
    quick_shape: tuple[int, ...]
    quick_batch: int
    memory_format: torch.memory_format = torch.channels_last
    spatial: int = 2  # trailing spatial sides of `shape` (a video's frames are not one)

    def sample_shape(self, quick: bool = False) -> tuple[int, ...]:
        """One sample's shape at the benchmark (or quick) size."""
        return self.quick_shape if quick else self.shape

    def batch_size(self, quick: bool = False) -> int:
        """The throughput batch at the benchmark (or quick) size."""
        return self.quick_batch if quick else self.batch


def output_shapes(out) -> dict:
    """{name: shape} of a model's output: a tensor, a sequence of them or a dict."""
    if isinstance(out, torch.Tensor):
        return {"output": list(out.shape)}
    if isinstance(out, (list, tuple)):
        return {f"output{i}": list(o.shape) for i, o in enumerate(out)}
    return {k: list(v.shape) for k, v in out.items()}


class Predictions(list):
    """What a task's `predict` returns: one JSON-ready record per prediction (a plain list), the
    number of inputs predicted (`count`), the lines for the user (`lines`) and warnings (`notes`)."""

    def __init__(self, records=(), count: int | None = None, lines=(), notes=()):
        super().__init__(records)
        self.count = len(self) if count is None else count
        self.lines, self.notes = list(lines), list(notes)


@dataclass
class ExportGraph:
    """What an export traces and writes for a task: the module, input and output names, metadata
    stored in the file, arrays written beside it (`<name>.<key>.npy`), and whether the graph takes
    one sample at a time."""

    module: nn.Module
    input_name: str
    output_names: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    one_sample: bool = False


class Task:
    """Base class; one subclass per task, registered in `tasks.TASKS` under `name`.

    Besides training and evaluation, a task says everything family-specific that deployment
    needs, at class level so that benchmarks can ask by model name without a recipe: `inputs`,
    `network` (what is timed and exported) and `bench_model_kwargs` (a model built for timing)."""

    name = "base"
    input_key = "image"  # the batch field the model reads (export, calibration, latency)
    headline = ""  # the metric key that summarizes a run (e.g. to compare fp32 and INT8)
    inputs = InputSpec("image", (3, 224, 224), 32, (3, 96, 96), 4)
    # Per-channel input (mean, std) for pixels in [0, 1]; `data.mean` / `data.std` (filled in from
    # pretrained weights' metadata) override it.
    default_normalisation: tuple[tuple[float, ...], tuple[float, ...]] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def normalisation(self) -> tuple[list, list]:
        """(mean, std) of the inputs: the recipe's (e.g. from pretrained weights' metadata), else the task's."""
        d, (mean, std) = self.recipe.data, self.default_normalisation
        mean, std = list(d.mean or mean), list(d.std or std)
        if len(mean) != 3 or len(std) != 3:
            raise DataError(f"data.mean / data.std: expected 3 values each (RGB), got {mean} / {std}")
        return mean, std

    @staticmethod
    def network(model: nn.Module):
        """The callable that is timed and exported: the whole model, unless a task says otherwise."""
        return model

    @classmethod
    def bench_model_kwargs(cls, shape: tuple[int, ...]) -> dict:
        """Constructor options of a model built for timing at one sample's `shape` (no data at hand)."""
        return {}

    # --- prediction ----------------------------------------------------------------------------

    predict_options: tuple[str, ...] = ()  # the task's own options of `predict`
    predicts_into_folder = False  # `predict` writes files into a folder (else one JSON file, or stdout)

    def predict(self, model: nn.Module, inputs: list[str], out: str | Path | None = None, *, device="cpu",
                on_bad_sample: OnBadSample = None, **options) -> Predictions:
        """Predict on input files or folders; write into `out` (a folder for tasks that
        `predicts_into_folder`, else a JSON file; None: the lines carry the JSON). An unreadable
        input goes to `on_bad_sample` and is left out, or without it raises BadSampleError."""
        raise NotImplementedError

    # --- deployment: what an exported graph of this task holds --------------------------------

    export_modes: tuple[str, ...] = ()  # alternative graphs a task can export (e.g. with or without NMS)
    int8_mode: str | None = None  # the graph INT8 quantization needs, if not the default one
    fully_convolutional = False  # may be exported with dynamic spatial sides
    bf16_autocast = False  # bf16 inference under autocast rather than with bf16 weights

    @classmethod
    def export_graph(cls, net: nn.Module, x: torch.Tensor, mode: str | None = None) -> ExportGraph:
        """The graph to trace from an export-ready network on example inputs `x`."""
        if mode is not None and mode not in cls.export_modes:
            raise ValueError(f"task {cls.name!r} exports one graph; got mode {mode!r}")
        return ExportGraph(net, cls.inputs.name, ["logits"])

    @classmethod
    def onnx_result(cls, run, x: torch.Tensor, onnx):
        """What the torch model returns, from an exported graph: `run(batch)` gives the graph's
        outputs as tensors; `onnx` has the file's `metadata`, `arrays` and `path`."""
        outs = run(x)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @classmethod
    def check_parity(cls, model: nn.Module, onnx, x: torch.Tensor, atol: float, rtol: float) -> dict:
        """The exported graph against the torch model on `x`: every output within
        atol + rtol * max |output| (rtol matters only for outputs in the hundreds); ParityError if not."""
        from ..engine.parity import max_abs_diff
        diff, scale = max_abs_diff(model(x), onnx.run(x.cpu()))
        tol = atol + rtol * scale
        if not diff <= tol:  # also catches NaN
            raise ParityError(f"{onnx.path}: ONNX output differs from the torch model by up to {diff:.3g} "
                              f"(tolerance {tol:.3g}, outputs up to {scale:.3g}) on {x.shape[0]} inputs")
        return {"task": cls.name, "samples": int(x.shape[0]), "max_abs_diff": diff, "max_abs_output": scale,
                "tolerance": tol}

    @classmethod
    def openvino_int8_options(cls) -> dict:
        """NNCF settings for this task's models (`model_type`, `ignored_types`); none by default."""
        return {}

    @classmethod
    def quantize_refusal(cls, metadata: dict) -> str | None:
        """Why a graph of this task cannot be INT8-quantized (None: it can)."""
        return None

    @classmethod
    def output_info(cls, name: str, model: nn.Module, x: torch.Tensor, out, kwargs: dict) -> dict:
        """What `mobilezoo info` reports of a model's outputs on `x` (meta tensors): their shapes."""
        return {"output_shapes": output_shapes(out)}

    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape at the recipe's size (what the run's model takes)."""
        s = self.recipe.data.img_size
        return (self.inputs.shape[0], *([s] * (len(self.inputs.shape) - 1)))

    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets; also fills `recipe.data.class_names`."""
        raise NotImplementedError

    def val_dataset(self) -> Dataset:
        """The val split with evaluation transforms (used by `mobilezoo eval`)."""
        raise NotImplementedError

    def calibration_dataset(self) -> Dataset:
        """Training samples with evaluation transforms (BN recalibration, INT8 calibration)."""
        raise NotImplementedError

    def example_inputs(self, count: int) -> torch.Tensor:
        """`count` real training samples with evaluation transforms, batched: what export checks
        and INT8 calibration run on. They are spread evenly over the set: folder datasets are sorted
        by class, and ranges calibrated on the first class alone cost a classifier 20-30 points."""
        ds = self.calibration_dataset()
        n = min(count, len(ds))
        picks = sorted({round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)})
        samples = [s for s in (ds[i] for i in picks) if s is not None]
        return torch.stack([s[self.input_key] for s in samples]).float()

    def build_model(self) -> nn.Module:
        """The model the recipe names, sized for this task's data."""
        raise NotImplementedError

    collate = staticmethod(collate_skipping)

    def batch_size(self, batch: dict) -> int:
        """How many samples a batch holds (for throughput)."""
        return len(batch["label"])

    def forward(self, model: nn.Module, batch: dict):
        """The model's raw output on a batch (used for BN recalibration and export checks)."""
        return model(batch["image"])

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Training loss of one batch (model in train mode)."""
        raise NotImplementedError

    def metric(self) -> SumMetric:
        """A fresh metric accumulator for one evaluation."""
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch: dict, metric: SumMetric) -> None:
        """Run the model on a batch (eval mode, no grad) and add to the metric."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """A short human line for the headline metric."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def report(self, run_dir: Path, metrics: dict, history: list[dict]) -> list[str]:
        """Write task-specific figures; return markdown lines for report.md."""
        return []
