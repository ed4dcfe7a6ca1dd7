"""OpenVINO: fp32 equals PyTorch for one model of each family and the segmenter, bf16 compiles MOAT (the pooling's
divisor exported as a constant) and keeps its predictions, NNCF INT8 from the command line."""
import json

import pytest
import torch
from test_export import digit_images, max_diff, randomize_bn, shape_images, spread_detector

from mobilezoo.cli import main
from mobilezoo.deploy.export import export_onnx
from mobilezoo.deploy.openvino import OpenVinoModel, int8_path
from mobilezoo.models import create_model
from mobilezoo.tasks import TASKS
from mobilezoo.tasks.detection.export import match_detections

ATOL = 1e-4


@pytest.mark.parametrize("name,task,shape,kwargs", [
    ("tiny_moat_0", "classify", (2, 3, 64, 64), {"num_classes": 10}),
    ("squeezetime_mini", "video", (2, 3, 8, 32, 32), {"num_classes": 5, "num_frames": 8}),
    ("revunet3d", "segment3d", (1, 4, 16, 16, 16),
     {"channels": (16, 32), "encoder_blocks": (1, 1), "decoder_blocks": (1,), "expansion": 2}),
    ("deeplabv3plus", "segment", (2, 3, 64, 64),  # 2x2 attention windows on the 4x4 stride-16 map
     {"num_classes": 3, "aspp_channels": 16, "decoder_channels": 16, "low_level_channels": 8,
      "window_size": (None, None, 2, None)}),
])
def test_fp32_equals_pytorch(tmp_path, name, task, shape, kwargs):
    torch.manual_seed(0)
    model = randomize_bn(create_model(name, **kwargs))
    x = torch.randn(*shape) if task != "classify" else digit_images(0, shape[0], shape[-1])
    export_onnx(model, x, tmp_path / "m.onnx", task, dynamic_batch=True, threads=1)
    ov = OpenVinoModel(tmp_path / "m.onnx", "fp32", threads=1)
    with torch.no_grad():
        ref = model(x)
    got = ov(x)
    assert got.shape == ref.shape and max_diff(got, ref) <= ATOL
    assert TASKS[task].check_parity(model, ov, x, ATOL, 1e-6)["max_abs_diff"] <= ATOL


def test_detector_fp32_same_detections_and_heads(tmp_path):
    model = spread_detector()
    images = shape_images(2)
    export_onnx(model, images[:1], tmp_path / "full.onnx", "detect", threads=1)
    export_onnx(model, images, tmp_path / "raw.onnx", "detect", dynamic_batch=True, mode="raw", threads=1)
    with torch.no_grad():
        ref = model(images)
        regression, logits, _ = model.head_outputs(images)
    raw = OpenVinoModel(tmp_path / "raw.onnx", "fp32", threads=1)
    reg, log = (torch.from_numpy(a) for a in raw.run(images))
    assert max_diff(reg, regression) <= ATOL and max_diff(log, logits) <= ATOL
    for r, g in zip(ref, OpenVinoModel(tmp_path / "full.onnx", "fp32", threads=1)(images)):  # NMS in OpenVINO
        s = match_detections(r, g, limit=model.detections_per_img)
        assert s["required"] > 20 and s["matched"] == s["required"]


def test_bf16_compiles_moat_and_keeps_its_predictions(tmp_path):
    # Before the pooling's valid-cell divisor became a constant, OpenVINO's bf16 compiler refused
    # MOAT's shortcut pooling ("Supported primitive descriptors list is empty ... AveragePool").
    torch.manual_seed(0)
    model = randomize_bn(create_model("tiny_moat_0", num_classes=10))
    x = digit_images(0, 16, 64)
    export_onnx(model, x, tmp_path / "m.onnx", "classify", dynamic_batch=True, threads=1)
    bf16 = OpenVinoModel(tmp_path / "m.onnx", "bf16", threads=1)(x)
    with torch.no_grad():
        ref = model(x)
    assert 0 < max_diff(bf16, ref) < 0.1 * float(ref.abs().max())  # really bf16, and close
    assert OpenVinoModel(tmp_path / "m.onnx", "fp32", threads=1)(x).sub(ref).abs().max() <= ATOL


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny-MOAT-0 trained a little on digits (32 px), exported with OpenVINO INT8, no comparison."""
    root = tmp_path_factory.mktemp("ov")
    run = root / "run"
    argv = ["train", "classify_digits", "--epochs", "3", "--img-size", "32", "--batch-size", "32", "--device", "cpu",
            "--set", "data.limit_train=512", "--set", "data.limit_val=400", "--out", str(run)]
    assert main(argv) == 0
    assert main(["export", str(run), "--openvino-int8", "--calib-samples", "32", "--no-compare"]) == 0
    return run


def _eval(run, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_cli_precisions_agree_with_pytorch(digits_run, capsys):
    torch_top1 = _eval(digits_run, capsys)["top1"]
    assert torch_top1 > 0.5  # a model that learned something, so agreement means something
    runs = {p: _eval(digits_run, capsys, "--runtime", "openvino", "--precision", p) for p in ("fp32", "bf16", "int8")}
    assert runs["fp32"]["top1"] == torch_top1
    assert abs(runs["bf16"]["top1"] - torch_top1) <= 0.01  # 4 of 400 images
    assert abs(runs["int8"]["top1"] - torch_top1) <= 0.01


@pytest.mark.slow
def test_int8_file_is_nncf_quantized_with_moat_settings(digits_run):
    model = OpenVinoModel(int8_path(digits_run / "model.onnx"), "int8", threads=1)
    settings = json.loads(model.metadata["mobilezoo.quantization"])
    assert settings["tool"] == "nncf" and settings["model_type"] == "transformer"
    assert settings["ignored_types"] == ["Gather"] and settings["calibration_samples"] == 32
    # OpenVINO runs most convolutions and the attention's dense layers in 8 bits
    kernels = [(op.get_rt_info()["layerType"].value, op.get_rt_info()["runtimePrecision"].value)
               for op in model.session.compiled.get_runtime_model().get_ops() if "runtimePrecision" in op.get_rt_info()]
    convs = [p for t, p in kernels if t == "Convolution"]
    assert convs.count("u8") > 0.7 * len(convs) and ("FullyConnected", "u8") in kernels
    weights = int8_path(digits_run / "model.onnx").with_suffix(".bin")
    assert weights.stat().st_size < 0.6 * (digits_run / "model.onnx").stat().st_size  # int8 weights


def test_precision_errors_are_one_line(tmp_path, capsys):
    for command, flags in (("eval", ["--runtime", "onnxruntime", "--precision", "bf16"]),
                           ("eval", ["--precision", "int8"]), ("predict", ["--precision", "bf16"])):
        capsys.readouterr()
        inputs = [str(tmp_path)] if command == "predict" else []
        assert main([command, str(tmp_path), *inputs, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "is for --runtime openvino" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_missing_int8_file_names_the_export_flag(digits_run, tmp_path, capsys):
    int8_path(digits_run / "model.onnx").rename(tmp_path / "moved.xml")
    try:
        assert main(["eval", str(digits_run), "--runtime", "openvino", "--precision", "int8"]) == 2
        assert "--openvino-int8" in capsys.readouterr().err
    finally:
        (tmp_path / "moved.xml").rename(int8_path(digits_run / "model.onnx"))
