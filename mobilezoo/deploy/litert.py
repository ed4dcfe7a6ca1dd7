"""LiteRT (TFLite) export of the 2-D model families, full-integer INT8, and a runner for the files.

`export_tflite` converts the graph the ONNX export traces (`Task.export_graph` on the BN-folded
network; detectors: the raw heads, with the anchors beside the file and decoding and NMS left to the
detector's own fp32 postprocess) with `litert_torch.convert`, at batch 1 and fixed sides, as phones,
EdgeTPUs and DSPs take it, then checks it against PyTorch on real samples (`Task.check_parity`, as
`check_onnx` does). The file keeps our NCHW input: the converter puts the transposes to its NHWC
kernels inside the graph, so the runner feeds (1, C, H, W) / (1, C, T, H, W) as PyTorch does. The
task metadata (the ONNX file's `metadata_props`) is a JSON file beside it, `model.tflite.json`.

`quantize_tflite_int8` quantizes that fp32 file with ai-edge-quantizer's static recipe (int8
activations, asymmetric per tensor, calibrated by the min/max over the task's data; int8 weights,
symmetric per output channel): int8 input and output tensors, and every op the quantizer supports in
int8 (for our models all of them, but a softmax over a single token), as EdgeTPU and DSP delegates
need. `LiteRTModel` quantizes the input and dequantizes the outputs with the file's own scales, so it
stands in for the torch model in `evaluate()` and `predict()` like `OrtModel`.

3-D models are refused: their depthwise Conv3D has no LiteRT builtin kernel (the converter can only
emit it as a TensorFlow Select op, which LiteRT runtimes on phones and accelerators lack).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .ort import META_ARRAYS, META_QUANTIZATION, META_TASK, OnnxModelError, OrtModel, array_path

META_OUTPUTS = "mobilezoo.outputs"  # JSON list: the graph's outputs in the order the task reads them
SIGNATURE = "serving_default"
INT8_SUFFIX = ".int8.tflite"


class LiteRTError(UserError, ValueError):
    """LiteRT missing, or a model, option or file it cannot take."""


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise LiteRTError(f"{module} is not installed: pip install 'mobilezoo[litert]'") from None


def metadata_path(path: str | Path) -> Path:
    """The task metadata beside a LiteRT file: `model.tflite` -> `model.tflite.json`."""
    return Path(path).with_name(Path(path).name + ".json")


def int8_path(path: str | Path) -> Path:
    """Where `export --tflite --int8` writes the INT8 file of `model.tflite`: `model.int8.tflite`."""
    return Path(path).with_name(Path(path).stem + INT8_SUFFIX)


def refusal(task) -> str | None:
    """Why a task's models cannot be LiteRT files (None: they can)."""
    from .export import task_class
    cls = task_class(task)
    if cls.inputs.spatial == 3:
        return (f"a {cls.name} model cannot be exported to LiteRT: its depthwise 3-D convolutions have no LiteRT "
                "builtin kernel (they would need TensorFlow Select ops); use the ONNX export")
    return None


class _Named(nn.Module):
    """The graph with a named input and a dict of named outputs, which become the file's signature names."""

    def __init__(self, module: nn.Module, output_names: list[str]):
        super().__init__()
        self.module, self.output_names = module, output_names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.module(*inputs.values())
        return dict(zip(self.output_names, out if isinstance(out, (tuple, list)) else (out,)))


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress line per conversion stage unless told not to (an env variable)."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return "; ".join(lines[:3]) if lines else type(e).__name__


def export_tflite(model: nn.Module, example_inputs, path: str | Path, task, mode: str | None = None, *,
                  check: bool = True, atol: float = 1e-4, rtol: float = 1e-6, threads: int | None = None) -> dict:
    """Write `model` as an fp32 LiteRT file (BN folded, batch 1, NCHW input) with its metadata and arrays
    beside it, then check it against PyTorch on all of `example_inputs` (real samples of the task's data);
    ParityError on a mismatch. Returns a summary like `export_onnx`'s."""
    from ..layers.conv import reference_padding
    from .export import ExportError, _as_tensor, prepare_for_export, task_class
    cls, path = task_class(task), Path(path)
    why = refusal(cls)
    if why:
        raise LiteRTError(why)
    if cls.int8_mode and mode not in (None, cls.int8_mode):
        # NMS and top-k select a data-dependent number of boxes, which torch.export cannot trace.
        raise LiteRTError(f"LiteRT takes the {cls.name} graph {cls.int8_mode!r} only (decoding and NMS run in "
                          f"fp32 outside it); got {mode!r}")
    mode = mode or cls.int8_mode
    litert_torch = _require("litert_torch")
    x = _as_tensor(example_inputs)
    net = prepare_for_export(model)
    try:
        graph = cls.export_graph(net, x, mode)
    except ValueError as e:
        raise ExportError(str(e)) from None
    named = _Named(graph.module, graph.output_names).eval()
    with torch.no_grad(), reference_padding(), _quiet():
        # Fills the lazily built caches (relative-position indices), so they are constants, not traced ops.
        named(**{graph.input_name: x[:1]})
        try:
            edge = litert_torch.convert(named, sample_kwargs={graph.input_name: x[:1]})
            path.parent.mkdir(parents=True, exist_ok=True)
            edge.export(str(path))
        except (RuntimeError, ValueError, NotImplementedError) as e:
            raise LiteRTError(f"{path}: litert-torch cannot convert the {cls.name} model ({_one_line(e)})") from None
    meta = {META_TASK: cls.name, **graph.metadata, META_OUTPUTS: json.dumps(graph.output_names)}
    if graph.arrays:
        meta[META_ARRAYS] = json.dumps(sorted(graph.arrays))
    metadata_path(path).write_text(json.dumps(meta, indent=1) + "\n")
    arrays = {}
    for key, array in graph.arrays.items():
        np.save(array_path(path, key), array)
        arrays[key] = {"path": str(array_path(path, key)), "shape": list(array.shape)}
    info = {"path": str(path), "task": cls.name, "input_name": graph.input_name, "input_shape": [1, *x.shape[1:]],
            "layout": "NCHW", "output_names": graph.output_names, "mode": mode, "arrays": arrays,
            "size_bytes": path.stat().st_size, "parity": None}
    if check:
        info["parity"] = check_tflite(model, path, x, cls, atol=atol, rtol=rtol, threads=threads)
    return info


def check_tflite(model: nn.Module, path: str | Path, inputs, task, *, atol: float = 1e-4, rtol: float = 1e-6,
                 threads: int | None = None) -> dict:
    """The LiteRT file against the torch model on `inputs`, as the task judges it (`Task.check_parity`)."""
    from .export import check_exported
    return check_exported(model, LiteRTModel(path, threads=threads), inputs, task, atol=atol, rtol=rtol)


def _samples(batches: Iterable) -> list[np.ndarray]:
    """Calibration inputs one sample at a time (the file takes batch 1), as float32 NCHW arrays."""
    out = []
    for b in batches:
        b = b.detach().to("cpu", torch.float32).numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
        out += [np.ascontiguousarray(s[None]) for s in b]
    return out


CALIBRATION_RANGES = ("minmax", "average")  # how per-sample activation ranges combine into a tensor's range


def quantize_tflite_int8(fp32_path: str | Path, out_path: str | Path, calibration_batches: Iterable,
                         threads: int | None = None, ranges: str = "minmax") -> Path:
    """Full-integer INT8 of an fp32 LiteRT export by ai-edge-quantizer's static recipe (int8 weights per
    channel, int8 activations per tensor calibrated on `calibration_batches`: tensors of the model input,
    the task's own data), with int8 input and output; metadata and arrays copied beside it.

    `ranges`: "minmax" (default) takes each activation's smallest minimum and largest maximum over the
    samples, as TensorFlow Lite's own converter calibrates; "average" is ai-edge-quantizer's default, a
    moving average of each sample's min and max, which clips sparse outputs (a detector's class logits
    are positive on few samples: their averaged maximum is negative and every score saturates at 0.5)."""
    if ranges not in CALIBRATION_RANGES:
        raise LiteRTError(f"calibration ranges {ranges!r}: expected one of {', '.join(CALIBRATION_RANGES)}")
    src, out = Path(fp32_path), Path(out_path)
    if not src.is_file():
        raise LiteRTError(f"{src}: no fp32 LiteRT file to quantize")
    aeq = _require("ai_edge_quantizer.quantizer")
    recipes = _require("ai_edge_quantizer.recipe")
    meta_file = metadata_path(src)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    samples = _samples(calibration_batches)
    if not samples:
        raise LiteRTError("no calibration samples: INT8 calibration needs samples of the task's data")
    probe = LiteRTModel(src, threads=1)
    recipe = recipes.static_wi8_ai8()
    q = aeq.Quantizer(str(src), recipe)
    with warnings.catch_warnings():
        # The calibrator keeps every intermediate tensor to read its range, and LiteRT warns about that.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        calibration = _calibrate(src, recipe, [{probe.input_name: s} for s in samples], ranges,
                                 int(threads or os.cpu_count() or 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.unlink()  # the quantizer refuses to overwrite
        q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False).export_model(str(out))
    settings = {"tool": "ai-edge-quantizer", "recipe": "static_wi8_ai8",
                "activations": f"int8 per tensor ({ranges} of the samples' min/max)",
                "weights": "int8 symmetric per channel", "calibration_samples": len(samples), "source": src.name}
    metadata_path(out).write_text(json.dumps({**meta, META_QUANTIZATION: json.dumps(settings)}, indent=1) + "\n")
    for key in json.loads(meta.get(META_ARRAYS, "[]")):
        array_path(out, key).write_bytes(array_path(src, key).read_bytes())
    return out


def _calibrate(src: Path, recipe, feeds: list[dict], ranges: str, threads: int) -> dict:
    """Each activation's (min, max) over `feeds`, combined as `ranges` says, by ai-edge-quantizer's
    calibrator (the one `Quantizer.calibrate` runs, which fixes the moving average)."""
    calibrator = _require("ai_edge_quantizer.calibrator")
    manager = _require("ai_edge_quantizer.recipe_manager").RecipeManager()
    manager.load_quantization_recipe(recipe)
    qsv = _require("ai_edge_quantizer.utils.qsv_utils")
    update = qsv.min_max_update if ranges == "minmax" else qsv.moving_average_update
    calib = calibrator.Calibrator(str(src), num_threads=threads, qsv_update_func=update)
    calib.calibrate({SIGNATURE: feeds}, manager)
    return calib.get_model_qsvs()


class _Session:
    """A LiteRT signature runner behind ONNX Runtime's `session.run(None, feed)`: float32 in and out,
    (de)quantized with the file's scales where its input or outputs are int8."""

    def __init__(self, interpreter, output_names: list[str]):
        self.interpreter = interpreter
        self.runner = interpreter.get_signature_runner(SIGNATURE)
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        self.output_names = output_names

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        feed = {k: _quantize(v, self.inputs[k]) for k, v in feed.items()}
        results = self.runner(**feed)
        return [_dequantize(results[k], self.outputs[k]) for k in self.output_names]


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.dtype(detail["dtype"]).kind not in "iu" or not scale:
        return x
    return ((x.astype(np.float32) - zero) * scale).astype(np.float32)


class LiteRTModel(OrtModel):
    """A LiteRT file (fp32 or INT8) in LiteRT's interpreter (XNNPACK on the CPU, `threads` threads), usable
    where the torch model is used in eval/predict: NCHW float32 input, float32 outputs, batches in ones."""

    def __init__(self, path: str | Path, threads: int | None = None):
        interpreter_lib = _require("ai_edge_litert.interpreter")
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: LiteRT file not found")
        try:
            interpreter = interpreter_lib.Interpreter(model_path=str(self.path),
                                                      num_threads=int(threads or os.cpu_count() or 1))
            signatures = interpreter.get_signature_list()
        except (RuntimeError, ValueError) as e:
            raise OnnxModelError(f"{self.path}: cannot load the LiteRT model ({_one_line(e)})") from None
        if SIGNATURE not in signatures:
            raise OnnxModelError(f"{self.path}: no {SIGNATURE!r} signature (found {', '.join(signatures) or 'none'})")
        meta_file = metadata_path(self.path)
        self.metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.task = self.metadata.get(META_TASK)
        names = signatures[SIGNATURE]
        self.output_names = json.loads(self.metadata.get(META_OUTPUTS, "null")) or list(names["outputs"])
        if len(names["inputs"]) != 1 or set(self.output_names) != set(names["outputs"]):
            raise OnnxModelError(f"{self.path}: expected one input and the outputs {self.output_names}, found "
                                 f"{names['inputs']} -> {names['outputs']}")
        self.session = _Session(interpreter, self.output_names)
        self.input_name = names["inputs"][0]
        self.input_shape = [int(d) for d in self.session.inputs[self.input_name]["shape"]]
        self.input_dtype = np.dtype(self.session.inputs[self.input_name]["dtype"]).name
        self.arrays = self.load_arrays()

    def train(self, mode: bool = True) -> LiteRTModel:
        """No-op for mode=False; a LiteRT model cannot be trained."""
        if mode:
            raise OnnxModelError(f"{self.path}: a LiteRT model cannot be trained")
        return self

    def io_types(self) -> str:
        """The file's input and output tensor types, e.g. "int8 input, int8 outputs"."""
        outs = sorted({np.dtype(d["dtype"]).name for d in self.session.outputs.values()})
        return f"{self.input_dtype} input, {'/'.join(outs)} output{'s' if len(self.output_names) > 1 else ''}"

    def __repr__(self) -> str:
        return f"LiteRTModel({str(self.path)!r}, task={self.task!r}, inputs={self.input_shape} {self.input_dtype})"
