"""OpenVINO inference of an exported model, fp32 / bf16 from the ONNX file and INT8 by NNCF.

`OpenVinoModel(path, precision)` stands in for the torch model in `evaluate()` and `predict()` as
`OrtModel` does (same metadata, arrays beside the file, task-specific outputs). The precision hint
is always set: OpenVINO's CPU plugin otherwise runs bf16 on CPUs that have it, silently.

`quantize_openvino_int8` quantizes the fp32 ONNX export with NNCF's post-training quantization,
calibrated on the task's own data, with the task's settings (`Task.openvino_int8_options`: MOAT
needs the transformer model type and its relative-position gathers left in float). ONNX Runtime's
QDQ files are not fed to OpenVINO: it computes a wrong tiny-MOAT from them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import UserError
from .ort import META_ARRAYS, META_QUANTIZATION, META_TASK, OnnxModelError, OrtModel, array_path

PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INT8: what is not int8 runs in fp32
RT_INFO_KEY = "mobilezoo_metadata"  # the ONNX metadata, as JSON, in an IR file's rt_info
INT8_SUFFIX = ".openvino-int8.xml"


class OpenVinoError(UserError, ValueError):
    """OpenVINO missing, or a file or option it cannot take."""


def _openvino():
    try:
        import openvino
    except ImportError:
        raise OpenVinoError("OpenVINO is not installed: pip install 'mobilezoo[openvino]'") from None
    return openvino


def int8_path(onnx_path: str | Path) -> Path:
    """Where `export --openvino-int8` writes the INT8 IR of `model.onnx`: `model.openvino-int8.xml`."""
    return Path(onnx_path).with_name(Path(onnx_path).stem + INT8_SUFFIX)


def _metadata(path: Path, model) -> dict[str, str]:
    """The file's mobilezoo metadata: ONNX metadata_props, or the IR's rt_info entry."""
    if path.suffix == ".onnx":
        import onnx
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(model.get_rt_info(RT_INFO_KEY).value) if model.has_rt_info(RT_INFO_KEY) else {}


class _Session:
    """An OpenVINO compiled model behind ONNX Runtime's `session.run(None, feed)`."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, _names, feed: dict) -> list[np.ndarray]:
        results = self.request.infer(list(feed.values())[0])
        return [np.array(results[out]) for out in self.compiled.outputs]


class OpenVinoModel(OrtModel):
    """An exported model (`.onnx`, or an INT8 `.xml` IR) compiled by OpenVINO for the CPU at `precision`."""

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        ov = _openvino()
        if precision not in PRECISIONS:
            raise OpenVinoError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.path, self.precision = Path(path), precision
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: model file not found")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise OnnxModelError(f"{self.path}: OpenVINO cannot compile it ({str(e).strip().splitlines()[0]})") \
                from None
        self.session = _Session(compiled)
        self.metadata = _metadata(self.path, model)
        self.task = self.metadata.get(META_TASK)
        shape = model.inputs[0].get_partial_shape()
        self.input_name = model.inputs[0].get_any_name()
        self.input_shape = [d.get_length() if d.is_static else None for d in shape]
        self.output_names = [o.get_any_name() for o in model.outputs]
        self.arrays = self.load_arrays()

    def __repr__(self) -> str:
        return f"OpenVinoModel({str(self.path)!r}, {self.precision}, task={self.task!r})"


def quantize_openvino_int8(onnx_path: str | Path, out_path: str | Path, calibration_batches: Iterable,
                           options: dict | None = None) -> Path:
    """NNCF post-training INT8 of an fp32 ONNX export, calibrated on `calibration_batches` (tensors of
    the model input), written as an OpenVINO IR (fp32 weights where not int8) with the export's
    metadata and arrays. `options`: `model_type` ("transformer") and `ignored_types` (op types left in float)."""
    ov = _openvino()
    try:
        import nncf
    except ImportError:
        raise OpenVinoError("NNCF is not installed: pip install 'mobilezoo[openvino]'") from None
    src, out = Path(onnx_path), Path(out_path)
    model = ov.Core().read_model(str(src))
    meta = _metadata(src, model)
    batches = [np.ascontiguousarray(b.detach().cpu().float().numpy() if hasattr(b, "detach") else b, np.float32)
               for b in calibration_batches]
    if not batches:
        raise OpenVinoError("no calibration batches: INT8 calibration needs samples of the task's data")
    fixed = model.inputs[0].get_partial_shape()[0]
    if fixed.is_static:  # a graph exported at a fixed batch size takes its calibration in such chunks
        n = fixed.get_length()
        batches = [b[i:i + n] for b in batches for i in range(0, len(b), n) if len(b[i:i + n]) == n]
    options = options or {}
    # NNCF counts dataset items, here batches (of several samples where the graph takes any batch): all of them
    kwargs = {"subset_size": len(batches)}
    if options.get("model_type") == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if options.get("ignored_types"):
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(options["ignored_types"]), validate=False)
    quantized = nncf.quantize(model, nncf.Dataset(batches), **kwargs)
    settings = {"tool": "nncf", **options, "calibration_samples": sum(len(b) for b in batches), "source": src.name}
    quantized.set_rt_info(json.dumps({**meta, META_QUANTIZATION: json.dumps(settings)}), RT_INFO_KEY)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    for key in json.loads(meta.get(META_ARRAYS, "[]")):
        array_path(out, key).write_bytes(array_path(src, key).read_bytes())
    return out
