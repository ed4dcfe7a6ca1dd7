"""Classification task: ImageFolder, bad samples, metric, transforms, subsets, predict, input expansion."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mobilezoo.errors import BadSampleError, DataError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task
from mobilezoo.tasks.base import collate_skipping
from mobilezoo.tasks.classification import (
    DEFAULT_AUGMENT,
    ClassificationMetric,
    ImageFolder,
    eval_transform,
    expand_images,
    select_gallery,
    train_transform,
)

# ImageNet statistics (MOAT input normalisation option 1, spec §3.2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _solid(path, rgb, h=12, w=20):
    return _png(path, np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)))


def _task(root, **overrides):
    return build_task(load_recipe(None, {"data.name": str(root), "data.img_size": 32, **overrides}))


# --- ImageFolder --------------------------------------------------------------------------------

def test_imagefolder_classes_sorted(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("zebra", "apple", "mango"), per_class=2,
                             splits=("train",))
    ds = ImageFolder(root / "train", lambda x: x)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert len(ds) == 6
    for i in range(len(ds)):
        path, label = ds.samples[i]
        item = ds[i]
        assert item["label"] == label == ds.classes.index(path.split("/")[-2])
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)


def test_imagefolder_missing_and_empty_roots(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere", None)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        ImageFolder(tmp_path / "empty", None)


def test_corrupt_image_raises_naming_the_file(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, splits=("train",))
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8).tobytes())
    ds = ImageFolder(root / "train", lambda x: x)
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(BadSampleError) as e:
        ds[i]
    assert str(bad) in str(e.value)
    assert ds[(i + 1) % len(ds)] is not None  # the others still load


def test_skip_bad_samples_gives_none_and_collate_counts_it(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2, splits=("train",))
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    ds = ImageFolder(root / "train", lambda x: x.float(), skip_bad=True)
    items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 1
    assert items[[p for p, _ in ds.samples].index(str(bad))] is None
    batch = collate_skipping(items)
    assert batch["skipped"] == 1
    assert batch["image"].shape == (6, 3, 16, 16)
    assert batch["label"].tolist() == [s["label"] for s in items if s is not None]
    assert collate_skipping([None, None]) == {"skipped": 2}


# --- metric -------------------------------------------------------------------------------------

def _logits(order: list[int], k: int) -> list[float]:
    """Logits ranking the classes in `order` (first = highest)."""
    out = [0.0] * k
    for rank, c in enumerate(order):
        out[c] = float(k - rank) + 0.1 * rank  # distinct, decreasing along `order`
    return out


# (label, class ranking); 6 classes, every class present.
CASES = [
    (0, [0, 1, 2, 3, 4, 5]),  # right
    (0, [1, 0, 2, 3, 4, 5]),  # wrong, label 2nd (top-5 hit)
    (1, [1, 2, 0, 3, 4, 5]),  # right
    (2, [2, 1, 0, 3, 4, 5]),  # right
    (3, [0, 1, 2, 4, 5, 3]),  # wrong, label last (top-5 miss)
    (4, [4, 0, 1, 2, 3, 5]),  # right
    (5, [4, 0, 1, 2, 3, 5]),  # wrong, label last (top-5 miss)
    (5, [5, 4, 0, 1, 2, 3]),  # right
]


def _hand_ce(logits, label):
    m = max(logits)
    return m + math.log(sum(math.exp(v - m) for v in logits)) - logits[label]


def test_classification_metric_by_hand():
    k = 6
    logits = torch.tensor([_logits(o, k) for _, o in CASES])
    labels = torch.tensor([lab for lab, _ in CASES])
    m = ClassificationMetric(k)
    m.update(logits[:3], labels[:3])  # two batches accumulate like one
    m.update(logits[3:], labels[3:])
    out = m.compute()
    assert out["count"] == 8
    assert out["top1"] == pytest.approx(5 / 8)
    assert out["top5"] == pytest.approx(6 / 8)
    assert out["per_class_acc"] == pytest.approx([1 / 2, 1.0, 1.0, 0.0, 1.0, 1 / 2])
    expected = [[0] * k for _ in range(k)]
    for (label, order) in CASES:
        expected[label][order[0]] += 1  # rows: true class, columns: predicted
    assert expected[0] == [1, 1, 0, 0, 0, 0] and expected[5] == [0, 0, 0, 0, 1, 1]
    assert out["confusion"] == expected
    ce = sum(_hand_ce(_logits(o, k), lab) for lab, o in CASES) / 8
    assert out["loss"] == pytest.approx(ce, rel=1e-5)


def test_metric_top5_with_fewer_than_five_classes():
    m = ClassificationMetric(3)
    m.update(torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]]), torch.tensor([0, 2]))
    out = m.compute()
    assert out["top1"] == 0.0 and out["top5"] == 1.0  # every class is within the top 5 of 3
    assert out["confusion"] == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


# --- transforms ---------------------------------------------------------------------------------

def test_eval_transform_shape_and_normalisation():
    rgb = (200, 40, 120)
    img = torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 30, 50).contiguous()
    out = eval_transform(24, 0.875)(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    for c in range(3):
        want = (rgb[c] / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[c], torch.full((24, 24), want), atol=1e-3)


def test_eval_transform_center_crops():
    """crop_pct 0.5: resize the short side to 2x the size and keep the centre half (all white here);
    crop_pct 1.0 keeps the whole image, black border included."""
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[:, 16:48, 16:48] = 255
    white = torch.tensor([(1 - MEAN[c]) / STD[c] for c in range(3)])[:, None, None]
    black = torch.tensor([(0 - MEAN[c]) / STD[c] for c in range(3)])
    out = eval_transform(16, 0.5)(img)
    assert out.shape == (3, 16, 16)
    # the outermost ring is blurred by the antialiased resize; the inside is pure white
    assert torch.allclose(out[:, 1:-1, 1:-1], white.expand(3, 14, 14), atol=1e-3)
    assert (out > black[:, None, None] + 1).all()
    whole = eval_transform(16, 1.0)(img)
    assert torch.allclose(whole[:, 0, 0], black, atol=1e-3)
    assert torch.allclose(whole[:, 8, 8], white[:, 0, 0], atol=1e-3)


def _half_black_half_white(s=16):
    img = torch.zeros(3, s, s, dtype=torch.uint8)
    img[:, :, s // 2:] = 255
    return img


@pytest.mark.parametrize("hflip", [False, True])
def test_train_transform_hflip_option(hflip):
    aug = {**DEFAULT_AUGMENT, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": hflip,
           "affine_degrees": 0.0, "affine_translate": 0.0}
    tf = train_transform(16, aug)
    img = _half_black_half_white()
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = tf(img)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        left, right = out[..., :8].mean(), out[..., 8:].mean()
        flipped += bool(left > right)
    if hflip:
        assert 5 < flipped < 35  # a fair coin over 40 draws
    else:
        assert flipped == 0


# --- limit_train / limit_val --------------------------------------------------------------------

@pytest.mark.parametrize("per_class,limit", [(4, 3), (8, 3), (10, 3), (8, 5), (20, 6)])
def test_limit_train_keeps_every_class(make_image_folder, tmp_path, per_class, limit):
    root = make_image_folder(tmp_path / "d", per_class=per_class, size=8)
    task = _task(root, **{"data.limit_train": limit, "data.limit_val": limit})
    train, val = task.datasets()
    assert task.recipe.data.class_names == ["cat", "dog", "eel"]
    for ds in (train, val):
        assert len(ds) == limit
        labels = [ds[i]["label"] for i in range(len(ds))]
        assert set(labels) == {0, 1, 2}, labels


def test_limit_is_a_fixed_subset(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6, size=8)
    a = _task(root, **{"data.limit_train": 5}).datasets()[0]
    b = _task(root, **{"data.limit_train": 5}).datasets()[0]
    assert list(a.indices) == list(b.indices)
    assert len(set(a.indices)) == 5


# --- predict ------------------------------------------------------------------------------------

class ColourNet(nn.Module):
    """Logits = 10 x mean of (B, G, R): classes blue, green, red (sorted folder order)."""

    def forward(self, x):
        return 10 * x.mean((2, 3))[:, [2, 1, 0]]


def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def test_predict_topk_sorted_with_class_labels(tmp_path):
    names = ["blue", "green", "red"]
    task = _task(tmp_path, **{"data.class_names": names})
    red = _solid(tmp_path / "in" / "red.png", (255, 0, 0))
    green = _solid(tmp_path / "in" / "sub" / "green.png", (0, 255, 0))
    preds = task.predict(ColourNet(), [str(tmp_path / "in")], topk=2)
    assert [p["file"] for p in preds] == [str(red), str(green)]
    for p in preds:
        probs = [t["prob"] for t in p["topk"]]
        assert len(p["topk"]) == 2
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6 and all(0 <= x <= 1 for x in probs)
        assert {t["label"] for t in p["topk"]} <= set(names)
    assert preds[0]["topk"][0]["label"] == "red"
    assert preds[1]["topk"][0]["label"] == "green"
    # probabilities by hand: normalised channel means of a pure red image, times 10
    norm = [((1.0 if c == 0 else 0.0) - MEAN[c]) / STD[c] for c in range(3)]
    p_blue, p_green, p_red = _softmax([10 * norm[2], 10 * norm[1], 10 * norm[0]])
    assert preds[0]["topk"][0]["prob"] == pytest.approx(p_red, abs=1e-5)
    assert preds[0]["topk"][1] == {"label": "blue", "prob": pytest.approx(p_blue, abs=1e-5)}


def test_predict_topk_larger_than_classes(tmp_path):
    task = _task(tmp_path, **{"data.class_names": ["blue", "green", "red"]})
    f = _solid(tmp_path / "x.png", (10, 20, 250))
    (p,) = task.predict(ColourNet(), [str(f)], topk=10)
    assert sorted(t["label"] for t in p["topk"]) == ["blue", "green", "red"]
    assert sum(t["prob"] for t in p["topk"]) == pytest.approx(1.0, abs=1e-5)
    assert p["topk"][0]["label"] == "blue"


def test_predict_on_corrupt_file_names_it(tmp_path):
    task = _task(tmp_path, **{"data.class_names": ["blue", "green", "red"]})
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(BadSampleError, match="bad.jpg"):
        task.predict(ColourNet(), [str(bad)])


# --- expand_images ------------------------------------------------------------------------------

def test_expand_images_recurses_sorted_and_filters(tmp_path):
    a = _solid(tmp_path / "in" / "b" / "deep" / "er" / "x.png", (1, 2, 3))
    b = _solid(tmp_path / "in" / "a.jpg", (1, 2, 3))
    c = _solid(tmp_path / "in" / "b" / "y.PNG", (1, 2, 3))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    single = _solid(tmp_path / "single.png", (1, 2, 3))
    files = expand_images([str(tmp_path / "in"), str(single)])
    assert set(files[:3]) == {a, b, c} and files[3] == single
    assert files[:3] == sorted(files[:3])


def test_expand_images_errors(tmp_path):
    with pytest.raises(DataError, match="missing.png"):
        expand_images([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="empty"):
        expand_images([str(tmp_path / "empty")])


# --- one-class data and the report's prediction gallery -----------------------------------------

def test_one_class_training_set_is_a_one_line_error(make_image_folder, tmp_path, capsys):
    from mobilezoo.cli import main
    root = make_image_folder(tmp_path / "one", classes=("cat",), per_class=3)
    rc = main(["train", "classify_imagefolder", "--data", str(root), "--epochs", "1", "--batch-size", "2",
               "--img-size", "32", "--device", "cpu", "--workers", "0", "--threads", "1",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mobilezoo train: error:")]
    assert len(lines) == 1, err
    assert str(root / "train") in lines[0] and "2 classes" in lines[0]


def test_imagefolder_refuses_one_class(make_image_folder, tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("cat",), per_class=2, splits=("train",))
    with pytest.raises(DataError, match="at least 2 classes"):
        ImageFolder(root / "train", None)


def test_gallery_spreads_over_classes_wrong_first():
    # a val split sorted by class (5 classes x 10), as ImageFolder lists it; two mistakes late in it
    trues = [c for c in range(5) for _ in range(10)]
    preds = list(trues)
    preds[37], preds[48] = 0, 2
    picked = select_gallery(preds, trues, limit=16)
    assert len(picked) == 16 and len(set(picked)) == 16
    assert picked[:2] == [37, 48]  # the wrong ones lead
    assert all(preds[i] == trues[i] for i in picked[2:])
    shown = [trues[i] for i in picked]
    assert set(shown) == set(range(5))  # every class appears, not 16 images of the first one
    assert max(shown.count(c) for c in range(5)) <= 4


def test_gallery_keeps_at_most_limit_wrong_ones_over_classes():
    trues = [c for c in range(3) for _ in range(20)]
    preds = [(t + 1) % 3 for t in trues]  # everything wrong
    picked = select_gallery(preds, trues, limit=6)
    assert sorted(trues[i] for i in picked) == [0, 0, 1, 1, 2, 2]


def test_gallery_of_a_stream_matches_the_whole_list():
    # kept items are chosen as they arrive (bounded memory); the choice equals one over the whole list
    g = torch.Generator().manual_seed(0)
    trues = torch.randint(0, 7, (500,), generator=g).sort().values.tolist()
    preds = [t if torch.rand((), generator=g) < 0.9 else (t + 1) % 7 for t in trues]
    picked = select_gallery(preds, trues, limit=16)
    right = [p == t for p, t in zip(preds, trues)]

    def rank(i):  # earlier samples of the same class and the same outcome
        return sum(1 for j in range(i) if trues[j] == trues[i] and right[j] == right[i])

    expected = sorted(range(500), key=lambda i: (right[i], rank(i), i))
    assert picked == expected[:16]


def test_report_gallery_mixes_classes_on_a_sorted_val_split(make_image_folder, tmp_path):
    # "d" is tinted like "a" (the fixture tints channel index % 3), so a by-colour model gets it wrong
    names = ["a", "b", "c", "d"]
    root = make_image_folder(tmp_path / "d", classes=names, per_class=10, splits=("val",))
    task = _task(root, **{"data.class_names": names})
    val = task.val_dataset()
    labels = [val[i]["label"] for i in range(len(val))]
    assert labels == sorted(labels)  # the first 16 would be ten "a" and six "b"

    class ByColour(nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), torch.full((len(x), 1), -1e3)], 1)

    metric = task.metric()
    for start in range(0, len(val), 8):  # batches in val order
        items = [val[i] for i in range(start, min(start + 8, len(val)))]
        batch = {"image": torch.stack([b["image"] for b in items]),
                 "label": torch.tensor([b["label"] for b in items])}
        task.eval_step(ByColour(), batch, metric)
    lines = task.report(tmp_path, metric.compute(), [])
    assert (tmp_path / "predictions.png").is_file()
    shown = [(p, t) for _, p, t in task._gallery.picked()]
    assert len(shown) == 16
    assert shown[:10] == [(0, 3)] * 10  # every mistake, first
    assert {t for _, t in shown[10:]} == {0, 1, 2} and all(p == t for p, t in shown[10:])
    text = "\n".join(lines)
    assert "first val images" not in text and "misclassified ones first" in text
    assert "10 of 10 wrong" in text
