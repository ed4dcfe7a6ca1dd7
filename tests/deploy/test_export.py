"""ONNX export of the four families: parity with torch (BN folded), dynamic shapes, the detector's
full and raw graphs, OrtModel as a drop-in for the torch model, and the parity check's failures."""
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from mobilezoo.deploy.export import ExportError, check_onnx, export_onnx
from mobilezoo.deploy.ort import OnnxModelError, OrtModel, array_path
from mobilezoo.errors import ParityError, UserError
from mobilezoo.models import create_model
from mobilezoo.tasks.detection.export import match_detections

ATOL = 1e-4


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding them changes the conv weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return model.eval()


def digit_images(start: int, n: int, size: int = 64) -> torch.Tensor:
    """Real handwritten digits (scikit-learn's scans) as RGB in [-1, 1], size x size."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().images[start:start + n, None], dtype=torch.float32) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1) * 2 - 1


def shape_images(n: int, size: int = 160) -> torch.Tensor:
    """Images of the embedded `shapes` detection set, resized and scaled to [-1, 1] as the task does."""
    from mobilezoo.data.shapes import make_image
    imgs = torch.stack([torch.from_numpy(make_image(i, "val")[0]).permute(2, 0, 1) for i in range(n)]).float()
    return F.interpolate(imgs, size=(size, size), mode="bilinear", antialias=True) / 127.5 - 1


def spread_detector() -> nn.Module:
    """SSDLite-MobileDet-CPU (5 classes, seeded) with random BN statistics and class scores spread out,
    so that NMS and the score threshold have work to do."""
    torch.manual_seed(0)
    model = randomize_bn(create_model("ssdlite_mobiledet_cpu", num_classes=5))
    with torch.no_grad():
        for h in model.cls_heads:
            nn.init.normal_(h[-1].weight, std=0.3)
            nn.init.constant_(h[-1].bias, -2.0)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- classifier, video, 3D: parity, BN folding, dynamic shapes ----------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(create_model("tiny_moat_0", num_classes=10))
    path = tmp_path_factory.mktemp("cls") / "tiny_moat_0.onnx"
    info = export_onnx(model, digit_images(0, 4), path, "classify", dynamic_batch=True, threads=1)
    return model, path, info


def test_classifier_parity_bn_folded_and_dynamic_batch(classifier):
    model, path, info = classifier
    assert info["parity"]["max_abs_diff"] <= ATOL and info["parity"]["samples"] == 4
    assert info["input_shape"] == ["batch", 3, 64, 64] and info["output_names"] == ["logits"]
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]  # folded before export
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ort_model = OrtModel(path, threads=1)
    assert ort_model.task == "classify"
    for x in (digit_images(100, 1), digit_images(200, 3)):  # batch 1 and 3 through the same file
        with torch.no_grad():
            ref = model(x)
        got = ort_model(x)
        assert isinstance(got, torch.Tensor) and got.dtype == ref.dtype and got.shape == ref.shape
        assert max_diff(got, ref) <= ATOL


def test_ort_model_is_a_drop_in_for_engine_evaluate(tmp_path, make_image_folder, monkeypatch):
    from mobilezoo.engine.loop import Context, eval_loader, evaluate
    from mobilezoo.recipes import load_recipe
    from mobilezoo.tasks import build_task
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", per_class=4, size=40)
    task = build_task(load_recipe(None, {"data.name": str(root), "data.img_size": 64, "data.batch_size": 5}))
    torch.manual_seed(0)
    model = randomize_bn(task.build_model())
    ctx = Context(torch.device("cpu"))
    loader = eval_loader(task, task.val_dataset(), task.recipe, ctx)
    batch = next(iter(loader))
    export_onnx(model, batch["image"], tmp_path / "m.onnx", task, dynamic_batch=True, threads=1)
    ort_model = OrtModel(tmp_path / "m.onnx", threads=1)
    assert ort_model.eval() is ort_model and ort_model.to("cpu") is ort_model and ort_model.train(False) is ort_model
    with pytest.raises(OnnxModelError, match="cannot be trained"):
        ort_model.train()
    ours, theirs = evaluate(model, loader, task, ctx), evaluate(ort_model, loader, task, ctx)
    assert ours["top1"] == theirs["top1"] and ours["per_class_acc"] == theirs["per_class_acc"]
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)


def test_video_parity_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(create_model("squeezetime_mini", num_classes=5, num_frames=8))
    clips = torch.randn(2, 3, 8, 32, 32)
    info = export_onnx(model, clips, tmp_path / "st.onnx", "video", dynamic_batch=True, threads=1)
    assert info["parity"]["max_abs_diff"] <= ATOL
    ort_model = OrtModel(tmp_path / "st.onnx", threads=1)
    for n in (1, 3):
        x = torch.randn(n, 3, 8, 32, 32)
        with torch.no_grad():
            ref = model(x)
        got = ort_model(x)
        assert got.shape == ref.shape == (n, 5) and max_diff(got, ref) <= ATOL


def test_unet3d_parity_dynamic_batch_and_volume(tmp_path):
    torch.manual_seed(0)
    model = create_model("revunet3d", channels=(16, 32), encoder_blocks=(1, 1), decoder_blocks=(1,),
                         expansion=2).eval()
    assert model.reversible  # export takes the plain path; the torch model keeps its own
    info = export_onnx(model, torch.randn(1, 4, 16, 16, 16), tmp_path / "unet.onnx", "segment3d",
                       dynamic_batch=True, dynamic_spatial=True, threads=1)
    assert info["parity"]["max_abs_diff"] <= ATOL and model.reversible
    assert info["input_shape"] == ["batch", 4, "depth", "height", "width"]
    x = torch.randn(2, 4, 32, 16, 24)  # another batch and volume through the same file
    with torch.no_grad():
        ref = model(x)
    got = OrtModel(tmp_path / "unet.onnx", threads=1)(x)
    assert got.shape == ref.shape == (2, 3, 32, 16, 24) and max_diff(got, ref) <= ATOL


def _all_nodes(graph):
    """Nodes of a graph and of its subgraphs (If branches)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


# --- detector: full graph (decoding + NMS) and raw heads + anchors -------------------------------------

@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    model = spread_detector()
    images = shape_images(3)
    root = tmp_path_factory.mktemp("det")
    full = export_onnx(model, images, root / "full.onnx", "detect", threads=1)
    raw = export_onnx(model, images, root / "raw.onnx", "detect", dynamic_batch=True, mode="raw", threads=1)
    return model, images, full, raw


def test_detector_full_graph_same_detections(detector):
    model, images, full, _ = detector
    p = full["parity"]
    assert p["matched"] == 1.0 and p["compared"] >= 100
    assert p["min_iou"] >= 0.99 and p["max_score_diff"] <= 1e-3
    assert full["input_shape"] == [1, 3, 160, 160] and full["arrays"] == {}
    nodes = [n.op_type for n in _all_nodes(onnx.load(full["path"]).graph)]
    assert "NonMaxSuppression" in nodes and "BatchNormalization" not in nodes
    with torch.no_grad():
        ref = model(images)
    got = OrtModel(full["path"], threads=1)(images)  # a batch runs image by image
    assert isinstance(got, list) and len(got) == len(ref) == 3
    for r, g in zip(ref, got):
        assert set(g) == set(r) == {"boxes", "scores", "labels"}
        for k in r:
            assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape


def test_detector_raw_heads_and_anchors_decode_like_the_full_graph(detector):
    model, images, full, raw = detector
    assert raw["parity"]["max_abs_diff"] <= ATOL and raw["parity"]["matched"] == 1.0
    anchors = torch.from_numpy(np.load(raw["arrays"]["anchors"]["path"]))
    assert raw["arrays"]["anchors"] == {"path": str(array_path(raw["path"], "anchors")),
                                        "shape": list(anchors.shape)}
    with torch.no_grad():
        regression, logits, sizes = model.head_outputs(images)
    assert torch.equal(anchors, model.anchors(sizes, (160, 160), "cpu"))
    ort_raw = OrtModel(raw["path"], threads=1)
    reg, log = (torch.from_numpy(a) for a in ort_raw.run(images))
    # The user's decoding: the model's own box coder over the raw outputs and the saved anchors
    boxes = model.box_coder.decode_single(reg[0], anchors)
    assert max_diff(boxes, model.box_coder.decode_single(regression[0], anchors)) <= 1e-3
    decoded = model.postprocess(reg, log, anchors, (160, 160))
    full_dets = OrtModel(full["path"], threads=1)(images)
    for d, f in zip(decoded, full_dets):
        s = match_detections(d, f, limit=model.detections_per_img)
        assert s["required"] > 0 and s["matched"] == s["required"]
    for n in (1, 3):  # dynamic batch
        out = ort_raw.run(shape_images(n))
        assert out[0].shape == (n, anchors.shape[0], 4) and out[1].shape == (n, anchors.shape[0], 5)


def test_match_detections_rules():
    ref = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]),
           "scores": torch.tensor([0.9, 0.0505, 0.3]), "labels": torch.tensor([1, 2, 3])}
    same = {k: v.clone() for k, v in ref.items()}
    same["scores"][1] = 0.0495  # rounds across the 0.05 threshold: not a miss
    assert match_detections(ref, same) == {"required": 4, "matched": 4, "min_iou": 1.0, "max_score_diff": 0.0}
    other = {k: v.clone() for k, v in ref.items()}
    other["labels"][2] = 4  # same box, other class
    other["boxes"][0] += 0.5  # IoU ~0.9
    s = match_detections(ref, other)
    assert s["required"] == 4 and s["matched"] == 0 and s["min_iou"] < 0.99


# --- failures ------------------------------------------------------------------------------------

def _perturbed_copy(src, dst, name_part: str, delta: float) -> None:
    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if name_part in i.name)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))


def test_parity_check_fails_on_an_altered_classifier(classifier, tmp_path):
    model, path, _ = classifier
    bad = tmp_path / "bad.onnx"
    _perturbed_copy(path, bad, "head.weight", 0.05)
    with pytest.raises(ParityError, match="bad.onnx: ONNX output differs") as e:
        check_onnx(model, bad, digit_images(0, 4), "classify", threads=1)
    assert isinstance(e.value, UserError)


def test_parity_check_fails_on_an_altered_detector(detector, tmp_path):
    model, images, full, _ = detector
    bad = tmp_path / "bad_det.onnx"
    graph = onnx.load(full["path"]).graph
    name = next(i.name for i in graph.initializer if i.name.startswith("detector.cls_heads.0") and "bias" in i.name)
    _perturbed_copy(full["path"], bad, name, 3.0)  # one anchor shape's score for class 0 everywhere
    with pytest.raises(ParityError, match="have no match"):
        check_onnx(model, bad, images, "detect", threads=1)


def test_user_errors(detector, tmp_path):
    model, images, _, raw = detector
    with pytest.raises(ExportError, match="task 'segment2d'"):
        export_onnx(model, images, tmp_path / "x.onnx", "segment2d")
    with pytest.raises(ExportError, match="takes one sample at a time"):
        export_onnx(model, images, tmp_path / "x.onnx", "detect", dynamic_batch=True)
    with pytest.raises(ExportError, match="detector mode must be 'full' or 'raw', got 'boxes'"):
        export_onnx(model, images, tmp_path / "x.onnx", "detect", mode="boxes")
    with pytest.raises(ExportError, match="task 'classify' exports one graph"):
        export_onnx(model, images, tmp_path / "x.onnx", "classify", mode="raw")
    with pytest.raises(ExportError, match="dynamic_spatial"):
        export_onnx(model, images, tmp_path / "x.onnx", "detect", dynamic_spatial=True)
    with pytest.raises(OnnxModelError, match="missing.onnx: ONNX file not found"):
        OrtModel(tmp_path / "missing.onnx")
    shutil.copyfile(raw["path"], tmp_path / "alone.onnx")  # without its anchors file
    with pytest.raises(OnnxModelError, match="alone.anchors.npy: the anchors of alone.onnx not found"):
        OrtModel(tmp_path / "alone.onnx")
