"""The segment task: folder data and its one-line errors, transforms that keep masks on their pixels,
the mIoU metric and the ignore label, whole vs sliding-window inference, and train -> eval -> predict
-> export -> eval in ONNX Runtime from the command line on a few tiny images."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from mobilezoo.cli import main
from mobilezoo.errors import BadSampleError, DataError, RecipeError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import TASKS, build_task
from mobilezoo.tasks.segmentation import (
    IGNORE,
    EvalTransform,
    SegmentationMetric,
    SegmentationTask,
    check_options,
    collate_segmentation,
    train_transform,
)
from mobilezoo.tasks.segmentation.infer import image_logits

CLASSES = ["background", "square", "bar"]
SMALL_MODEL = ("{backbone: tiny_moat_0, aspp_channels: 16, decoder_channels: 16, low_level_channels: 8}")


@pytest.fixture(autouse=True)
def _torch_globals(monkeypatch, tmp_path):
    """One thread, a private cache; restore threads and autograd (predict switches it off)."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


def _sample(rng, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a red square (class 1) and a blue bar (class 2), and its mask."""
    image = rng.integers(60, 110, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    s = int(rng.integers(h // 4, h // 2))
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w // 2 - s // 2))
    image[y: y + s, x: x + s] = (220, 30, 30)
    mask[y: y + s, x: x + s] = 1
    bx = int(rng.integers(w // 2 + 2, w - 6))
    image[:, bx: bx + 5] = (30, 30, 220)
    mask[:, bx: bx + 5] = 2
    mask[0, :] = IGNORE  # a labelled border row, as VOC's object outlines
    return image, mask


def write_folder(root: Path, counts=(("train", 6), ("val", 4)), seed: int = 0) -> Path:
    """classes.txt and {split}/{images,masks}: JPEG and PNG images of several sizes, palette masks."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    sizes = [(48, 64), (64, 48), (56, 56), (40, 72)]
    for split, n in counts:
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = _sample(rng, *sizes[i % len(sizes)])
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.{ext}")
            m = Image.fromarray(mask, mode="P")
            m.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255] * 759)  # all 256 entries, or Pillow remaps 255
            m.save(root / split / "masks" / f"{i:03d}.png")
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return write_folder(tmp_path / "data")


def _task(root: Path, **over) -> SegmentationTask:
    recipe = load_recipe("segment_shapes", {"data.name": str(root), "data.img_size": 64,
                                            "data.augment.resize": 64, **over})
    return build_task(recipe)


# --- the metric ---------------------------------------------------------------------------------

def _one_hot(pred: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(pred, k).permute(2, 0, 1).float()


def test_metric_on_a_hand_made_three_class_confusion():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    m = SegmentationMetric(3)
    m.update(_one_hot(pred, 3), target)
    out = m.compute()
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]  # rows true, columns predicted
    # IoU = tp / (true + predicted - tp): 1/3, 2/3, 2/3
    assert out["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert out["miou"] == pytest.approx(5 / 9) and out["pixel_acc"] == pytest.approx(5 / 7)
    assert out["mean_acc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert out["pixels"] == 7 and out["count"] == 1


def test_absent_classes_leave_the_mean_and_false_positives_enter_it():
    target = torch.tensor([[0, 0, 1, 1]])
    m = SegmentationMetric(4)
    m.update(_one_hot(target, 4), target)
    out = m.compute()
    assert out["per_class_iou"] == [1.0, 1.0, None, None] and out["miou"] == 1.0
    m.update(_one_hot(torch.tensor([[0, 0, 1, 3]]), 4), target)  # class 3 predicted, never true
    out = m.compute()
    assert out["per_class_iou"][3] == 0.0 and out["miou"] == pytest.approx((1 + 3 / 4 + 0) / 3)


def test_metric_state_sums_like_the_ranks_reduce_it():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    whole, halves = SegmentationMetric(3), [SegmentationMetric(3), SegmentationMetric(3)]
    for i in range(4):
        whole.update(logits[i], target[i])
        halves[i % 2].update(logits[i], target[i])
    for key in halves[0].state:  # what all_reduce_sum does over two ranks
        halves[0].state[key] = halves[0].state[key] + halves[1].state[key]
    a, b = whole.compute(), halves[0].compute()
    assert a["confusion"] == b["confusion"] and a["miou"] == pytest.approx(b["miou"])
    assert a["loss"] == pytest.approx(b["loss"]) and b["count"] == 4


def test_ignored_pixels_count_in_neither_loss_nor_metric(root):
    task = _task(root)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[:, 0] = IGNORE
    loss = task.loss(lambda x: logits, {"image": torch.zeros(2, 3, 4, 4), "mask": mask})
    keep = mask != IGNORE
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], mask[keep])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad[:, :, 0].abs().sum() == 0 and logits.grad[:, :, 1:].abs().sum() > 0
    all_ignored = torch.full((2, 4, 4), IGNORE)
    assert task.loss(lambda x: logits, {"image": None, "mask": all_ignored}).item() == 0.0  # not NaN
    a, b = SegmentationMetric(3), SegmentationMetric(3)
    flipped = logits.detach().clone()
    flipped[:, :, 0] = -flipped[:, :, 0]  # other predictions on the ignored row only
    a.update(logits[0].detach(), mask[0])
    b.update(flipped[0], mask[0])
    assert a.compute()["confusion"] == b.compute()["confusion"] and a.compute()["pixels"] == 12


# --- data and its errors ------------------------------------------------------------------------

def test_folder_data_batches_with_masks_at_their_own_size(root):
    task = _task(root)
    train, val = task.datasets()
    assert task.recipe.data.class_names == CLASSES and (len(train), len(val)) == (6, 4)
    batch = collate_segmentation([train[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["mask"].shape == (3, 64, 64)
    batch = collate_segmentation([val[i] for i in range(2)])
    assert batch["valid"].tolist() == [[48, 64], [64, 48]] and batch["size"].tolist() == [[48, 64], [64, 48]]
    assert batch["mask"].shape == (2, 64, 64)  # padded to the largest with the ignore label
    assert (batch["mask"][0, 48:] == IGNORE).all() and (batch["mask"][1, :, 48:] == IGNORE).all()
    truth = np.asarray(Image.open(root / "val" / "masks" / "001.png"))
    assert batch["mask"][1, :64, :48].numpy().tolist() == truth.tolist()  # palette indices, not colours


def _break(root: Path, how: str) -> str:
    """Spoil val sample 001 in one way; return the message expected."""
    mask = root / "val" / "masks" / "001.png"
    if how == "missing":
        mask.unlink()
        return f"{mask}: mask not found"
    if how == "size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
        return f"{mask}: mask is 12x10 but its image 001.png is 48x64"
    if how == "index":
        a = np.asarray(Image.open(mask)).copy()
        a[5, 5], a[6, 6] = 7, 3
        Image.fromarray(a).save(mask)
        return f"{mask}: class index 3, 7 out of range (expected 0..2 for 3 classes, or 255 = ignore)"
    if how == "rgb":
        Image.new("RGB", (48, 64)).save(mask)
        return f"{mask}: mask is RGB; expected a single-channel PNG"
    mask.write_bytes(b"\x89PNG not really")
    return f"{mask}: cannot read mask"


@pytest.mark.parametrize("how", ["missing", "size", "index", "rgb", "corrupt"])
def test_bad_samples_name_the_file_in_one_line_or_are_skipped(root, how):
    expected = _break(root, how)
    val = _task(root).val_dataset()
    with pytest.raises(BadSampleError) as e:
        val[1]
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    val = _task(root, **{"data.skip_bad_samples": True}).val_dataset()
    batch = collate_segmentation([val[i] for i in range(4)])
    assert batch["skipped"] == 1 and len(batch["image"]) == 3


@pytest.mark.parametrize("spoil, message", [
    (lambda r: (r / "classes.txt").unlink(), "classes.txt: not found"),
    (lambda r: (r / "classes.txt").write_text("only\n"), "expected at least 2 non-empty class names"),
    (lambda r: [p.unlink() for p in (r / "val" / "images").iterdir()], "images: no images"),
    (lambda r: (r / "train" / "images").rename(r / "train" / "imgs"), "train/images: no such folder"),
])
def test_layout_errors_name_the_file(root, spoil, message):
    spoil(root)
    with pytest.raises(DataError, match=message):
        _task(root).datasets()


def test_reduce_zero_label_and_16_bit_masks(root):
    mask = root / "val" / "masks" / "000.png"
    a = np.asarray(Image.open(mask)).astype(np.uint16)
    Image.fromarray(np.where(a == IGNORE, 0, a + 1).astype(np.uint16)).save(mask)  # ADE20K style, 16-bit
    val = _task(root, **{"data.augment.reduce_zero_label": True}).val_dataset()
    got = val[0]["mask"].numpy()
    assert got.tolist() == a.astype(np.int64).tolist()  # 0 -> ignore, k + 1 -> k


# --- transforms and inference -------------------------------------------------------------------

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _labels_of(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels read back from the normalised image of `_encoded` (grey level 60 x label + 20), and
    where the grey is a pure level (not an edge blended by resizing)."""
    level = ((image[0] * STD[0] + MEAN[0]) * 255 - 20) / 60
    return level.round().long(), (level - level.round()).abs() < 0.05


def _encoded(h=60, w=90) -> dict:
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[10:40, 5:45], mask[:, 60:80] = 1, 2
    image = (mask.float() * 60 + 20).to(torch.uint8).expand(3, h, w).clone()
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


def test_train_transform_keeps_masks_on_their_pixels_and_pads_with_ignore():
    torch.manual_seed(0)
    tf = train_transform(64, check_options({"scale": [0.5, 2.0]}, 64), MEAN, STD)
    padded = 0
    for _ in range(12):
        out = tf(_encoded())
        image, mask = out["image"], out["mask"]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE}
        labelled = mask != IGNORE
        labels, pure = _labels_of(image)
        assert pure[labelled].float().mean() > 0.8  # edges blended by the bilinear resize aside
        assert (labels == mask)[labelled & pure].all()
        pad = ~labelled
        padded += int(pad.sum())
        assert torch.allclose(image[:, pad], torch.zeros(()), atol=0.02)  # the mean pixel: 0 after normalising
    assert padded > 0  # some scales fall below the crop


def test_flip_moves_image_and_mask_together():
    outs = []
    for p in (0.0, 1.0):  # the same seed: the same crop, then a flip or none
        tf = train_transform(64, check_options({"scale": [1, 1], "hflip": p, "resize": 90}, 64), MEAN, STD)
        torch.manual_seed(1)
        outs.append(tf(_encoded()))
    kept, flipped = outs
    assert torch.equal(flipped["mask"], kept["mask"].flip(-1)) and not torch.equal(flipped["mask"], kept["mask"])
    torch.testing.assert_close(flipped["image"], kept["image"].flip(-1))


def test_eval_transform_fits_the_image_into_the_square_and_keeps_the_mask():
    out = EvalTransform(64, MEAN, STD)(_encoded(60, 90))
    assert out["valid"].tolist() == [43, 64] and out["size"].tolist() == [60, 90]
    assert out["image"].shape == (3, 64, 64) and (out["image"][:, 43:] == 0).all()
    assert out["mask"].shape == (60, 90)


def test_whole_and_sliding_window_inference_agree_for_a_pointwise_model():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).eval()  # per-pixel: any tiling must give the same logits
    tf = EvalTransform(96, MEAN, STD)
    image = torch.randint(0, 255, (3, 70, 100), dtype=torch.uint8)
    x, hw = tf.fit(image)
    opts = check_options({}, 32)
    with torch.no_grad():
        whole = image_logits(model, x[None], [hw], [(70, 100)], opts)[0]
        slide = image_logits(model, x[None], [hw], [(70, 100)], {**opts, "eval_mode": "slide"})[0]
    assert whole.shape == slide.shape == (4, 70, 100)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=0)
    fitted = model(x[None, :, : hw[0], : hw[1]])
    assert torch.allclose(F.interpolate(fitted, size=(70, 100), mode="bilinear"), whole[None], atol=1e-5)


def test_slide_mode_exports_calibrates_and_runs_on_windows(root, tmp_path):
    from mobilezoo.deploy.export import export_onnx
    from mobilezoo.deploy.ort import OrtModel
    from mobilezoo.engine.loop import Context, eval_loader, evaluate
    whole = _task(root)
    assert whole.input_shape() == (3, 64, 64) and whole.example_inputs(2).shape == (2, 3, 64, 64)
    task = _task(root, **{"data.augment.eval_mode": "slide", "data.augment.crop": 32, "data.augment.stride": 24})
    x = task.example_inputs(3)
    assert task.input_shape() == (3, 32, 32) and x.shape == (3, 3, 32, 32)
    torch.testing.assert_close(x, whole.example_inputs(3)[..., :32, :32])  # each image's first window
    big = _task(root, **{"data.augment.eval_mode": "slide", "data.augment.crop": 80}).example_inputs(1)
    assert big.shape == (1, 3, 80, 80) and (big[..., 64:, :] == 0).all()  # padded as the sliding window pads
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    export_onnx(model, x, tmp_path / "m.onnx", task, dynamic_batch=True, threads=1)
    ctx = Context(torch.device("cpu"))
    loader = eval_loader(task, task.val_dataset(), task.recipe, ctx)
    ours, theirs = evaluate(model, loader, task, ctx), evaluate(OrtModel(tmp_path / "m.onnx", threads=1), loader,
                                                                 task, ctx)
    assert theirs["confusion"] == ours["confusion"] and theirs["pixels"] == ours["pixels"] > 0


@pytest.mark.parametrize("options, message", [
    ({"tile": 1}, "unknown option"), ({"eval_mode": "tiles"}, "whole or slide"),
    ({"crop": 32, "stride": 40}, "larger than the window"), ({"scale": [2.0, 1.0]}, "0 < low <= high"),
    ({"hflip": 2}, "probability"),
])
def test_options_are_checked(options, message):
    with pytest.raises((DataError, RecipeError), match=message):
        check_options(options, 64)


def test_registered_with_its_recipe():
    assert TASKS["segment"] is SegmentationTask
    r = load_recipe("segment_shapes")
    assert (r.task, r.model.name, r.data.name) == ("segment", "deeplabv3plus", "shapes-seg")
    task = build_task(r)
    assert task.input_shape() == (3, 224, 224)  # the eval square the export takes, not the training crop
    assert task.eval_transform().side == 224 and r.data.img_size == 160


# --- the command line ---------------------------------------------------------------------------

def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    out, err = capsys.readouterr()
    return rc, out, err


def train_argv(root: Path, run: Path, epochs: int = 1) -> list[str]:
    """`mobilezoo train` of the small model on a `write_folder` set: 64 px crops of images fitted into 64 px."""
    return [str(a) for a in ("train", "segment_shapes", "--data", root, "--epochs", epochs, "--img-size", 64,
                             "--batch-size", 3, "--threads", 1, "--out", run, "--set", f"model.args={SMALL_MODEL}",
                             "--set", "train.bn_recalibrate=2", "--set", "data.augment.resize=64")]


def test_train_eval_predict_export_from_the_command_line(root, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = _cli(capsys, *train_argv(root, run))
    assert rc == 0, err
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_count"] == 4 and 0 <= record["val_miou"] <= 1 and math.isfinite(record["val_loss"])
    assert (run / "iou.png").is_file() and (run / "segmentations.png").is_file()

    rc, out, err = _cli(capsys, "eval", run, "--json")
    assert rc == 0, err
    torch_metrics = json.loads(out)
    assert torch_metrics["miou"] == pytest.approx(record["val_miou"], abs=1e-9)
    assert len(torch_metrics["per_class_iou"]) == 3 and torch_metrics["pixels"] > 0

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    sizes = {"wide.jpg": (37, 91), "tall.png": (80, 33)}
    for name, (h, w) in sizes.items():
        Image.fromarray(_sample(rng, h, w)[0]).save(inputs / name)
    (inputs / "broken.png").write_bytes(b"not an image")
    pred = tmp_path / "pred"
    rc, _, err = _cli(capsys, "predict", run, inputs, "--out", pred)
    assert rc == 2 and "broken.png: cannot read image" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(capsys, "predict", run, inputs, "--out", pred, "--skip-bad-samples")
    assert rc == 0, err
    assert "skipped" in err and "broken.png" in err
    for name, (h, w) in sizes.items():
        stem = Path(name).stem
        with Image.open(pred / f"{stem}.png") as m:
            assert m.mode == "P" and m.size == (w, h)  # class indices at the input's own size
            assert np.asarray(m).max() < len(CLASSES)
        with Image.open(pred / f"{stem}_overlay.png") as o:
            assert o.size == (w, h)
        assert f"{stem}.png ({w}x{h})" in out
    assert "2 masks and overlays written" in out

    rc, out, err = _cli(capsys, "export", run, "--check-samples", 2, "--int8", "--calib-samples", 4)
    assert rc == 0, err
    assert "passed" in out and (run / "model.onnx").is_file() and (run / "model.int8.onnx").is_file()
    compared = json.loads((run / "model.int8.json").read_text())  # fp32 and INT8 on the val split
    assert compared["metric"] == "miou" and compared["rows"]["int8"]["count"] == 4
    assert compared["rows"]["fp32"]["metric"] == pytest.approx(torch_metrics["miou"], abs=1e-3)
    assert f"int8: val miou {compared['rows']['int8']['metric']:.4f}" in out
    rc, out, err = _cli(capsys, "eval", run, "--runtime", "onnxruntime", "--json", "--out", tmp_path / "ort")
    assert rc == 0, err
    ort_metrics = json.loads(out)
    assert ort_metrics["miou"] == pytest.approx(torch_metrics["miou"], abs=1e-3)
    assert ort_metrics["pixels"] == torch_metrics["pixels"]
    # evaluated at another size than exported: one line naming the file and both sizes
    rc, _, err = _cli(capsys, "eval", run, "--runtime", "onnxruntime", "--set", "data.augment.resize=48")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "model.onnx: the graph takes samples of 3x64x64, got 3x48x48" in err
