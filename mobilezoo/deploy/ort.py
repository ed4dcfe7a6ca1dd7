"""ONNX Runtime sessions that stand in for a torch model in `evaluate()` and `predict()`.

`OrtModel(path)` returns what the torch model returns in eval mode: logits for classifiers, video
and 3D models; for detectors a list of {"boxes", "scores", "labels"} dicts. A detector exported
with `detector_mode="raw"` (box regression + class logits only, e.g. for INT8) is decoded here by
the detector's own postprocess (sigmoid, top-k per class, box decoding, per-class NMS) in fp32,
with the anchors saved beside the file. Files written by `deploy.export` carry their task and
decoding settings in the ONNX metadata (keys below); other ONNX files run as plain networks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

META_TASK = "mobilezoo.task"
META_DETECTOR_MODE = "mobilezoo.detector_mode"
META_DECODER = "mobilezoo.decoder"  # JSON: the detector's postprocess settings (raw mode)
META_QUANTIZATION = "mobilezoo.quantization"  # JSON: settings of an INT8 file


class OnnxModelError(UserError, ValueError):
    """An ONNX file (or its anchors file) that cannot be loaded or does not fit its input."""


def anchors_path(onnx_path: str | Path) -> Path:
    """Where a raw-mode detector's anchors live: `model.onnx` -> `model.anchors.npy`."""
    return Path(onnx_path).with_suffix(".anchors.npy")


class DetectionDecoder:
    """The detector's own postprocess over raw head outputs, rebuilt from the settings in the file."""

    KEYS = ("num_classes", "background", "score_thresh", "nms_iou", "detections_per_img", "topk_candidates")

    def __init__(self, anchors: torch.Tensor, config: dict):
        from torchvision.models.detection._utils import BoxCoder
        self.anchors = anchors
        for k in self.KEYS:
            setattr(self, k, config[k])
        self.box_coder = BoxCoder(weights=tuple(config["box_coder_weights"]),
                                  bbox_xform_clip=config["bbox_xform_clip"])

    @staticmethod
    def config_of(detector) -> dict:
        """The settings of an SSDLite's postprocess, as stored in a raw-mode file."""
        cfg = {k: getattr(detector, k) for k in DetectionDecoder.KEYS}
        cfg["box_coder_weights"] = list(detector.box_coder.weights)
        cfg["bbox_xform_clip"] = float(detector.box_coder.bbox_xform_clip)
        return cfg

    def __call__(self, regression: torch.Tensor, logits: torch.Tensor, image_size) -> list[dict]:
        """List of {"boxes", "scores", "labels"}, one per image, exactly as the torch detector decodes."""
        from ..models.ssdlite import SSDLite
        # Call the detector's own method (it only reads the attributes set above), so decoding in
        # deployment cannot drift from decoding in training/eval.
        return SSDLite.postprocess(self, regression, logits, self.anchors, tuple(image_size))


def session_options(threads: int | None = None, arena: bool = True):
    """SessionOptions with `threads` intra-op threads (None: ONNX Runtime's default) and one inter-op;
    `arena=False` returns activation memory after each run instead of keeping ONNX Runtime's pool
    (many sessions in one process, e.g. a benchmark)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return so


class OrtModel:
    """An onnxruntime InferenceSession usable where the torch model is used in eval/predict."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 arena: bool = True):
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: ONNX file not found")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, arena),
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for corrupt or unsupported files
            raise OnnxModelError(f"{self.path}: cannot load the ONNX model ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.task = meta.get(META_TASK)
        self.detector_mode = meta.get(META_DETECTOR_MODE)
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.decoder = None
        if self.task == "detect" and self.detector_mode == "raw":
            apath = anchors_path(self.path)
            if not apath.is_file():
                raise OnnxModelError(f"{apath}: anchors file of the raw detector {self.path.name} not found "
                                     "(export writes it beside the .onnx file)")
            self.decoder = DetectionDecoder(torch.from_numpy(np.load(apath)), json.loads(meta[META_DECODER]))

    # torch-module habits the engine relies on; a session has no mode, device or memory format
    def eval(self) -> OrtModel:
        """No-op (a session is always in inference mode)."""
        return self

    def train(self, mode: bool = True) -> OrtModel:
        """No-op for mode=False; an ONNX model cannot be trained."""
        if mode:
            raise OnnxModelError(f"{self.path}: an ONNX Runtime model cannot be trained")
        return self

    def to(self, *args, **kwargs) -> OrtModel:
        """No-op: inputs are copied to the CPU and outputs back to the input's device."""
        return self

    def _fixed_batch(self) -> int | None:
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    def run(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Raw session outputs for a batch; a graph with a fixed batch size runs it in chunks of that size."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        fixed = self._fixed_batch()
        if fixed is None or x.shape[0] == fixed:
            return self.session.run(None, {self.input_name: x})
        if x.shape[0] % fixed:
            raise OnnxModelError(f"{self.path}: the graph takes batches of {fixed}, got {x.shape[0]}")
        chunks = [self.session.run(None, {self.input_name: x[i:i + fixed]}) for i in range(0, x.shape[0], fixed)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def __call__(self, x: torch.Tensor):
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        if self.task == "detect" and self.detector_mode == "full":
            # The full graph (decoding + NMS) takes one image: run the batch image by image.
            out = []
            for image in x:
                boxes, scores, labels = (torch.from_numpy(a).to(device) for a in self.run(image[None]))
                out.append({"boxes": boxes, "scores": scores, "labels": labels})
            return out
        outs = [torch.from_numpy(a) for a in self.run(x)]
        if self.decoder is not None:
            regression, logits = outs
            dets = self.decoder(regression, logits, tuple(x.shape[-2:]))
            return [{k: v.to(device) for k, v in d.items()} for d in dets]
        outs = [o.to(device) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, task={self.task!r}, inputs={self.input_shape})"
