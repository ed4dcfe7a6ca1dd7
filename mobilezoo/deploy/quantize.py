"""INT8 static quantization of an exported fp32 ONNX file (onnxruntime.quantization, QDQ format).

`quantize_int8` runs ORT's `quant_pre_process` (shape inference and graph optimisation, which
also folds any BatchNorm left in the graph), calibrates activation ranges on batches of the
task's own data, and writes a QDQ model: int8 weights (per output channel by default), uint8
activations, as ORT recommends for x86 CPUs. The file keeps the fp32 file's metadata, so
`OrtModel` runs it the same way.

A task may refuse a graph (`Task.quantize_refusal`): detectors are quantized from their raw-heads
export (the task's `int8_mode`), so that the score threshold, box decoding and NMS stay fp32
outside the graph (`OrtModel` decodes with the detector's own postprocess and the anchors, copied
beside the INT8 file): NMS and top-k are data-dependent selections that gain nothing from int8 and
would put quantisation error on the boxes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import UserError
from .ort import META_ARRAYS, META_QUANTIZATION, META_TASK, array_path

METHODS = ("minmax", "percentile", "entropy")
# The ops that carry the compute: int8 kernels for these are the speed-up; quantizing the element-wise
# ops around them (Add, Mul, Sigmoid, ...) adds rounding error and Q/DQ pairs for little gain.
OP_TYPES = ("Conv", "MatMul", "Gemm")


class QuantizationError(UserError, ValueError):
    """An ONNX file, option or calibration set that INT8 quantization cannot take."""


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(v, dtype=np.float32)


class _OneInput:
    """A CalibrationDataReader that hands out one input dict."""

    def __init__(self, item: dict):
        self.item = item

    def get_next(self) -> dict | None:
        item, self.item = self.item, None
        return item


class BatchReader:
    """A CalibrationDataReader over batches (arrays, tensors or {input name: array} dicts).

    A graph with a fixed batch size gets each batch in chunks of that size."""

    def __init__(self, batches: Iterable, input_name: str, fixed_batch: int | None = None):
        self.batches, self.input_name, self.fixed = iter(batches), input_name, fixed_batch
        self.pending: list[dict] = []
        self.count = 0  # samples handed out

    def ready(self) -> bool:
        """Whether another input is left (reads the next batch if need be)."""
        while not self.pending:
            batch = next(self.batches, None)
            if batch is None:
                return False
            feed = {k: _to_numpy(v) for k, v in batch.items()} if isinstance(batch, dict) \
                else {self.input_name: _to_numpy(batch)}
            n = len(feed[self.input_name]) if self.input_name in feed else 1
            step = self.fixed or n
            if n % step:
                raise QuantizationError(f"calibration batch of {n} does not split into the graph's fixed "
                                        f"batch size {step}")
            self.pending = [{k: v[i:i + step] for k, v in feed.items()} for i in range(0, n, step)]
        return True

    def get_next(self) -> dict | None:
        """The next input dict, or None when the batches are exhausted."""
        if not self.ready():
            return None
        item = self.pending.pop(0)
        self.count += len(next(iter(item.values())))
        return item

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def split_for_calibration(samples: torch.Tensor, max_batch: int = 8,
                          max_elements: float = 2e6) -> list[torch.Tensor]:
    """Split calibration samples into batches of at most `max_batch` and about `max_elements` input
    values: the calibrator holds every intermediate tensor of a batch, so a batch of 3-D volumes must
    be small."""
    step = max(1, min(max_batch, int(max_elements // max(samples[0].numel(), 1))))
    return [samples[i:i + step] for i in range(0, len(samples), step)]


def quantize_int8(fp32_onnx_path: str | Path, out_path: str | Path, calibration_batches: Iterable,
                  per_channel: bool = True, method: str = "minmax", *, op_types: Sequence[str] | None = OP_TYPES,
                  exclude_nodes: Sequence[str] = (), percentile: float = 99.999, num_bins: int | None = None,
                  reduce_range: bool = False) -> Path:
    """Static INT8 (QDQ) quantization of an fp32 export, calibrated on `calibration_batches`
    (np.ndarray / torch.Tensor batches of the model input, or {input name: array} dicts).

    method: "minmax" (observed ranges), "percentile" (the `percentile` of |x|, clipping outliers)
    or "entropy" (TensorRT's KL-divergence thresholds; its search is a Python loop per tensor, so it
    takes minutes on MOAT-sized graphs). Both histogram methods use `num_bins` bins (default 2048
    for percentile, 512 for entropy). Only
    `op_types` are quantized (None: every type ORT can quantize); `exclude_nodes` (node names)
    stay fp32. `reduce_range` quantizes weights to 7 bits, for x86 CPUs without VNNI. Returns
    `out_path`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    src, out = Path(fp32_onnx_path).absolute(), Path(out_path).absolute()
    if method not in METHODS:
        raise QuantizationError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if not src.is_file():
        raise QuantizationError(f"{src}: ONNX file not found")
    model = onnx.load(str(src), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(META_TASK):
        from ..tasks import TASKS
        refusal = TASKS[meta[META_TASK]].quantize_refusal(meta)
        if refusal:
            raise QuantizationError(f"{src}: {refusal}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise QuantizationError(f"{src}: already quantized; start from the fp32 export")
    inp = model.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
    fixed = dim0.dim_value if dim0 is not None and dim0.HasField("dim_value") else None
    reader = BatchReader(calibration_batches, inp.name, fixed)
    if not reader.ready():
        raise QuantizationError("no calibration batches: INT8 calibration needs samples of the task's data")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mobilezoo_int8_") as tmp:
        pre, cache = Path(tmp) / "preprocessed.onnx", Path(tmp) / "ranges.json"
        # ORT's symbolic shape inference saves its partial model into the working directory when it
        # gives up (e.g. on dynamic volume sides): run it inside the temporary directory instead.
        with _working_dir(tmp):
            try:
                quant_pre_process(str(src), str(pre))
            except Exception:  # noqa: BLE001 - fall back to ONNX's own shape inference
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        calibrate = _calibrate(pre, reader, method, op_types, percentile, num_bins, Path(tmp), cache)
        quantize_static(str(pre), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                        calibrate_method=calibrate, calibration_cache_path=str(cache))
    qmodel = onnx.load(str(out))
    settings = {"method": method, "per_channel": per_channel, "op_types": list(op_types) if op_types else None,
                "excluded_nodes": list(exclude_nodes), "reduce_range": reduce_range,
                "calibration_samples": reader.count, "source": src.name}
    if method == "percentile":
        settings["percentile"] = percentile
    onnx.helper.set_model_props(qmodel, {**meta, META_QUANTIZATION: json.dumps(settings)})
    onnx.save(qmodel, str(out))
    for key in json.loads(meta.get(META_ARRAYS, "[]")):
        shutil.copyfile(array_path(src, key), array_path(out, key))
    return out


@contextlib.contextmanager
def _working_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _calibrate(model: Path, reader: BatchReader, method: str, op_types, percentile: float, num_bins: int | None,
               tmp: Path, cache: Path):
    """Activation ranges written to `cache` for quantize_static; returns ORT's CalibrationMethod.

    Calibrating here rather than inside quantize_static because it cannot pass the histogram size
    on: its entropy calibrator keeps 128 bins, where the KL search has a single candidate (the
    full range), so "entropy" would silently be min-max."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    options = {"minmax": {},
               "percentile": {"percentile": percentile, "num_bins": num_bins or 2048},
               "entropy": {"num_bins": num_bins or 512, "num_quantized_bins": 128}}[method]
    if op_types is None:  # what quantize_static takes for "every type" in QDQ mode
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    calibrator = create_calibrator(model, list(op_types), augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=calibrate, extra_options=options)
    # One batch per collect_data call: each call folds its batch into the ranges (or histograms) and
    # drops the batch's intermediate tensors; one call over every batch would hold them all at once,
    # more memory than this machine has for 3-D volumes.
    while (item := reader.get_next()) is not None:
        calibrator.collect_data(_OneInput(item))
    save_tensors_data(calibrator.compute_data(), cache)
    return calibrate
