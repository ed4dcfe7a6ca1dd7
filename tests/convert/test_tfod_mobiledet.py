"""The OD API SSDLite-MobileDet converter, checked against names written here from the official
rules (tensorflow/models `ssd_mobiledet_feature_extractor.py`, `multi_resolution_feature_maps`, the
depthwise `ConvolutionalBoxPredictor`), TF's anchors and FasterRcnnBoxCoder written in numpy, and
the fixture's name list."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilezoo.convert.tfod_mobiledet import tfod_mobiledet_state_dict
from mobilezoo.models.mobiledet import ARCHS
from mobilezoo.models.registry import create_model
from mobilezoo.models.weights import CheckpointError

FIXTURE = Path(__file__).parents[1] / "fixtures" / "official" / "tfod_ssdlite_mobiledet_cpu"
NAMES = json.loads((FIXTURE / "names.json").read_text())
CPU = "FeatureExtractor/MobileDetCPU"


def build(arch: str, device: str = "cpu"):
    """The model `mobilezoo convert` builds; on the meta device (no init, instant) where shapes suffice."""
    with torch.device(device):
        return create_model(f"ssdlite_mobiledet_{arch}", num_classes=90, background_class=True)


def random_tensors(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays of these TF shapes (positive BN variances, small enough for a finite forward)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "global_step":
            out[name] = np.array(400000, np.int64)
        elif name.endswith("moving_variance"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def cpu_tensors():
    return random_tensors(NAMES["all"])


@pytest.fixture(scope="module")
def cpu_model():
    """One real model for the module (building one takes seconds here); tests load before they look."""
    return build("cpu")


def layer_indices(arch: str, kind: str) -> list[int]:
    """Indices in our backbone of the layers of one type, in build order (TF numbers them so)."""
    return [i for i, layer in enumerate(ARCHS[arch]) if layer["type"] == kind]


def oihw(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(w.transpose(3, 2, 0, 1))


def depthwise(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(w.transpose(2, 3, 0, 1))


def test_every_fixture_name_maps_for_cpu(cpu_tensors, cpu_model):
    model = cpu_model
    state = tfod_mobiledet_state_dict(cpu_tensors, model, "cpu")
    model.load_state_dict(state, strict=True)
    assert len(cpu_tensors) == NAMES["n_entries"] == 506
    values = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert values == sum(math.prod(s) for n, s in NAMES["all"].items() if n != "global_step") == 4_205_423

    ibn, noexp = layer_indices("cpu", "ibn"), layer_indices("cpu", "ibn_noexp")[0]
    sd = model.state_dict()
    t = cpu_tensors
    # IBN with SE: body = expand 1x1 (Conv), depthwise (SeparableConv2d), SqueezeExcite, project (Conv_1)
    assert torch.equal(sd[f"backbone.layers.{ibn[5]}.body.1.0.weight"],
                       depthwise(t[f"{CPU}/IBN_5/SeparableConv2d/depthwise_weights"]))
    assert sd[f"backbone.layers.{ibn[5]}.body.1.0.weight"].shape == (256, 1, 5, 5)
    assert torch.equal(sd[f"backbone.layers.{ibn[5]}.body.3.0.weight"], oihw(t[f"{CPU}/IBN_5/Conv_1/weights"]))
    assert torch.equal(sd[f"backbone.layers.{ibn[0]}.body.0.1.running_mean"],
                       torch.from_numpy(t[f"{CPU}/IBN/Conv/BatchNorm/moving_mean"]))
    assert torch.equal(sd[f"backbone.layers.{ibn[17]}.body.2.expand.bias"],
                       torch.from_numpy(t[f"{CPU}/IBN_17/SqueezeExcite/Conv_1/biases"]))
    # IBNNoExpansion: depthwise (SeparableConv2d), SqueezeExcite, project (Conv); the stem is Conv
    assert torch.equal(sd[f"backbone.layers.{noexp}.body.2.1.running_var"],
                       torch.from_numpy(t[f"{CPU}/IBNNoExpansion/Conv/BatchNorm/moving_variance"]))
    assert torch.equal(sd[f"backbone.layers.{noexp}.body.1.reduce.weight"],
                       oihw(t[f"{CPU}/IBNNoExpansion/SqueezeExcite/Conv/weights"]))
    assert torch.equal(sd["backbone.layers.0.0.weight"], oihw(t[f"{CPU}/Conv/weights"]))
    # extra layers: the second one (map 3) is 1x1 to 128, depthwise s2, 1x1 to 256
    assert torch.equal(sd["extras.1.1.0.weight"],
                       depthwise(t[f"{CPU}/C5_2_Conv2d_3_3x3_s2_256_depthwise/depthwise_weights"]))
    assert torch.equal(sd["extras.0.0.1.weight"], torch.from_numpy(t[f"{CPU}/C5_1_Conv2d_2_1x1_256/BatchNorm/gamma"]))
    # class head: same channel layout (anchor-major, then the 91 slots)
    assert torch.equal(sd["cls_heads.0.1.weight"], oihw(t["BoxPredictor_0/ClassPredictor/weights"]))
    assert torch.equal(sd["cls_heads.0.1.bias"], torch.from_numpy(t["BoxPredictor_0/ClassPredictor/biases"]))
    assert torch.equal(sd["cls_heads.3.0.0.weight"],
                       depthwise(t["BoxPredictor_3/ClassPredictor_depthwise/depthwise_weights"]))
    # box head: per anchor, ours [dx, dy, dw, dh] <- TF [ty, tx, th, tw]
    w, b = t["BoxPredictor_1/BoxEncodingPredictor/weights"], t["BoxPredictor_1/BoxEncodingPredictor/biases"]
    ours_w, ours_b = sd["box_heads.1.1.weight"], sd["box_heads.1.1.bias"]
    for a in range(6):
        for ours_code, tf_code in ((0, 1), (1, 0), (2, 3), (3, 2)):
            assert ours_b[4 * a + ours_code] == float(b[4 * a + tf_code])
            assert torch.equal(ours_w[4 * a + ours_code, :, 0, 0], torch.from_numpy(w[0, 0, :, 4 * a + tf_code]))


def test_missing_unexpected_and_misshaped_names_in_one_error(cpu_tensors, cpu_model):
    tensors = dict(cpu_tensors)
    del tensors[f"{CPU}/IBN_3/Conv/weights"]
    tensors[f"{CPU}/IBN_18/Conv/weights"] = np.zeros((1, 1, 144, 64), np.float32)
    tensors["BoxPredictor_0/ClassPredictor/biases"] = np.zeros(270, np.float32)
    tensors[f"{CPU}/IBN/Conv/weights/Momentum"] = np.zeros((1, 1, 8, 32), np.float32)  # bookkeeping: ignored
    with pytest.raises(CheckpointError) as e:
        tfod_mobiledet_state_dict(tensors, cpu_model, "cpu", where="ckpt")
    msg = str(e.value)
    assert f"{CPU}/IBN_3/Conv/weights" in msg and f"{CPU}/IBN_18/Conv/weights" in msg
    assert "BoxPredictor_0/ClassPredictor/biases (270,)" in msg and "(273,)" in msg
    assert "Momentum" not in msg and "global_step" not in msg


def test_long_lists_are_truncated(cpu_tensors, cpu_model):
    tensors = {k: v for k, v in cpu_tensors.items() if "/IBN_" not in k}
    with pytest.raises(CheckpointError, match="more") as e:
        tfod_mobiledet_state_dict(tensors, cpu_model, "cpu")
    assert len(str(e.value)) < 5000


def test_ema_copies(cpu_tensors, cpu_model):
    model = cpu_model
    with pytest.raises(CheckpointError, match="ExponentialMovingAverage"):
        tfod_mobiledet_state_dict(cpu_tensors, model, "cpu", ema=True)
    averaged = {f"{n}/ExponentialMovingAverage": v + 1 for n, v in cpu_tensors.items()
                if n != "global_step" and not n.endswith(("moving_mean", "moving_variance"))}
    tensors = {**cpu_tensors, **averaged}
    ema = tfod_mobiledet_state_dict(tensors, model, "cpu", ema=True)
    raw = tfod_mobiledet_state_dict(tensors, model, "cpu")
    assert torch.equal(ema["backbone.layers.0.0.weight"], oihw(cpu_tensors[f"{CPU}/Conv/weights"] + 1))
    assert torch.equal(raw["backbone.layers.0.0.weight"], oihw(cpu_tensors[f"{CPU}/Conv/weights"]))
    stats = f"{CPU}/Conv/BatchNorm/moving_variance"  # no EMA copy of BN statistics: read raw
    assert torch.equal(ema["backbone.layers.0.1.running_var"], torch.from_numpy(cpu_tensors[stats]))


def test_refuses_a_model_without_the_background_slot(cpu_tensors):
    with torch.device("meta"):
        model = create_model("ssdlite_mobiledet_cpu", num_classes=90)
    with pytest.raises(CheckpointError, match="background_class"):
        tfod_mobiledet_state_dict(cpu_tensors, model, "cpu")


# TF's anchors and box decoding, from the official sources (create_ssd_anchors, tile_anchors,
# FasterRcnnBoxCoder._decode), for the ssdlite_mobiledet configs.
def tf_box_specs(num_layers=6, min_scale=0.2, max_scale=0.95, aspect_ratios=(1.0, 2.0, 0.5, 3.0, 0.3333)):
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    specs = []
    for layer, (scale, scale_next) in enumerate(zip(scales[:-1], scales[1:])):
        if layer == 0:  # reduce_boxes_in_lowest_layer
            specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
        else:
            specs.append([(scale, ar) for ar in aspect_ratios] + [(np.sqrt(scale * scale_next), 1.0)])
    return specs


def tf_anchors(sizes) -> np.ndarray:
    """[ymin, xmin, ymax, xmax] normalised, order: layer, y, x, box spec."""
    out = []
    for (gh, gw), spec in zip(sizes, tf_box_specs()):
        scales, ratios = np.array([s for s, _ in spec]), np.sqrt([r for _, r in spec])
        heights, widths = scales / ratios, scales * ratios
        for y in range(gh):
            for x in range(gw):
                cy, cx = (y + 0.5) / gh, (x + 0.5) / gw
                out += [[cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2] for h, w in zip(heights, widths)]
    return np.array(out)


def tf_decode(codes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    ycenter_a, xcenter_a = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ty, tx, th, tw = codes[:, 0] / 10, codes[:, 1] / 10, codes[:, 2] / 5, codes[:, 3] / 5
    w, h = np.exp(tw) * wa, np.exp(th) * ha
    ycenter, xcenter = ty * ha + ycenter_a, tx * wa + xcenter_a
    return np.stack([ycenter - h / 2, xcenter - w / 2, ycenter + h / 2, xcenter + w / 2], 1)


def test_box_codes_anchors_and_class_slots_match_tf(cpu_tensors, cpu_model):
    rng = np.random.default_rng(1)
    tensors = dict(cpu_tensors)
    heads = []  # per map: TF box codes [A, 4] of every location, and its class biases [A, 91]
    for n in range(6):
        box, cls = f"BoxPredictor_{n}/BoxEncodingPredictor", f"BoxPredictor_{n}/ClassPredictor"
        tensors[f"{box}/weights"] = np.zeros_like(tensors[f"{box}/weights"])  # outputs = biases everywhere
        tensors[f"{cls}/weights"] = np.zeros_like(tensors[f"{cls}/weights"])
        codes = rng.normal(0, 1, tensors[f"{box}/biases"].shape).astype(np.float32)
        logits = np.full(tensors[f"{cls}/biases"].shape, -10, np.float32)
        tensors[f"{box}/biases"], tensors[f"{cls}/biases"] = codes, logits
        heads.append((codes.reshape(-1, 4), logits.reshape(-1, 91)))
    dog, person = 18, 1  # COCO category ids = TF class slots
    heads[5][1][1, dog] = 10.0  # the 1x1 map: one location, so one anchor scores high
    heads[5][1][3, 0] = 20.0  # background: never reported
    heads[5][1][4, person] = 5.0
    model = cpu_model
    model.load_state_dict(tfod_mobiledet_state_dict(tensors, model, "cpu"), strict=True)
    model.eval()
    images = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        regression, logits, sizes = model.head_outputs(images)
        detections = model(images)[0]
    assert sizes == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    anchors_tf = tf_anchors(sizes)
    assert anchors_tf.shape == (2034, 4)
    anchors = model.anchors(sizes, (320, 320), images.device)
    np.testing.assert_allclose(anchors[:, [1, 0, 3, 2]].numpy() / 320, anchors_tf, atol=1e-6)  # same order
    codes_tf = np.concatenate([np.tile(c, (h * w, 1)) for (c, _), (h, w) in zip(heads, sizes)])
    boxes_tf = tf_decode(codes_tf, anchors_tf)
    boxes = model.box_coder.decode_single(regression[0], anchors)
    np.testing.assert_allclose(boxes[:, [1, 0, 3, 2]].numpy() / 320, boxes_tf, atol=2e-5)
    logits_tf = np.concatenate([np.tile(c, (h * w, 1)) for (_, c), (h, w) in zip(heads, sizes)])
    np.testing.assert_array_equal(logits[0].numpy(), logits_tf)  # slot i is our column i
    # eval output: background dropped, slot i -> label i - 1, box as TF decodes and clips it
    assert detections["labels"][0] == dog - 1
    assert detections["scores"][0] == pytest.approx(1 / (1 + math.exp(-10)))
    expected = np.clip(boxes_tf[2028 + 1], 0, 1)[[1, 0, 3, 2]] * 320
    np.testing.assert_allclose(detections["boxes"][0].numpy(), expected, atol=1e-3)
    assert detections["labels"][1] == person - 1
    assert detections["scores"][1] == pytest.approx(1 / (1 + math.exp(-5)))


# The other backbones: TF names walked from the official block sequence and block functions.
SCOPES = {"dsp": "MobileDetDSP", "edgetpu": "MobileDetEdgeTPU", "gpu": "MobileDetGPU"}
BLOCK_NAMES = {"ibn": "IBN", "ibn_noexp": "IBNNoExpansion", "fused": "FusedConv", "tucker": "TuckerConv"}
# Each block function's slim layers in order, as our block's `body` holds them (no SE in these archs).
BLOCK_LAYERS = {"ibn": ("Conv", "SeparableConv2d", "Conv_1"), "ibn_noexp": ("SeparableConv2d", "Conv"),
                "fused": ("Conv", "Conv_1"), "tucker": ("Conv", "Conv_1", "Conv_2")}
BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def official_names(arch: str) -> dict[str, tuple[str, str]]:
    """TF name -> (our key, layout) for a whole SSDLite-MobileDet, from the naming rules."""
    root = f"FeatureExtractor/{SCOPES[arch]}"
    layers = [("backbone.layers.0", f"{root}/Conv", "conv")]  # the stem
    seen: dict[str, int] = {}
    for i, layer in enumerate(ARCHS[arch][1:], 1):
        kind = layer["type"]
        n = seen[kind] = seen.get(kind, -1) + 1
        block = f"{root}/{BLOCK_NAMES[kind]}" + (f"_{n}" if n else "")
        for j, scope in enumerate(BLOCK_LAYERS[kind]):
            layers.append((f"backbone.layers.{i}.body.{j}", f"{block}/{scope}",
                           "depthwise" if scope == "SeparableConv2d" else "conv"))
    for j, depth in enumerate((512, 256, 256, 128)):
        i = j + 2
        layers += [(f"extras.{j}.0", f"{root}/C5_1_Conv2d_{i}_1x1_{depth // 2}", "conv"),
                   (f"extras.{j}.1", f"{root}/C5_2_Conv2d_{i}_3x3_s2_{depth}_depthwise", "depthwise"),
                   (f"extras.{j}.2", f"{root}/C5_2_Conv2d_{i}_3x3_s2_{depth}", "conv")]
    names = {}
    for ours, tf, layout in layers:
        names[f"{tf}/{'depthwise_weights' if layout == 'depthwise' else 'weights'}"] = (f"{ours}.0.weight", layout)
        names.update({f"{tf}/BatchNorm/{b}": (f"{ours}.1.{a}", "vector") for a, b in BN.items()})
    for n in range(6):
        for ours, tf, codes in ((f"box_heads.{n}", f"BoxPredictor_{n}/BoxEncodingPredictor", True),
                                (f"cls_heads.{n}", f"BoxPredictor_{n}/ClassPredictor", False)):
            names[f"{tf}_depthwise/depthwise_weights"] = (f"{ours}.0.0.weight", "depthwise")
            names.update({f"{tf}_depthwise/BatchNorm/{b}": (f"{ours}.0.1.{a}", "vector") for a, b in BN.items()})
            names[f"{tf}/weights"] = (f"{ours}.1.weight", "box conv" if codes else "conv")
            names[f"{tf}/biases"] = (f"{ours}.1.bias", "box vector" if codes else "vector")
    return names


def to_tf(t: torch.Tensor, layout: str) -> np.ndarray:
    """Our tensor in TF's layout (box channels back in TF's [ty, tx, th, tw] order)."""
    a = t.numpy()
    if layout.startswith("box"):
        a = a.reshape(-1, 4, *a.shape[1:])[:, [1, 0, 3, 2]].reshape(a.shape)
    if layout.endswith("conv"):
        return a.transpose(2, 3, 1, 0).copy()
    return a.transpose(2, 3, 0, 1).copy() if layout == "depthwise" else a.copy()


@pytest.mark.parametrize("arch, spot_checks", [
    ("dsp", {"IBNNoExpansion/SeparableConv2d/depthwise_weights": (3, 3, 32, 1),
             "FusedConv/Conv/weights": (3, 3, 24, 96), "TuckerConv/Conv_2/weights": (1, 1, 24, 32),
             "TuckerConv_1/Conv/weights": (1, 1, 160, 120), "TuckerConv_1/Conv_1/weights": (3, 3, 120, 120),
             "IBN_10/Conv_1/weights": (1, 1, 1280, 240), "C5_1_Conv2d_2_1x1_256/weights": (1, 1, 240, 256)}),
    ("edgetpu", {"TuckerConv/Conv/weights": (1, 1, 32, 8), "TuckerConv/Conv_1/weights": (3, 3, 8, 16),
                 "FusedConv_4/Conv/weights": (5, 5, 16, 128), "IBN_10/Conv_1/weights": (1, 1, 960, 384),
                 "IBN_10/SeparableConv2d/depthwise_weights": (5, 5, 960, 1)}),
    ("gpu", {"TuckerConv/Conv_1/weights": (3, 3, 8, 8), "TuckerConv_3/Conv_2/weights": (1, 1, 8, 32),
             "FusedConv_16/Conv/weights": (3, 3, 128, 512), "IBN/Conv/weights": (1, 1, 128, 1024),
             "C5_1_Conv2d_2_1x1_256/weights": (1, 1, 384, 256)}),
])
def test_other_archs_round_trip(arch, spot_checks):
    torch.manual_seed(0)
    model = build(arch, "meta")
    original = {k: torch.randn(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    names = official_names(arch)
    tensors = {tf: to_tf(original[ours], layout) for tf, (ours, layout) in names.items()}
    for name, shape in spot_checks.items():  # shapes from the official block functions
        assert tensors[f"FeatureExtractor/{SCOPES[arch]}/{name}"].shape == shape, name
    tensors["global_step"] = np.array(1, np.int64)
    state = tfod_mobiledet_state_dict(tensors, model, arch)
    model.load_state_dict(state, strict=True, assign=True)
    assert len(names) == len(original)
    for ours, _ in names.values():
        assert torch.equal(state[ours], original[ours]), ours


def test_reads_the_official_layout_file():
    """The fixture checkpoint itself, through the TensorBundle reader (a sanity check of both)."""
    from mobilezoo.convert.tensorbundle import TensorBundle
    tensors = TensorBundle(FIXTURE / "model.ckpt").read_all()
    model = build("cpu", "meta")
    state = tfod_mobiledet_state_dict(tensors, model, "cpu")
    model.load_state_dict(state, strict=True, assign=True)
    assert {n: list(np.shape(v)) for n, v in tensors.items()} == NAMES["all"]
    assert torch.equal(state["cls_heads.5.1.bias"], torch.from_numpy(tensors["BoxPredictor_5/ClassPredictor/biases"]))


def test_cli_converts_the_fixture_into_a_detector_with_its_91_slots(tmp_path, capsys):
    from mobilezoo.cli import main
    from mobilezoo.models import create_model
    out = tmp_path / "mobiledet.safetensors"
    assert main(["convert", str(FIXTURE), "--out", str(out)]) == 0
    assert "ssdlite_mobiledet_cpu" in capsys.readouterr().out
    detector = create_model("ssdlite_mobiledet_cpu", checkpoint=out)  # 90 classes + background, from the metadata
    assert (detector.num_classes, detector.background) == (90, True)
    assert detector.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and detector.pretrained_cfg["input_size"] == (3, 320, 320)
    assert main(["convert", str(FIXTURE), "--model", "ssdlite_mobiledet_dsp", "--out", str(out)]) == 2
    assert "not a ssdlite_mobiledet_dsp" in capsys.readouterr().err
