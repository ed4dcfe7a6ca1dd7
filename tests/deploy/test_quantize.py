"""INT8 static quantization: size, agreement with fp32 on real digits, detectors through their raw
heads, metadata kept, and the inputs it refuses."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilezoo.deploy.export import export_onnx
from mobilezoo.deploy.ort import META_QUANTIZATION, OrtModel, array_path
from mobilezoo.deploy.quantize import BatchReader, QuantizationError, quantize_int8
from mobilezoo.models import create_model
from mobilezoo.tasks.detection.export import match_detections


def digit_images(start: int, n: int, size: int = 64) -> torch.Tensor:
    """Real handwritten digits (scikit-learn's scans) as RGB in [-1, 1], size x size."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().images[start:start + n, None], dtype=torch.float32) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1) * 2 - 1


def shape_images(n: int, start: int = 0, size: int = 160) -> torch.Tensor:
    """Images of the embedded `shapes` detection set, resized and scaled to [-1, 1] as the task does."""
    from mobilezoo.data.shapes import make_image
    imgs = torch.stack([torch.from_numpy(make_image(start + i, "val")[0]).permute(2, 0, 1)
                        for i in range(n)]).float()
    return F.interpolate(imgs, size=(size, size), mode="bilinear", antialias=True) / 127.5 - 1


def randomized_detector() -> nn.Module:
    """SSDLite-MobileDet-CPU with random BN statistics and class scores spread over (0, 1)."""
    torch.manual_seed(0)
    model = create_model("ssdlite_mobiledet_cpu", num_classes=5).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
        for h in model.cls_heads:
            nn.init.normal_(h[-1].weight, std=0.3)
            nn.init.constant_(h[-1].bias, -2.0)
    return model


def digits_classifier() -> nn.Module:
    """tiny-MOAT-0 standing in for a trained digits classifier: fan-in-scaled random weights, BN
    statistics from digits, and a ridge-regression head on its pooled features (~88% val accuracy),
    so its decisions have margins as a trained model's do (a random head's are near zero and flip
    under any rounding, int8 or not)."""
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    model = create_model("tiny_moat_0", num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    train = digit_images(0, 512)
    labels = torch.tensor(load_digits().target[:512])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # a plain average over the batch below
        model.train()
        model(train[:64])
        model.eval()
        f = model.forward_head(model.forward_features(train), pre_logits=True)
        a = torch.cat([f, torch.ones(len(f), 1)], 1)
        w = torch.linalg.solve(a.T @ a + 100 * torch.eye(a.shape[1]), a.T @ F.one_hot(labels, 10).float())
        model.head.weight.copy_(w[:-1].T)
        model.head.bias.copy_(w[-1])
    return model


@pytest.fixture(scope="module")
def int8_classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    model = digits_classifier()
    # a fixed batch of 1: calibration batches of 16 are fed in slices of the graph's batch size
    export_onnx(model, digit_images(600, 1), root / "fp32.onnx", "classify", threads=1)
    calib = (digit_images(600 + i, 16) for i in range(0, 64, 16))
    out = quantize_int8(root / "fp32.onnx", root / "int8.onnx", calib)
    return model, root / "fp32.onnx", out


def test_int8_classifier_smaller_and_agrees_with_fp32(int8_classifier):
    _, fp32, int8 = int8_classifier
    ratio = int8.stat().st_size / fp32.stat().st_size
    assert ratio < 0.4
    graph = onnx.load(str(int8)).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) > 50
    weights = {i.name: i for i in graph.initializer}
    conv_w = [weights[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
              and weights[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(conv_w) >= 57  # every conv's weight is stored as int8
    x = digit_images(1000, 256)  # held-out digits
    a, b = OrtModel(fp32, threads=1)(x), OrtModel(int8, threads=1)(x)
    agreement = (a.argmax(1) == b.argmax(1)).float().mean().item()
    assert agreement >= 0.9


def test_int8_keeps_metadata_and_records_settings(int8_classifier):
    _, _, int8 = int8_classifier
    model = OrtModel(int8, threads=1)
    assert model.task == "classify"
    settings = json.loads(model.metadata[META_QUANTIZATION])
    assert settings["method"] == "minmax" and settings["per_channel"] is True
    assert settings["calibration_samples"] == 64 and settings["source"] == "fp32.onnx"


def test_int8_detector_quantizes_raw_heads_and_decodes_in_fp32(tmp_path):
    model = randomized_detector()
    images = shape_images(2)
    full = export_onnx(model, images, tmp_path / "full.onnx", "detect", threads=1)
    with pytest.raises(QuantizationError, match="quantize its raw-heads export"):
        quantize_int8(full["path"], tmp_path / "no.onnx", [images[:1]])
    raw = export_onnx(model, images, tmp_path / "raw.onnx", "detect", mode="raw", dynamic_batch=True,
                      threads=1)
    int8 = quantize_int8(raw["path"], tmp_path / "raw_int8.onnx", [shape_images(4, start=10)])
    assert np.array_equal(np.load(array_path(int8, "anchors")), np.load(raw["arrays"]["anchors"]["path"]))
    assert int8.stat().st_size / (tmp_path / "raw.onnx").stat().st_size < 0.4
    nodes = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "NonMaxSuppression" not in nodes and "QuantizeLinear" in nodes
    fp32_dets, int8_dets = OrtModel(raw["path"], threads=1)(images), OrtModel(int8, threads=1)(images)
    for f, q in zip(fp32_dets, int8_dets):
        assert set(q) == {"boxes", "scores", "labels"} and q["labels"].dtype == torch.int64
        # int8 moves boxes and scores a little: most confident fp32 boxes still have an int8 twin
        s = match_detections(f, q, score_thresh=0.3, iou_thresh=0.7, score_atol=0.05)
        assert s["required"] > 0 and s["matched"] >= 0.8 * s["required"]


def test_batch_reader_splits_for_a_fixed_batch_and_takes_dicts():
    reader = BatchReader([np.zeros((4, 3), np.float32), torch.ones(2, 3), {"x": np.ones((2, 3))}], "x", 2)
    items = list(reader)
    assert [i["x"].shape for i in items] == [(2, 3)] * 4 and reader.count == 8
    assert items[2]["x"].dtype == np.float32 and items[2]["x"].sum() == 6
    with pytest.raises(QuantizationError, match="batch of 3 does not split"):
        list(BatchReader([np.zeros((3, 3))], "x", 2))


def test_refusals(int8_classifier, tmp_path):
    _, fp32, int8 = int8_classifier
    with pytest.raises(QuantizationError, match="no calibration batches"):
        quantize_int8(fp32, tmp_path / "q.onnx", [])
    with pytest.raises(QuantizationError, match="calibration method"):
        quantize_int8(fp32, tmp_path / "q.onnx", [digit_images(0, 1)], method="kl")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_int8(int8, tmp_path / "q.onnx", [digit_images(0, 1)])
    with pytest.raises(QuantizationError, match="missing.onnx: ONNX file not found"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx", [])


def test_calibration_batches_shrink_for_large_inputs_and_keep_every_sample():
    from mobilezoo.deploy.quantize import split_for_calibration
    images = torch.zeros(20, 3, 32, 32)
    assert [len(b) for b in split_for_calibration(images)] == [8, 8, 4]
    volumes = torch.zeros(5, 4, 96, 96, 96)  # 3.5M values each: one per batch
    assert [len(b) for b in split_for_calibration(volumes)] == [1] * 5


def test_int8_volume_with_dynamic_sides_leaves_working_directory_clean(tmp_path, monkeypatch):
    """ORT's symbolic shape inference gives up on dynamic volume sides and saves its partial model
    into the working directory; quantization must keep that inside its temporary directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    torch.manual_seed(0)
    model = create_model("revunet3d", num_classes=3).eval()
    volumes = torch.randn(2, 4, 32, 32, 32)
    export_onnx(model, volumes[:1], tmp_path / "f.onnx", "segment3d", dynamic_spatial=True, check=False)
    out = quantize_int8(tmp_path / "f.onnx", "q.onnx", [volumes])
    assert sorted(p.name for p in cwd.iterdir()) == ["q.onnx"]
    logits = OrtModel(out)(volumes[:1].numpy())
    assert logits.shape == (1, 3, 32, 32, 32)
