"""Detection task: COCO loading and checks, transforms with boxes, collate, COCO mAP, and the
train/eval/predict contract through the task with a stand-in detector."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import box_convert

from mobilezoo.data import shapes
from mobilezoo.engine import fit
from mobilezoo.errors import BadSampleError, DataError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import TASKS, build_task
from mobilezoo.tasks.detection import (
    CocoAnnotations,
    CocoDetection,
    CocoMetric,
    DetectionTask,
    collate_detection,
    eval_transform,
    train_transform,
)
from mobilezoo.tasks.detection import task as task_module


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))


# --- a hand-made COCO dataset -------------------------------------------------------------------

CATS = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]  # unsorted, gaps


def _image(path: Path, w: int, h: int, boxes=()) -> Path:
    """A black w x h PNG with each xywh box painted white."""
    a = np.zeros((h, w, 3), np.uint8)
    for x, y, bw, bh in boxes:
        a[int(y): int(y + bh), int(x): int(x + bw)] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _write(root: Path, split: str, images: list[dict], anns: list[dict], cats=None, draw=True) -> Path:
    """Write root/split/<images> and root/annotations/instances_<split>.json; return the JSON path."""
    for im in images:
        if draw:
            boxes = [a["bbox"] for a in anns if a.get("image_id") == im["id"]]
            _image(root / split / im["file_name"], im["width"], im["height"], boxes)
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": CATS if cats is None else cats}))
    return path


def _img(i, w=40, h=30):
    return {"id": i, "file_name": f"im{i}.png", "width": w, "height": h}


def _ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


IMAGES = [_img(1), _img(2), _img(3, 50, 20)]
ANNS = [_ann(11, 1, 9, [2, 3, 10, 8]), _ann(12, 1, 5, [20, 10, 12, 15]),
        _ann(13, 2, 2, [5, 5, 10, 10]), _ann(14, 2, 9, [18, 2, 20, 20], iscrowd=1)]  # image 3: none


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    _write(root, "train", IMAGES, ANNS)
    _write(root, "val", IMAGES, ANNS)
    return root


def _anns(root, split="train"):
    return CocoAnnotations(root / "annotations" / f"instances_{split}.json")


# --- categories, crowd, empty images ------------------------------------------------------------

def test_category_ids_map_to_sorted_contiguous_labels_and_back(coco_root):
    a = _anns(coco_root)
    assert a.cat_ids == [2, 5, 9]
    assert a.class_names == ["two", "five", "nine"]
    assert a.cat_to_label == {2: 0, 5: 1, 9: 2}
    for cat in (2, 5, 9):
        assert a.label_to_cat(a.cat_to_label[cat]) == cat
    ds = CocoDetection(coco_root / "train", a, lambda s: s)
    assert ds.target(1)["labels"].tolist() == [2, 1]  # category 9 -> 2, category 5 -> 1


def test_targets_are_xyxy_crowd_excluded_empty_images_kept(coco_root):
    a = _anns(coco_root)
    ds = CocoDetection(coco_root / "train", a, eval_transform(40))
    assert len(ds) == 3
    t1 = ds.target(1)
    assert t1["boxes"].tolist() == [[2, 3, 12, 11], [20, 10, 32, 25]]
    t2 = ds.target(2)  # the crowd box (annotation 14) is not a training target
    assert t2["boxes"].tolist() == [[5, 5, 15, 15]] and t2["labels"].tolist() == [0]
    assert a.coco.anns[14]["iscrowd"] == 1  # but it stays in the evaluation ground truth
    item = ds[2]  # image 3 has no boxes at all and is still a sample
    assert item["image_id"] == 3
    assert item["target"]["boxes"].shape == (0, 4) and item["target"]["labels"].shape == (0,)
    assert item["target"]["labels"].dtype == torch.int64
    assert item["orig_size"].tolist() == [20, 50]
    assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32


# --- annotation errors --------------------------------------------------------------------------

BAD = [
    ("missing bbox", _ann(17, 1, 9, None), "missing key"),
    ("negative width", _ann(17, 1, 9, [5, 5, -3, 4]), "non-positive"),
    ("zero height", _ann(17, 1, 9, [5, 5, 3, 0]), "non-positive"),
    ("unknown category", _ann(17, 1, 4, [5, 5, 3, 4]), "unknown category_id 4"),
    ("unknown image", _ann(17, 99, 9, [5, 5, 3, 4]), "unknown image_id 99"),
    ("wholly outside", _ann(17, 1, 9, [45, 5, 3, 4]), "outside"),
    ("not four numbers", _ann(17, 1, 9, [5, 5, 3]), "four numbers"),
    ("bad crowd flag", _ann(17, 1, 9, [5, 5, 3, 4], iscrowd=2), "iscrowd"),
]


@pytest.mark.parametrize("name,ann,why", BAD, ids=[b[0] for b in BAD])
def test_bad_annotation_names_file_and_annotation_id(tmp_path, name, ann, why):
    if ann["bbox"] is None:
        del ann["bbox"]
    path = _write(tmp_path, "train", [_img(1)], [_ann(16, 1, 9, [1, 1, 4, 4]), ann], draw=False)
    with pytest.raises(DataError) as e:
        CocoAnnotations(path)
    msg = str(e.value)
    assert str(path) in msg and "annotation id 17" in msg and why in msg
    assert "annotation id 16" not in msg  # the good one is not blamed


def test_several_problems_listed_then_counted(tmp_path):
    bad = [_ann(100 + i, 1, 4, [1, 1, 2, 2]) for i in range(8)]
    path = _write(tmp_path, "train", [_img(1)], bad, draw=False)
    with pytest.raises(DataError) as e:
        CocoAnnotations(path)
    msg = str(e.value)
    assert all(f"annotation id {100 + i}" in msg for i in range(5))
    assert "annotation id 105" not in msg and "3 more" in msg


@pytest.mark.parametrize("doc,why", [
    ({"images": [], "annotations": []}, "categories"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 4}], "annotations": [], "categories": CATS},
     "image id 1: missing key(s) height"),
    ([1, 2], "JSON object"),
])
def test_malformed_file_names_it(tmp_path, doc, why):
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        CocoAnnotations(path)
    assert str(path) in str(e.value) and why in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CocoAnnotations(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoAnnotations(tmp_path / "x.json")


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path, caplog):
    anns = [_ann(1, 1, 9, [-4, 2, 10, 6]), _ann(2, 1, 2, [30, 20, 20, 20], area=150.0),
            _ann(3, 1, 5, [1, 1, 3, 3])]
    path = _write(tmp_path, "train", [_img(1)], anns)  # 40 x 30 image
    with caplog.at_level(logging.WARNING, logger="mobilezoo"):
        a = CocoAnnotations(path)
    assert a.fixes == {"clipped_boxes": 2}
    assert a.coco.anns[1]["bbox"] == [0, 2, 6, 6]  # x from -4 to 6 -> 0 to 6
    assert a.coco.anns[2]["bbox"] == [30, 20, 10, 10]
    assert a.coco.anns[2]["area"] == 100  # no more than the clipped box
    assert a.coco.anns[3]["bbox"] == [1, 1, 3, 3] and a.coco.anns[3]["area"] == 9  # area defaults to w*h
    logged = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert len(logged) == 1 and "clipped 2 boxes" in logged[0] and str(path) in logged[0]
    assert CocoDetection(tmp_path / "train", a, None).fixes == {"clipped_boxes": 2}


def test_missing_image_file_names_it_and_can_be_skipped(coco_root):
    (coco_root / "train" / "im2.png").unlink()
    a = _anns(coco_root)
    ds = CocoDetection(coco_root / "train", a, eval_transform(32))
    with pytest.raises(BadSampleError, match="im2.png"):
        ds[1]
    skipping = CocoDetection(coco_root / "train", a, eval_transform(32), skip_bad=True)
    items = [skipping[i] for i in range(len(skipping))]
    assert items[1] is None and items[0] is not None and items[2] is not None
    batch = collate_detection(items)
    assert batch["skipped"] == 1
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["image_id"].tolist() == [1, 3]
    assert batch["orig_size"].tolist() == [[30, 40], [20, 50]]
    assert isinstance(batch["target"], list) and len(batch["target"]) == 2
    assert batch["target"][1]["boxes"].shape == (0, 4)
    assert collate_detection([None, None]) == {"skipped": 2}


def test_image_size_differing_from_annotations_is_a_bad_sample(coco_root):
    _image(coco_root / "train" / "im1.png", 41, 30)
    ds = CocoDetection(coco_root / "train", _anns(coco_root), eval_transform(32))
    with pytest.raises(BadSampleError, match="im1.png.*41x30.*40x30"):
        ds[0]


# --- transforms ---------------------------------------------------------------------------------

def _sample(w=100, h=50, boxes=((10, 5, 30, 25),)):
    """A black image with white xyxy boxes, as the dataset hands it to the transform."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for x0, y0, x1, y1 in boxes:
        img[:, y0:y1, x0:x1] = 255
    return {"image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.arange(len(boxes))}


def test_hflip_then_resize_by_hand():
    """100x50 image, box x 10..30, y 5..25. Flip: x -> 100 - x, so 70..90. Resize to 200x200:
    x doubles (140..180), y quadruples (20..100)."""
    out = train_transform(200, {"hflip": 1.0, "ssd_crop": 0.0})(_sample())
    assert out["image"].shape == (3, 200, 200) and out["image"].dtype == torch.float32
    assert out["boxes"].tolist() == [[140, 20, 180, 100]]
    img = out["image"]
    assert torch.allclose(img[:, 22:98, 142:178], torch.tensor(1.0))  # the white box moved there
    assert torch.allclose(img[:, 22:98, 22:58], torch.tensor(-1.0))  # and left its old place


def test_eval_transform_only_resizes():
    out = eval_transform(200)(_sample())
    assert out["boxes"].tolist() == [[20, 20, 60, 100]]
    assert torch.allclose(out["image"][:, 22:98, 22:58], torch.tensor(1.0))
    assert out["image"].min() == -1.0 and out["image"].max() == 1.0  # [-1, 1]


def test_flip_probability_and_no_flip_option():
    flips = 0
    tf = train_transform(50, {"hflip": 0.5, "ssd_crop": 0.0})
    for seed in range(40):
        torch.manual_seed(seed)
        flips += tf(_sample())["boxes"][0, 0].item() > 25
    assert 8 < flips < 32
    tf = train_transform(50, {"hflip": 0.0, "ssd_crop": 0.0})
    assert all(tf(_sample())["boxes"][0, 0].item() < 25 for _ in range(10))


def test_ssd_crop_keeps_boxes_on_their_pixels():
    """After the SSD crop + resize every kept box still covers white pixels only, inside the image."""
    boxes = ((10, 5, 30, 25), (50, 10, 90, 45), (40, 30, 48, 40))
    tf = train_transform(64, {"hflip": 0.5, "ssd_crop": 1.0})
    changed = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out = tf(_sample(boxes=boxes))
        b = out["boxes"]
        assert len(b) == len(out["labels"]) and len(b) >= 1
        assert (b >= 0).all() and (b <= 64).all() and (b[:, 2:] > b[:, :2]).all()
        for x0, y0, x1, y1 in b.round().int().tolist():
            if x1 - x0 > 4 and y1 - y0 > 4:  # skip the interpolated rim
                assert out["image"][:, y0 + 2: y1 - 2, x0 + 2: x1 - 2].min() > 0.9
        changed += len(b) != 3 or not torch.allclose(b, torch.tensor(
            [[10, 5, 30, 25], [50, 10, 90, 45], [40, 30, 48, 40]]) * torch.tensor([0.64, 1.28, 0.64, 1.28]))
    assert changed > 10  # the crop really acts


def test_ssd_crop_leaves_images_without_boxes_alone():
    tf = train_transform(32, {"hflip": 0.0, "ssd_crop": 1.0})
    out = tf(_sample(boxes=()))
    assert out["image"].shape == (3, 32, 32) and out["boxes"].shape == (0, 4)


# --- COCO mAP -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """A small generated `shapes` set (val has a crowd at image 6 and an empty image at 8)."""
    return shapes.ensure(tmp_path_factory.mktemp("shapes") / "shapes", num_train=12, num_val=10)


def _gt_as_detections(anns: CocoAnnotations, size: int, shift: float = 0.0, crowd_too=False):
    """Ground-truth boxes as model outputs at size x size input, score 1, shifted by a box fraction."""
    dets, ids, orig = [], [], []
    for image_id in anns.image_ids:
        im = anns.images[image_id]
        objs = [a for a in anns.by_image[image_id] if crowd_too or not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in objs], dtype=torch.float32).reshape(-1, 4)
        # shift towards the image centre, so that no shifted box is clipped by the image border
        inward = torch.where(xywh[:, 0] + xywh[:, 2] / 2 < im["width"] / 2, 1.0, -1.0)
        xywh[:, 0] += inward * shift * xywh[:, 2]
        xyxy = box_convert(xywh, "xywh", "xyxy")
        xyxy *= torch.tensor([size / im["width"], size / im["height"]] * 2)
        dets.append({"boxes": xyxy, "scores": torch.ones(len(objs)),
                     "labels": torch.tensor([anns.cat_to_label[a["category_id"]] for a in objs])})
        ids.append(image_id)
        orig.append([im["height"], im["width"]])
    return dets, torch.tensor(ids), torch.tensor(orig)


def _map(anns, dets, ids, orig, size):
    m = CocoMetric(anns)
    m.update(dets[:3], ids[:3], orig[:3], (size, size))  # two batches
    m.update(dets[3:], ids[3:], orig[3:], (size, size))
    m.reduce()
    return m.compute()


def test_perfect_predictions_score_one(shapes_root):
    anns = _anns(shapes_root, "val")
    assert any(a["iscrowd"] for a in anns.coco.anns.values())
    out = _map(anns, *_gt_as_detections(anns, 160), 160)  # boxes come back from a 160x160 input
    for k in ("map", "ap50", "ap75"):
        assert out[k] == pytest.approx(1.0), k
    assert set(out["per_class_ap"]) == set(shapes.CATEGORIES.values())
    assert all(v == pytest.approx(1.0) for v in out["per_class_ap"].values())
    assert out["count"] == 10


def test_detections_on_a_crowd_are_not_false_positives(shapes_root):
    anns = _anns(shapes_root, "val")
    dets, ids, orig = _gt_as_detections(anns, 320, crowd_too=True)
    assert sum(len(d["boxes"]) for d in dets) == len(anns.coco.anns)
    assert _map(anns, dets, ids, orig, 320)["map"] == pytest.approx(1.0)


def test_shifted_or_mislabelled_boxes_score_less(shapes_root):
    """A box shifted by a fraction f of its width has IoU (1 - f) / (1 + f) with its original:
    f = 0.1 gives 0.818, a hit at the 7 thresholds 0.50..0.80 of the 10 -> mAP 0.7;
    f = 0.3 gives 0.538, a hit at 0.50 only -> 0.1; f = 0.4 gives 0.43, never a hit."""
    anns = _anns(shapes_root, "val")
    for f, want in ((0.1, 0.7), (0.3, 0.1), (0.4, 0.0)):
        out = _map(anns, *_gt_as_detections(anns, 320, shift=f), 320)
        assert out["map"] == pytest.approx(want, abs=1e-6), f
        assert out["ap50"] == (1.0 if f < 0.4 else 0.0)
        assert out["ap75"] == pytest.approx(1.0 if f == 0.1 else 0.0)
    dets, ids, orig = _gt_as_detections(anns, 320)
    for d in dets:
        d["labels"] = (d["labels"] + 1) % 5
    assert _map(anns, dets, ids, orig, 320)["map"] == 0.0


def test_drawing_threshold_keeps_the_right_boxes_and_drops_the_noise(shapes_root):
    """Every true box at score 0.9 plus, per image, wrong boxes (the true ones shifted by 0.4 of
    their width: IoU 0.43) at 0.6: the best-F1 score lies above the noise and reaches the truth."""
    anns = _anns(shapes_root, "val")
    right, ids, orig = _gt_as_detections(anns, 320)
    wrong, _, _ = _gt_as_detections(anns, 320, shift=0.4)
    dets = [{"boxes": torch.cat([r["boxes"], w["boxes"]]),
             "scores": torch.cat([torch.full((len(r["boxes"]),), 0.9), torch.full((len(w["boxes"]),), 0.6)]),
             "labels": torch.cat([r["labels"], w["labels"]])} for r, w in zip(right, wrong)]
    out = _map(anns, dets, ids, orig, 320)
    assert 0.6 < out["draw_thresh"] <= 0.9
    noisy_truth = [{**r, "scores": torch.full((len(r["boxes"]),), 0.35)} for r in right]
    assert _map(anns, noisy_truth, ids, orig, 320)["draw_thresh"] == pytest.approx(0.35)


def test_no_detections_and_partial_evaluation(shapes_root):
    anns = _anns(shapes_root, "val")
    m = CocoMetric(anns)
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
               "labels": torch.zeros(0, dtype=torch.int64)}
    m.update([nothing], torch.tensor([1]), torch.tensor([[320, 320]]), (320, 320))
    out = m.compute()
    assert out["map"] == 0.0 and out["count"] == 1 and out["detections"] == 0
    # only the evaluated images count: perfect boxes on images 1-4 give 1.0
    dets, ids, orig = _gt_as_detections(anns, 320)
    m = CocoMetric(anns)
    m.update(dets[:4], ids[:4], orig[:4], (320, 320))
    assert m.compute()["map"] == pytest.approx(1.0)


def _ddp_worker(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    anns = _anns(Path(root), "val")
    dets, ids, orig = _gt_as_detections(anns, 320, shift=0.1)
    m = CocoMetric(anns)
    m.update(dets[rank::2], ids[rank::2], orig[rank::2], (320, 320))  # ShardSampler's split
    m.reduce()
    Path(out, f"{rank}.json").write_text(json.dumps(m.compute()))
    torch.distributed.destroy_process_group()


def test_reduce_gathers_detections_from_every_rank(shapes_root, tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(shapes_root), str(tmp_path)), nprocs=2)
    one = _map(_anns(shapes_root, "val"), *_gt_as_detections(_anns(shapes_root, "val"), 320, shift=0.1), 320)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["count"] == 10 and got["map"] == pytest.approx(one["map"])


# --- the task with a stand-in detector ----------------------------------------------------------

class StandInDetector(nn.Module):
    """A tiny model honouring the detector contract: one box per image from pooled conv features.

    Train mode: loss dict given targets, raw outputs without. Eval mode: list of detections."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.box, self.cls = nn.Linear(8, 4), nn.Linear(8, num_classes)
        self.seen: list = []
        self.raw_calls = 0

    def forward(self, images, targets=None):
        f = self.features(images).mean((2, 3))
        boxes = box_convert(self.box(f).sigmoid() * images.shape[-1], "cxcywh", "xyxy")
        logits = self.cls(f)
        if self.training and targets is None:
            self.raw_calls += 1
            return boxes, logits
        if self.training:
            self.seen.append([{k: v.clone() for k, v in t.items()} for t in targets])
            has = [i for i, t in enumerate(targets) if len(t["boxes"])]
            if not has:
                return {"classification": logits.sum() * 0, "bbox_regression": boxes.sum() * 0}
            gt_box = torch.stack([targets[i]["boxes"][0] for i in has])
            gt_lab = torch.stack([targets[i]["labels"][0] for i in has])
            return {"classification": F.cross_entropy(logits[has], gt_lab),
                    "bbox_regression": F.smooth_l1_loss(boxes[has], gt_box)}
        p = logits.softmax(1)
        return [{"boxes": boxes[i: i + 1], "scores": p[i].max()[None], "labels": p[i].argmax()[None]}
                for i in range(len(images))]


class FixedDetector(nn.Module):
    """Eval-mode detector returning the same detections (input-pixel xyxy) for every image."""

    def __init__(self, boxes, scores, labels):
        super().__init__()
        self.det = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                    "labels": torch.tensor(labels)}
        self.sizes = []

    def forward(self, images, targets=None):
        self.sizes.append(tuple(images.shape))
        return [dict(self.det) for _ in images]


def _task(root, **overrides) -> DetectionTask:
    return build_task(load_recipe("detect_shapes", {"data.name": str(root), **overrides}))


def test_registered_and_recipe():
    assert TASKS["detect"] is DetectionTask
    r = load_recipe("detect_shapes")
    assert r.task == "detect" and r.model.name == "ssdlite_mobiledet_cpu"
    assert r.data.name == "shapes" and r.data.img_size == 320  # the spec's fixed 320x320 input
    assert r.train.bn_recalibrate > 0  # the backbone keeps the official BN momentum (0.01)


def test_datasets_limits_and_class_names(coco_root):
    task = _task(coco_root, **{"data.img_size": 32, "data.limit_train": 2})
    train, val = task.datasets()
    assert task.recipe.data.class_names == ["two", "five", "nine"] and task.num_classes == 3
    assert len(train) == 2 and len(val) == 3
    assert train.ids == _task(coco_root, **{"data.limit_train": 2}).datasets()[0].ids  # fixed subset
    assert len(task.calibration_dataset()) == 2
    cal = task.calibration_dataset()[0]
    assert cal["image"].shape == (3, 32, 32)


def test_bad_options_and_layout(coco_root, tmp_path):
    with pytest.raises(DataError, match="unknown option"):
        _task(coco_root, **{"data.augment": {"scale": [0.5, 1]}})
    with pytest.raises(DataError, match="probability"):
        _task(coco_root, **{"data.augment": {"hflip": 2}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="instances_train.json.*not found"):
        _task(empty).datasets()
    with pytest.raises(DataError, match="no such folder"):
        _task(tmp_path / "nowhere").datasets()
    with pytest.raises(DataError, match="differ"):
        _task(coco_root, **{"data.class_names": ["a", "b", "c"]}).datasets()


def test_train_and_eval_contract_through_fit(shapes_root, tmp_path, monkeypatch):
    """fit() with a stand-in detector: targets reach the model in input pixels with 0..K-1 labels,
    BN recalibration runs the model without targets, evaluation and the report use COCO mAP."""
    made = []

    def fake_create_model(name, num_classes, **kw):
        assert name == "ssdlite_mobiledet_cpu"
        made.append(StandInDetector(num_classes))
        return made[-1]

    monkeypatch.setattr(task_module, "create_model", fake_create_model)
    out = tmp_path / "run"
    recipe = load_recipe("detect_shapes", {
        "data.name": str(shapes_root), "data.img_size": 64, "data.batch_size": 4,
        "data.eval_batch_size": 4, "train.epochs": 2, "train.bn_recalibrate": 1, "train.device": "cpu",
        "train.threads": 1, "out": str(out)})
    task = build_task(recipe)
    metrics = fit(recipe, task)
    model = made[0]
    assert model.raw_calls == 2  # one BN-recalibration batch before each of the 2 evaluations
    assert len(model.seen) == 2 * (12 // 4)
    for targets in model.seen:
        assert len(targets) == 4
        for t in targets:
            assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 64)).all()
            assert set(t["labels"].tolist()) <= set(range(5))
    for k in ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
        assert isinstance(metrics[k], float) and -1 <= metrics[k] <= 1
    assert metrics["count"] == 10 and metrics["skipped"] == 0
    assert set(metrics["per_class_ap"]) == set(shapes.CATEGORIES.values())
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all("val_map" in h and "val_ap50" in h for h in history)
    report = (out / "report.md").read_text()
    assert "mAP" in report and "| star |" in report and "detections.png" in report
    with Image.open(out / "detections.png") as im:
        assert im.size[0] > 64 * 4  # a grid of 4 per row
    assert "mAP" in task.summary(metrics) and "AP50" in task.summary(metrics)


def test_predict_maps_boxes_back_and_writes_files(coco_root, tmp_path):
    """A 64x64 input box (16, 16)-(48, 32) on an 80 x 60 image is x * 80/64, y * 60/64:
    (20, 15)-(60, 30), i.e. xywh [20, 15, 40, 15]."""
    task = _task(coco_root, **{"data.img_size": 64})
    model = FixedDetector([[16, 16, 48, 32], [0, 0, 8, 8]], [0.9, 0.1], [2, 0])
    src = tmp_path / "in"
    _image(src / "a.png", 80, 60)
    _image(src / "sub" / "b.jpg", 40, 40)
    preds = task.predict(model, [str(src)], out=tmp_path / "out")
    assert model.sizes == [(1, 3, 64, 64)] * 2
    assert len(preds) == 2  # the 0.1 box falls under the default score threshold
    a = preds[0]
    assert a["file_name"] == str(src / "a.png")
    assert "image_id" not in a and len(preds.ids.no_file) == 2  # no COCO file holds these images
    assert a["category_id"] == 9 and a["category"] == "nine"  # label 2 -> id 9
    assert a["bbox"] == pytest.approx([20, 15, 40, 15]) and a["score"] == pytest.approx(0.9)
    assert preds[1]["bbox"] == pytest.approx([10, 10, 20, 10])  # 40 x 40: x, y * 40/64
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written == preds
    for name, size in (("a.png", (80, 60)), ("b.png", (40, 40))):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size == size
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert np.asarray(im)[15, 40].tolist() != [0, 0, 0]  # the box's top edge is drawn
    low = task.predict(model, [str(src / "a.png")], score_thresh=0.05)
    assert [p["category_id"] for p in low] == [9, 2]
    with pytest.raises(DataError, match="nothing_here"):
        task.predict(model, [str(tmp_path / "nothing_here")])


# --- predict's image ids, scored by pycocotools against the eval of the same model -------------

SHIFTS = (0.0, 0.1, 0.3, 0.45)  # IoU with the truth 1, 0.82, 0.54, 0.38 (see the shifted-boxes test)


def _pixels_key(image: torch.Tensor) -> str:
    """A fingerprint of a model input in [-1, 1] (the same however it was batched)."""
    import hashlib
    u8 = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return hashlib.sha1(u8.contiguous().numpy().tobytes()).hexdigest()


class LookupDetector(nn.Module):
    """Eval-mode detector answering each input with the detections prepared for its pixels (one
    middling box for inputs it has no answer for)."""

    UNKNOWN = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "scores": torch.tensor([0.5]),
               "labels": torch.tensor([0])}

    def __init__(self, answers: dict[str, dict]):
        super().__init__()
        self.register_buffer("unused", torch.zeros(1))  # something to save as the run's weights
        self.answers = answers

    def forward(self, images, targets=None):
        return [dict(self.answers.get(_pixels_key(x), self.UNKNOWN)) for x in images]


def _imperfect_answers(root: Path, size: int) -> dict[str, dict]:
    """Per val image (keyed by its model input): its non-crowd truth boxes, some shifted sideways
    by a fraction of their width, with falling scores, plus one false positive in a corner."""
    from mobilezoo.tasks.base import read_image
    anns, tf = _anns(root, "val"), eval_transform(size)
    answers = {}
    for image_id in anns.image_ids:
        im = anns.images[image_id]
        boxes, scores, labels = [], [], []
        for j, a in enumerate(x for x in anns.by_image[image_id] if not x["iscrowd"]):
            x, y, w, h = a["bbox"]
            inward = 1.0 if x + w / 2 < im["width"] / 2 else -1.0  # never clipped by the border
            x += inward * SHIFTS[j % len(SHIFTS)] * w
            sx, sy = size / im["width"], size / im["height"]
            boxes.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            scores.append(0.95 - 0.07 * j)
            labels.append(anns.cat_to_label[a["category_id"]])
        boxes.append([0.0, 0.0, size / 5, size / 5])
        scores.append(0.33)
        labels.append(image_id % len(anns.cat_ids))
        key = _pixels_key(tf(read_image(root / "val" / im["file_name"])))
        answers[key] = {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
                        "labels": torch.tensor(labels)}
    return answers


def _shuffle_and_gap_ids(ann_file: Path, seed: int = 0) -> None:
    """Give the images ids 1000 + 7k in a random order (and list them shuffled), as real
    annotation files do: ids unrelated to the order of the files."""
    import random
    doc = json.loads(ann_file.read_text())
    rng = random.Random(seed)
    new_ids = [1000 + 7 * k for k in range(len(doc["images"]))]
    rng.shuffle(new_ids)
    remap = {im["id"]: n for im, n in zip(doc["images"], new_ids)}
    for im in doc["images"]:
        im["id"] = remap[im["id"]]
    for a in doc["annotations"]:
        a["image_id"] = remap[a["image_id"]]
    rng.shuffle(doc["images"])
    ann_file.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def gapped_root(tmp_path_factory):
    """A `shapes` val set (with a crowd and an empty image) whose image ids are shuffled and gapped."""
    root = shapes.ensure(tmp_path_factory.mktemp("gapped") / "shapes", num_train=1, num_val=10)
    _shuffle_and_gap_ids(root / "annotations" / "instances_val.json")
    return root


@pytest.fixture
def lookup_run(gapped_root, tmp_path, monkeypatch) -> Path:
    """A run directory whose model is a LookupDetector with imperfect answers on the gapped set."""
    from mobilezoo.models.weights import save_weights
    size = 64
    model = LookupDetector(_imperfect_answers(gapped_root, size))
    monkeypatch.setattr(task_module, "create_model", lambda name, num_classes, **kw: model)
    recipe = load_recipe("detect_shapes", {
        "data.name": str(gapped_root), "data.img_size": size, "data.eval_batch_size": 4,
        "data.workers": 0, "train.device": "cpu", "train.threads": 1})
    run = tmp_path / "run"
    run.mkdir()
    recipe.save(run / "config.yaml")
    save_weights(model, run / "model.safetensors")
    return run


def _pycocotools_map(ann_file: Path, results_file: Path) -> float:
    """mAP@[.5:.95] of a COCO-results file, by pycocotools alone."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(str(results_file)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _cli(capsys, *argv):
    from mobilezoo.cli import main
    threads = torch.get_num_threads()
    rc = main([str(a) for a in argv])
    torch.set_num_threads(threads)
    torch.set_grad_enabled(True)  # predict switches autograd off process-wide
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_json_scores_like_eval_with_shuffled_gapped_coco_ids(gapped_root, lookup_run, capsys, tmp_path):
    """eval keeps every detection, so predict at --score-thresh 0 must give pycocotools the same mAP."""
    rc, _, err = _cli(capsys, "eval", lookup_run, "--threads", 1)
    assert rc == 0, err
    eval_map = json.loads((lookup_run / "eval.json").read_text())["map"]
    assert 0.2 < eval_map < 0.95  # neither nothing found nor everything perfect: a real comparison
    rc, out, err = _cli(capsys, "predict", lookup_run, gapped_root / "val", "--score-thresh", 0,
                        "--out", tmp_path / "pred")
    assert rc == 0, err
    ann_file = gapped_root / "annotations" / "instances_val.json"
    assert _pycocotools_map(ann_file, tmp_path / "pred" / "predictions.json") == pytest.approx(eval_map, abs=1e-3)
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    by_file = {im["file_name"]: im["id"] for im in json.loads(ann_file.read_text())["images"]}
    for r in results:
        assert r["image_id"] == by_file[Path(r["file_name"]).name]
    assert f"COCO image ids from {ann_file} (10 images)" in out


def test_predict_takes_ids_from_a_given_annotation_file_and_says_which_images_have_none(
        gapped_root, lookup_run, capsys, tmp_path):
    ann_file = gapped_root / "annotations" / "instances_val.json"
    elsewhere = tmp_path / "copies"
    elsewhere.mkdir()
    for f in sorted((gapped_root / "val").iterdir())[:3]:
        (elsewhere / f.name).write_bytes(f.read_bytes())
    _image(elsewhere / "stranger.png", 40, 30)
    pred = tmp_path / "pred"
    # found nowhere beside the copies: file names only, and said so
    rc, out, err = _cli(capsys, "predict", lookup_run, elsewhere, "--out", pred, "--score-thresh", 0)
    assert rc == 0, err
    assert all("image_id" not in r for r in json.loads((pred / "predictions.json").read_text()))
    assert "no usable COCO annotation file for 4 images" in err and "no image_id" in err
    # given: the copies get their COCO ids, the stranger is counted and named
    rc, out, err = _cli(capsys, "predict", lookup_run, elsewhere, "--out", pred, "--score-thresh", 0,
                        "--annotations", ann_file)
    assert rc == 0, err
    by_file = {im["file_name"]: im["id"] for im in json.loads(ann_file.read_text())["images"]}
    results = json.loads((pred / "predictions.json").read_text())
    copies = [r for r in results if not r["file_name"].endswith("stranger.png")]
    assert {r["image_id"] for r in copies} == {by_file[f.name] for f in elsewhere.glob("*.jpg")}
    assert all(r["image_id"] == by_file[Path(r["file_name"]).name] for r in copies)
    strangers = [r for r in results if r["file_name"].endswith("stranger.png")]
    assert strangers and all("image_id" not in r for r in strangers)
    assert f"COCO image ids from {ann_file} (3 images)" in out
    assert f"1 images are not in {ann_file}" in err and "stranger.png" in err


def test_a_given_annotation_file_with_other_categories_is_refused(coco_root, lookup_run, capsys, tmp_path):
    rc, _, err = _cli(capsys, "predict", lookup_run, coco_root / "val", "--out", tmp_path / "pred",
                      "--annotations", coco_root / "annotations" / "instances_val.json")
    assert rc == 2 and "Traceback" not in err
    assert "instances_val.json: categories" in err and "differ from the run's" in err


def test_image_ids_match_the_longest_file_name_ending_the_path(tmp_path):
    from mobilezoo.tasks.detection.image_ids import CocoImageIds
    images = [{"id": 70, "file_name": "b.png", "width": 4, "height": 4},
              {"id": 80, "file_name": "a/b.png", "width": 4, "height": 4}]
    path = _write(tmp_path, "val", images, [], draw=False)
    ids = CocoImageIds(["two", "five", "nine"], path)
    assert ids.lookup(tmp_path / "x" / "a" / "b.png") == (80, [2, 5, 9])
    assert ids.lookup(tmp_path / "x" / "b.png") == (70, [2, 5, 9])
    assert ids.lookup(tmp_path / "x" / "c.png") == (None, [2, 5, 9])
    # class names in another order than the file's: ids follow the names, not the positions
    assert CocoImageIds(["nine", "two", "five"], path).lookup(tmp_path / "b.png") == (70, [9, 2, 5])


def test_predict_reads_16_bit_pngs(coco_root, tmp_path):
    """A 16-bit grey PNG predicts (and draws) like its 8-bit version."""
    task = _task(coco_root, **{"data.img_size": 64})
    model = FixedDetector([[16, 16, 48, 32]], [0.9], [2])
    grey = np.tile(np.linspace(0, 255, 40).round().astype(np.uint16), (30, 1))
    (tmp_path / "in16").mkdir()
    deep = Image.fromarray(grey * 257)  # uint16: PIL writes a 16-bit PNG
    assert deep.mode == "I;16"
    deep.save(tmp_path / "in16" / "deep.png")
    Image.fromarray(grey.astype(np.uint8)).convert("RGB").save(tmp_path / "in16" / "flat.png")
    preds = task.predict(model, [str(tmp_path / "in16")], out=tmp_path / "out")
    assert [Path(p["file_name"]).name for p in preds] == ["deep.png", "flat.png"]
    assert preds[0]["bbox"] == preds[1]["bbox"]
    with Image.open(tmp_path / "out" / "deep.png") as a, Image.open(tmp_path / "out" / "flat.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_predict_skip_bad_samples_keeps_going_and_names_each_bad_image(gapped_root, lookup_run, capsys, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((gapped_root / "val").iterdir())[:2]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "000000_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "zz_cut.png").write_bytes(_image(tmp_path / "x.png", 8, 8).read_bytes()[:50])  # truncated
    pred = tmp_path / "pred"
    rc, _, err = _cli(capsys, "predict", lookup_run, folder, "--out", pred)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"mobilezoo predict: error: {folder / '000000_broken.jpg'}")
    rc, out, err = _cli(capsys, "predict", lookup_run, folder, "--out", pred, "--skip-bad-samples",
                        "--score-thresh", 0)
    assert rc == 0, err
    skipped = [ln for ln in err.splitlines() if ln.startswith("mobilezoo predict: warning: skipped")]
    assert len(skipped) == 2 and "000000_broken.jpg" in skipped[0] and "zz_cut.png" in skipped[1]
    assert "2 unreadable inputs skipped, 2 predicted" in err and "on 2 images" in out
    results = json.loads((pred / "predictions.json").read_text())
    assert {Path(r["file_name"]).name for r in results} == {f.name for f in good}
    assert {p.name for p in pred.glob("*.png")} == {f.stem + ".png" for f in good}
