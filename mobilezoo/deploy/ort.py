"""ONNX Runtime sessions that stand in for a torch model in `evaluate()` and `predict()`.

`OrtModel(path)` returns what the torch model returns in eval mode, as the task named in the file's
metadata rebuilds it from the graph's outputs (`Task.onnx_result`): logits for classifiers, video
and 3-D models; for detectors a list of {"boxes", "scores", "labels"} dicts (a raw-heads graph is
decoded by the detector's own postprocess in fp32, with the anchors saved beside the file). Arrays
a graph needs beside it are `<name>.<key>.npy`, listed in its metadata. ONNX files written
elsewhere (no task in their metadata) run as plain networks.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

META_TASK = "mobilezoo.task"
META_ARRAYS = "mobilezoo.arrays"  # JSON list of the arrays saved beside the file
META_QUANTIZATION = "mobilezoo.quantization"  # JSON: settings of an INT8 file


class OnnxModelError(UserError, ValueError):
    """An ONNX file (or an array file beside it) that cannot be loaded or does not fit its input."""


def array_path(onnx_path: str | Path, key: str) -> Path:
    """Where an array a graph needs lives: `model.onnx` -> `model.<key>.npy`."""
    return Path(onnx_path).with_suffix(f".{key}.npy")


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
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.arrays = self.load_arrays()

    def load_arrays(self) -> dict[str, torch.Tensor]:
        """The arrays the graph needs (e.g. a detector's anchors), from beside the file."""
        arrays = {}
        for key in json.loads(self.metadata.get(META_ARRAYS, "[]")):
            apath = array_path(self.path, key)
            if not apath.is_file():
                raise OnnxModelError(f"{apath}: the {key} of {self.path.name} not found (export writes it "
                                     "beside the model file)")
            arrays[key] = torch.from_numpy(np.load(apath))
        return arrays

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

    def _check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """A one-line error for samples of another shape than the graph's fixed sides (the runtime's own
        message is a multi-line internal error): e.g. a run evaluated at another size than it was exported."""
        want = self.input_shape[1:]
        if len(want) == len(shape) and all(not isinstance(w, int) or w <= 0 or w == s for w, s in zip(want, shape)):
            return
        side = "x".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in want)
        raise OnnxModelError(f"{self.path}: the graph takes samples of {side}, got {'x'.join(map(str, shape))}; "
                             "export it again for this input size")

    def run(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """Raw session outputs for a batch; a graph with a fixed batch size runs it in chunks of that size."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._check_sample_shape(x.shape[1:])
        fixed = self._fixed_batch()
        if fixed is None or x.shape[0] == fixed:
            return self.session.run(None, {self.input_name: x})
        if x.shape[0] % fixed:
            raise OnnxModelError(f"{self.path}: the graph takes batches of {fixed}, got {x.shape[0]}")
        chunks = [self.session.run(None, {self.input_name: x[i:i + fixed]}) for i in range(0, x.shape[0], fixed)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def __call__(self, x: torch.Tensor):
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")

        def run(batch):
            return [torch.from_numpy(a).to(device) for a in self.run(batch)]

        if self.task is None:
            outs = run(x)
            return outs[0] if len(outs) == 1 else tuple(outs)
        from ..tasks import TASKS
        return TASKS[self.task].onnx_result(run, x, self)

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, task={self.task!r}, inputs={self.input_shape})"
