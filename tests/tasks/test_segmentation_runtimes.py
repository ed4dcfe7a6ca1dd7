"""Slow: a trained segment run under every deployment runtime from the command line. ONNX Runtime, OpenVINO
fp32, LiteRT fp32 and torch.compile give PyTorch's mIoU; the INT8 files (ONNX Runtime QDQ, OpenVINO NNCF,
LiteRT full integer) are evaluated on the val split by the export, their mIoU reported and close to fp32;
predict through a runtime writes PyTorch's masks. The quick CLI path (train, eval, predict, ONNX export and
ONNX Runtime INT8) is in test_segmentation.py, with the set-up reused here."""
import json

import numpy as np
import pytest
from PIL import Image
from test_segmentation import train_argv, write_folder

from mobilezoo.cli import main

pytestmark = pytest.mark.slow  # training, then three exports (LiteRT's conversion alone ~30 s) and a compile
INT8_REPORTS = {"model.int8.json": "int8", "model.openvino-int8.json": "openvino int8",
                "model.litert-int8.json": "litert int8"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """The small DeepLabv3+ trained 8 epochs on 24 images, exported to ONNX (+ INT8), OpenVINO INT8 and LiteRT
    (+ INT8), each INT8 file compared with fp32 on the val split."""
    tmp = tmp_path_factory.mktemp("segment_runtimes")
    root = write_folder(tmp / "data", counts=(("train", 24), ("val", 8)))
    run = tmp / "run"
    assert main(train_argv(root, run, epochs=8)) == 0
    common = ["--check-samples", "2", "--calib-samples", "8", "--threads", "1"]
    assert main(["export", str(run), "--int8", "--openvino-int8", *common]) == 0
    assert main(["export", str(run), "--tflite", "--int8", *common]) == 0
    return run


def _eval(run, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--threads", "1", "--out", str(run / "eval"), *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flags", [("--runtime", "onnxruntime"), ("--runtime", "openvino", "--precision", "fp32"),
                                   ("--runtime", "litert"), ("--runtime", "compile")])
def test_fp32_runtimes_give_the_pytorch_miou(run, capsys, flags):
    ref = _eval(run, capsys)
    assert ref["per_class_iou"][1] and ref["per_class_iou"][2]  # it finds squares and bars: agreement means something
    got = _eval(run, capsys, *flags)
    assert got["miou"] == pytest.approx(ref["miou"], abs=1e-3) and got["pixels"] == ref["pixels"]


@pytest.mark.parametrize("report, flags", [
    ("model.int8.json", ("--runtime", "onnxruntime", "--onnx", "{run}/model.int8.onnx")),
    ("model.openvino-int8.json", ("--runtime", "openvino", "--precision", "int8")),
    ("model.litert-int8.json", ("--runtime", "litert", "--precision", "int8")),
])
def test_int8_files_report_their_miou_close_to_fp32(run, capsys, report, flags):
    compared = json.loads((run / report).read_text())
    int8 = compared["rows"][INT8_REPORTS[report]]
    assert compared["metric"] == "miou" and int8["count"] == 8
    got = _eval(run, capsys, *(f.format(run=run) for f in flags))
    assert got["miou"] == pytest.approx(int8["metric"], abs=1e-6)  # eval reads what the export reported
    # Measured: fp32 0.890; INT8 ONNX Runtime 0.889, OpenVINO 0.879, LiteRT (8-bit activations too) 0.860
    assert abs(got["miou"] - _eval(run, capsys)["miou"]) <= 0.05


def test_predict_through_a_runtime_writes_the_pytorch_masks(run, tmp_path):
    images = sorted((run.parent / "data" / "val" / "images").iterdir())[:2]
    masks = {}
    for runtime in ("torch", "onnxruntime", "litert"):
        out = tmp_path / runtime
        assert main(["predict", str(run), *map(str, images), "--runtime", runtime, "--threads", "1",
                     "--out", str(out)]) == 0
        masks[runtime] = [np.asarray(Image.open(out / f"{f.stem}.png")) for f in images]
    for runtime in ("onnxruntime", "litert"):
        same = np.mean([np.mean(a == b) for a, b in zip(masks[runtime], masks["torch"])])
        assert same >= 0.999, runtime  # a pixel on a near-tie may flip
