"""LiteRT: fp32 files equal PyTorch (video, classifier, detector heads + detections), the runner is a
drop-in for `evaluate()`, INT8 is full integer, one-line refusals, bench cells, and the CLI on digits."""
import json

import numpy as np
import pytest
import torch
from test_export import digit_images, max_diff, randomize_bn, shape_images, spread_detector
from torch import nn

from mobilezoo.cli import main
from mobilezoo.deploy.litert import (
    LiteRTError,
    LiteRTModel,
    export_tflite,
    int8_path,
    metadata_path,
    quantize_tflite_int8,
    refusal,
)
from mobilezoo.deploy.ort import OnnxModelError, array_path
from mobilezoo.models import create_model
from mobilezoo.tasks.detection.export import match_detections

pytest.importorskip("litert_torch")
ATOL = 1e-4
# Converting costs ~13 s for squeezetime_mini, ~30 s for tiny_moat_0 and ~25 s for SSDLite-MobileDet-CPU on
# 2 cores (torch.export's decompositions, per graph node): the last two are slow tests.


def _interpreter(path):
    """LiteRT's interpreter with builtin kernels only: its op list is the file's, not XNNPACK's partitions."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    builtin = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=builtin)
    it.allocate_tensors()
    return it


def _ops(it) -> list[tuple[str, list[str]]]:
    """(op name, dtypes of its tensor inputs) for every op of the file."""
    return [(op["op_name"], [np.dtype(it._get_tensor_details(i, 0)["dtype"]).name for i in op["inputs"] if i >= 0])
            for op in it._get_ops_details()]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(create_model("squeezetime_mini", num_classes=5, num_frames=8))
    path = tmp_path_factory.mktemp("video") / "m.tflite"
    info = export_tflite(model, torch.randn(2, 3, 8, 32, 32), path, "video", threads=1)
    return model, path, info


@pytest.mark.slow  # converting SqueezeTime takes ~15 s on 2 cores: slow, to keep `make test` under 10 minutes
def test_video_fp32_equals_pytorch_with_nchw_input(video):
    model, path, info = video
    assert info["parity"]["max_abs_diff"] <= ATOL and info["parity"]["samples"] == 2
    assert info["input_shape"] == [1, 3, 8, 32, 32] and info["layout"] == "NCHW"
    lite = LiteRTModel(path, threads=1)
    assert lite.task == "video" and lite.input_shape == [1, 3, 8, 32, 32] and lite.input_dtype == "float32"
    x = torch.randn(3, 3, 8, 32, 32)  # a batch of 3 runs sample by sample through the batch-1 file
    with torch.no_grad():
        ref = model(x)
    got = lite(x)
    assert isinstance(got, torch.Tensor) and got.shape == ref.shape and max_diff(got, ref) <= ATOL
    assert json.loads(metadata_path(path).read_text())["mobilezoo.task"] == "video"


def test_int8_is_full_integer_and_close_to_fp32(video, tmp_path):
    model, path, _ = video
    calib = torch.randn(16, 3, 8, 32, 32)
    q = quantize_tflite_int8(path, int8_path(path), [calib[:8], calib[8:]], threads=1)
    assert q.name == "m.int8.tflite" and q.stat().st_size < 0.4 * path.stat().st_size  # int8 weights
    it = _interpreter(q)
    assert [d["dtype"] for d in (*it.get_input_details(), *it.get_output_details())] == [np.int8, np.int8]
    ops = _ops(it)
    convs = [dtypes for name, dtypes in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(convs) > 10 and all(d[:2] == ["int8", "int8"] for d in convs)  # int8 activations and weights
    assert not [name for name, dtypes in ops if "float32" in dtypes]  # no op left in float: EdgeTPU/DSP-ready
    settings = json.loads(LiteRTModel(q).metadata["mobilezoo.quantization"])
    assert settings["tool"] == "ai-edge-quantizer" and settings["calibration_samples"] == 16
    x = torch.randn(4, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(x)
    got = LiteRTModel(q, threads=1)(x)  # dequantized with the file's output scale
    assert got.dtype == torch.float32 and 0 < max_diff(got, ref) < 0.1 * float(ref.abs().max())


class _Tiny(nn.Module):
    """A small CNN classifier: exports in seconds, so the drop-in test does not wait on a MOAT conversion."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_runner_is_a_drop_in_for_engine_evaluate(tmp_path, make_image_folder, monkeypatch):
    from mobilezoo.engine.loop import Context, eval_loader, evaluate
    from mobilezoo.recipes import load_recipe
    from mobilezoo.tasks import build_task
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", per_class=4, size=40)
    task = build_task(load_recipe(None, {"data.name": str(root), "data.img_size": 32, "data.batch_size": 5}))
    task.datasets()
    torch.manual_seed(0)
    model = randomize_bn(_Tiny(3))
    ctx = Context(torch.device("cpu"))
    loader = eval_loader(task, task.val_dataset(), task.recipe, ctx)
    export_tflite(model, next(iter(loader))["image"], tmp_path / "m.tflite", task, threads=1)
    lite = LiteRTModel(tmp_path / "m.tflite", threads=1)
    assert lite.eval() is lite and lite.to("cpu") is lite and lite.train(False) is lite
    with pytest.raises(OnnxModelError, match="cannot be trained"):
        lite.train()
    ours, theirs = evaluate(model, loader, task, ctx), evaluate(lite, loader, task, ctx)
    assert ours["count"] == theirs["count"] == 12
    assert ours["top1"] == theirs["top1"] and ours["per_class_acc"] == theirs["per_class_acc"]
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


class _SparseLogit(nn.Module):
    """One logit, positive only on bright images: like a detector's class head, whose positives are rare."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.05)
            self.conv.bias.zero_()
            self.head.weight.fill_(1.0)
            self.head.bias.fill_(-3.0)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_int8_ranges_keep_a_logit_that_is_positive_on_one_calibration_sample_in_sixteen(tmp_path):
    model = _SparseLogit().eval()
    dark, bright = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    path = tmp_path / "m.tflite"
    export_tflite(model, dark, path, "classify", threads=1)
    calib = torch.cat([dark + 0.01 * torch.rand(15, 3, 16, 16), bright])  # the positive one comes last
    with torch.no_grad():
        want = float(model(bright))  # a confident positive (dark images: -3)
    got = {}
    for ranges in ("default", "average"):
        options = {} if ranges == "default" else {"ranges": ranges}
        q = quantize_tflite_int8(path, tmp_path / f"{ranges}.int8.tflite", [calib], threads=1, **options)
        got[ranges] = float(LiteRTModel(q, threads=1)(bright))
    assert want > 1.5 and got["default"] == pytest.approx(want, abs=0.05)  # the default (min/max) keeps it
    assert got["average"] < 0.1  # a moving average of per-sample maxima ends below 0: the positive is clipped
    with pytest.raises(LiteRTError, match="calibration ranges 'mean'"):
        quantize_tflite_int8(path, tmp_path / "x.int8.tflite", [calib], ranges="mean")


def test_partition_census_finds_the_int8_hard_swish_outside_xnnpack(tmp_path):
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "litert_partitions.py"
    spec = importlib.util.spec_from_file_location("litert_partitions", script)
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    torch.manual_seed(0)
    model, x = randomize_bn(_Tiny(3)), torch.randn(1, 3, 16, 16)
    export_tflite(model, x, tmp_path / "m.tflite", "classify", threads=1)
    q = quantize_tflite_int8(tmp_path / "m.tflite", tmp_path / "m.int8.tflite", [torch.randn(8, 3, 16, 16)], threads=1)
    fp32, int8 = census.partitions(tmp_path / "m.tflite"), census.partitions(q)
    assert fp32["partitions"] == 1 and fp32["outside"] == {}  # XNNPACK takes the whole fp32 graph
    # In int8 XNNPACK has no hard-swish: it runs on LiteRT's own kernel, between two partitions.
    assert int8["outside"] == {"HARD_SWISH": 1} and int8["partitions"] == 2
    assert int8["ops"]["HARD_SWISH"] == 1 and int8["ops"]["CONV_2D"] == 1


def test_refusals_and_missing_files_are_one_line_errors(tmp_path, capsys):
    assert refusal("classify") is None and refusal("detect") is None and refusal("segment") is None
    with pytest.raises(LiteRTError, match="depthwise 3-D convolutions have no LiteRT builtin kernel"):
        export_tflite(nn.Identity(), torch.zeros(1, 4, 8, 8, 8), tmp_path / "m.tflite", "segment3d")
    with pytest.raises(LiteRTError, match="'raw' only"):  # NMS has data-dependent shapes: no LiteRT graph
        export_tflite(nn.Identity(), torch.zeros(1, 3, 64, 64), tmp_path / "m.tflite", "detect", mode="full")
    assert not (tmp_path / "m.tflite").exists()
    with pytest.raises(OnnxModelError, match="LiteRT file not found"):
        LiteRTModel(tmp_path / "none.tflite")
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(OnnxModelError, match="cannot load the LiteRT model"):
        LiteRTModel(tmp_path / "bad.tflite")


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A digits run directory with untrained weights: enough for the CLI's checks before any conversion."""
    from mobilezoo.models.weights import save_weights
    from mobilezoo.recipes import load_recipe
    from mobilezoo.tasks import build_task
    run = tmp_path_factory.mktemp("untrained")
    recipe = load_recipe("classify_digits", {"data.img_size": 32})
    recipe.save(run / "config.yaml")
    save_weights(build_task(recipe).build_model(), run / "model.safetensors")
    return run


@pytest.mark.parametrize("argv, needs", [
    (["eval", "{run}", "--runtime", "litert"], "model.tflite: no LiteRT file; run `mobilezoo export {run} --tflite`"),
    (["eval", "{run}", "--runtime", "litert", "--precision", "int8"],
     "model.int8.tflite: no LiteRT file; run `mobilezoo export {run} --tflite --int8`"),
    (["eval", "{run}", "--runtime", "litert", "--precision", "bf16"], "not a LiteRT precision"),
    (["export", "{run}", "--tflite", "--openvino-int8"], "--openvino-int8 is for the ONNX export"),
    (["export", "{run}", "--tflite", "--dynamic-batch"], "--dynamic-batch is for the ONNX export"),
])
def test_cli_errors_are_one_line(untrained_run, capsys, argv, needs):
    capsys.readouterr()
    assert main([a.format(run=untrained_run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needs.format(run=untrained_run) in err and len(err.splitlines()) == 1


def test_bench_lists_3d_models_as_not_run_with_the_reason():
    from mobilezoo.bench.suites import runtimes as br
    result = br.benchmark(["revunet3d"], (), ("eager", "litert", "litert-int8"), threads=1, quick=True, iters=2,
                          batch_iters=1, rounds=1)
    assert [r["runtime"] for r in result["rows"]] == ["eager"]
    assert [k["runtime"] for k in result["skipped"]] == ["litert", "litert-int8"]
    assert "Not run: revunet3d with LiteRT INT8: a segment3d model cannot be exported" in br.format_markdown(result)
    assert br.LABELS["litert"] == "LiteRT fp32" and "litert-int8" in br.LOW_PRECISION


# --- slow: the full-size conversions and the command line on a trained run -----------------------------------

@pytest.mark.slow
def test_tiny_moat_fp32_equals_pytorch(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create_model("tiny_moat_0", num_classes=10))
    x = digit_images(0, 4, 64)
    info = export_tflite(model, x, tmp_path / "m.tflite", "classify", threads=1)
    assert info["parity"]["max_abs_diff"] <= ATOL and info["input_shape"] == [1, 3, 64, 64]
    with torch.no_grad():
        ref = model(digit_images(100, 3, 64))
    assert max_diff(LiteRTModel(tmp_path / "m.tflite", threads=1)(digit_images(100, 3, 64)), ref) <= ATOL


@pytest.mark.slow
def test_segmenter_fp32_equals_pytorch_and_int8_is_full_integer(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create_model("deeplabv3plus", num_classes=3, aspp_channels=16, decoder_channels=16,
                                      low_level_channels=8, window_size=(None, None, 2, None)))
    info = export_tflite(model, torch.randn(2, 3, 64, 64), tmp_path / "m.tflite", "segment", threads=1)
    assert info["parity"]["max_abs_diff"] <= ATOL and info["input_shape"] == [1, 3, 64, 64]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    got = LiteRTModel(tmp_path / "m.tflite", threads=1)(x)
    assert got.shape == ref.shape == (2, 3, 64, 64) and max_diff(got, ref) <= ATOL
    q = quantize_tflite_int8(tmp_path / "m.tflite", int8_path(tmp_path / "m.tflite"), [torch.randn(8, 3, 64, 64)],
                             threads=1)
    assert not [name for name, dtypes in _ops(_interpreter(q)) if "float32" in dtypes]  # upsampling included
    assert LiteRTModel(q, threads=1)(x).shape == ref.shape


@pytest.mark.slow
def test_detector_raw_heads_equal_pytorch_and_decode_to_the_same_detections(tmp_path):
    model = spread_detector()
    images = shape_images(2)
    path = tmp_path / "det.tflite"
    info = export_tflite(model, images, path, "detect", threads=1)
    assert info["mode"] == "raw" and info["parity"]["max_abs_diff"] <= ATOL + 1e-6 * info["parity"]["max_abs_output"]
    assert info["parity"]["compared"] > 20 and info["parity"]["matched"] == 1.0
    assert array_path(path, "anchors").is_file()  # det.anchors.npy, as the ONNX raw export writes it
    lite = LiteRTModel(path, threads=1)
    assert lite.output_names == ["box_regression", "class_logits"]
    with torch.no_grad():
        ref = model(images)
        regression, logits, _ = model.head_outputs(images)
    reg, log = (torch.from_numpy(a) for a in lite.run(images))
    assert max_diff(reg, regression) <= ATOL and max_diff(log, logits) <= ATOL
    for r, g in zip(ref, lite(images)):  # decoded by the detector's own postprocess, NMS included
        s = match_detections(r, g, limit=model.detections_per_img)
        assert s["required"] > 20 and s["matched"] == s["required"]


@pytest.mark.slow
def test_bench_times_litert_fp32_and_int8_cells():
    from mobilezoo.bench.suites import runtimes as br
    result = br.benchmark(["squeezetime_mini"], (), ("litert", "litert-int8"), threads=1, quick=True, iters=2,
                          batch_iters=1, rounds=1)
    rows = {r["runtime"]: r for r in result["rows"]}
    assert set(rows) == {"litert", "litert-int8"} and result["skipped"] == []
    assert all(r["latency_ms"] > 0 and r["throughput"] > 0 for r in rows.values())
    assert result["summary"][0]["best_low_precision"] == "litert-int8"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny-MOAT-0 trained a little on digits (32 px), exported to LiteRT fp32 and INT8 (with the comparison)."""
    run = tmp_path_factory.mktemp("litert") / "run"
    argv = ["train", "classify_digits", "--epochs", "3", "--img-size", "32", "--batch-size", "32", "--device", "cpu",
            "--set", "data.limit_train=512", "--set", "data.limit_val=400", "--out", str(run)]
    assert main(argv) == 0
    assert main(["export", str(run), "--tflite", "--int8", "--calib-samples", "32", "--threads", "1"]) == 0
    return run


def _eval(run, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--out", str(run / "eval"), *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_cli_litert_fp32_top1_equals_pytorch_and_int8_stays_close(digits_run, capsys):
    torch_top1 = _eval(digits_run, capsys)["top1"]
    assert torch_top1 > 0.5  # a model that learned something, so agreement means something
    fp32 = _eval(digits_run, capsys, "--runtime", "litert", "--threads", "1")
    int8 = _eval(digits_run, capsys, "--runtime", "litert", "--precision", "int8", "--threads", "1")
    assert fp32["top1"] == torch_top1 and fp32["count"] == 360
    # Measured: 94.44% -> 93.61% (3 of 360 images) with 32 calibration samples. Two points (7 images) leaves
    # room for other calibration draws; a wrong scale or zero point anywhere drops a classifier to ~chance.
    assert abs(int8["top1"] - torch_top1) <= 0.02
    report = json.loads((digits_run / "model.litert-int8.json").read_text())  # what the export printed
    assert report["rows"]["litert fp32"]["metric"] == fp32["top1"]
    assert report["change"]["litert int8"] == pytest.approx(int8["top1"] - fp32["top1"], abs=1e-5)


@pytest.mark.slow
def test_cli_predict_with_litert_gives_the_pytorch_labels(digits_run, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits
    images = []
    for i, scan in enumerate(load_digits().images[:3]):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray((scan * 255 / 16).astype(np.uint8)).convert("RGB").resize((32, 32)).save(images[-1])
    labels = {}
    for runtime in ("torch", "litert"):
        out = tmp_path / f"{runtime}.json"
        assert main(["predict", str(digits_run), *map(str, images), "--topk", "1", "--runtime", runtime,
                     "--out", str(out)]) == 0
        labels[runtime] = [r["topk"][0]["label"] for r in json.loads(out.read_text())]
    assert labels["litert"] == labels["torch"]
