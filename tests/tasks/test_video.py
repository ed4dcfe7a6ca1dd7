"""Video task: PyAV decoding, mmaction2 frame sampling, whole-clip transforms, layouts, multi-view testing,
bad files, predict and the training path. Videos are written here with frame numbers coded in their colours."""
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import nn

from mobilezoo.data import motion
from mobilezoo.errors import BadSampleError, DataError
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks.base import collate_skipping
from mobilezoo.tasks.video import VideoTask, decode, read_clip
from mobilezoo.tasks.video.decode import decode_indices
from mobilezoo.tasks.video.sampling import clip_indices, eval_offsets, train_offsets
from mobilezoo.tasks.video.transforms import MEAN, STD, TrainClip, to_video

MEAN_255, STD_255 = np.array(MEAN) * 255, np.array(STD) * 255


# ---------------------------------------------------------------------------------------------- helpers

def index_frame(i: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Frame i: flat red/green coding i (16 levels each), blue a 2-D gradient (a spatial fingerprint)."""
    f = np.empty((h, w, 3), np.uint8)
    f[..., 0] = 16 * (i % 16) + 8
    f[..., 1] = 16 * (i // 16) + 8
    f[..., 2] = (2 * np.arange(w)[None, :] + 3 * np.arange(h)[:, None]).clip(0, 255)
    return f


def frame_number(rgb) -> int:
    """Inverse of index_frame from the mean red and green of a decoded (H, W, 3) frame, 0-255 scale."""
    r, g = float(rgb[..., 0].mean()), float(rgb[..., 1].mean())
    return int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16))


def write_video(path: Path, n: int, h: int = 32, w: int = 48, gop: int | None = None, codec: str = "libx264") -> Path:
    """An n-frame video of index_frame(0..n-1); the container follows the suffix (.mp4, .mkv, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(index_frame(i, h, w), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def view_numbers(view: torch.Tensor) -> list[int]:
    """Frame numbers of a normalised (C, T, H, W) view."""
    px = view.permute(1, 2, 3, 0).numpy() * STD_255 + MEAN_255  # T, H, W, C in 0-255
    return [frame_number(f) for f in px]


def recipe(root, **augment):
    """A video recipe on `root` with small clips (8 frames, 2 apart) and no random photometric changes."""
    aug = {"clip_len": 8, "frame_interval": 2, "color_jitter": None, "erase_prob": 0.0, "hflip": False, **augment}
    return load_recipe(None, {"task": "video", "model.name": "squeezetime_mini", "data.name": str(root),
                              "data.img_size": 32, "data.batch_size": 4, "data.augment": aug})


@pytest.fixture(scope="module")
def index_root(tmp_path_factory) -> Path:
    """Class folders of index videos: class `long` 100 frames, class `short` 12 frames (shorter than a clip)."""
    root = tmp_path_factory.mktemp("index")
    for split in ("train", "val"):
        write_video(root / split / "long" / "a.mp4", 100)
        write_video(root / split / "short" / "b.mp4", 12)
    return root


@pytest.fixture(scope="module")
def motion_root(tmp_path_factory) -> Path:
    """A small generated `motion` set (2 train and 1 val clip per class)."""
    return motion.ensure(tmp_path_factory.mktemp("gen") / "motion", num_train=16, num_val=8)


class MeanColourModel(nn.Module):
    """Stand-in video model: logits of K classes from the clip's mean red value, so outputs are predictable."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.k, self.calls, self.views = k, 0, 0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        assert x.dim() == 5  # (N, C, T, H, W)
        self.calls += 1
        self.views += len(x)
        red = x[:, 0].mean((1, 2, 3))
        return torch.stack([red * self.scale * (k + 1) for k in range(self.k)], 1)


# ---------------------------------------------------------------------------------------------- sampling

def test_eval_offsets_match_mmaction2_formula():
    # 100 frames, 16 frames 4 apart: a clip spans 61 frames, so offsets run 0..39; 10 clips are
    # 39/9 = 4.33 apart, rounded: 0, 4.33, 8.67, 13, 17.33, 21.67, 26, 30.33, 34.67, 39
    assert eval_offsets(100, 16, 4, 10).tolist() == [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]
    assert eval_offsets(100, 16, 4, 1).tolist() == [19]  # centred: 39 // 2
    assert eval_offsets(30, 16, 4, 3).tolist() == [0, 0, 0]  # shorter than a clip: all start at 0


def test_train_offsets_cover_the_valid_range_uniformly():
    g = torch.Generator().manual_seed(0)
    # 100 frames, 16 x 4: randint(100 - 64 + 1) -> 0..36, each about 1/37 of the time
    seen = np.concatenate([train_offsets(100, 16, 4, generator=g) for _ in range(3700)])
    counts = np.bincount(seen, minlength=37)
    assert seen.min() == 0 and seen.max() == 36 and len(counts) == 37
    assert counts.min() > 60 and counts.max() < 150
    # several clips: one per segment of (100 - 8 + 1) // 3 = 31 frames
    for _ in range(20):
        o = train_offsets(100, 4, 2, num_clips=3, generator=g)
        assert 0 <= o[0] < 31 <= o[1] < 62 <= o[2] < 93
    assert train_offsets(30, 16, 4).tolist() == [0]  # shorter than a clip: offset 0
    assert train_offsets(63, 16, 4).tolist() == [0]


def test_short_videos_loop_repeat_or_fail():
    off = np.array([0])
    looped = clip_indices(off, 30, 16, 4, "loop")[0].tolist()
    assert looped == [0, 4, 8, 12, 16, 20, 24, 28, 2, 6, 10, 14, 18, 22, 26, 0]  # (4k) mod 30
    assert clip_indices(off, 30, 16, 4, "repeat_last")[0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8
    with pytest.raises(ValueError, match="needs at least 61"):
        clip_indices(off, 30, 16, 4, "error")
    assert clip_indices(np.array([3]), 100, 4, 4, "error")[0].tolist() == [3, 7, 11, 15]


# ---------------------------------------------------------------------------------------------- decoding

def test_read_clip_decodes_the_requested_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", 40)
    frames, idx = read_clip(path, lambda total: np.array([[total - 1, 0, 7], [7, 7, 20]]))
    assert frames.shape == (2, 3, 32, 48, 3) and frames.dtype == np.uint8
    assert [[frame_number(f) for f in clip] for clip in frames] == [[39, 0, 7], [7, 7, 20]]
    # the pixels are the written ones (lossy h264, so within a few levels)
    assert np.abs(frames[0, 1].astype(int) - index_frame(0)).mean() < 3


def test_decoding_stops_after_the_last_needed_frame_and_seeks_far_ones(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", 150, gop=10)
    with av.open(str(path)) as c:
        got, decoded = decode_indices(c, c.streams.video[0], [2, 5, 9])
    assert sorted(got) == [2, 5, 9] and decoded == 10  # frames 10..149 never decoded
    need = list(range(100, 131, 5))
    with av.open(str(path)) as c:
        got, decoded = decode_indices(c, c.streams.video[0], need)
        assert sorted(got) == need
        assert [frame_number(got[i].to_ndarray(format="rgb24")) for i in need] == need
        assert decoded <= 31 + 10  # from the key frame before 100 (GOP 10) to 130, not from frame 0
    # timestamps that do not line up: back to the start, counting frames
    monkeypatch.setattr(decode, "timestamp_index", lambda *a: None)
    with av.open(str(path)) as c:
        got, decoded = decode_indices(c, c.streams.video[0], need)
        assert [frame_number(got[i].to_ndarray(format="rgb24")) for i in need] == need and decoded == 131


def test_container_without_a_frame_count(tmp_path):
    mp4, mkv = write_video(tmp_path / "v.mp4", 30), write_video(tmp_path / "v.mkv", 30)
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # Matroska does not store it: the whole video is decoded
    pick = lambda total: clip_indices(eval_offsets(total, 8, 3, 2), total, 8, 3)  # noqa: E731
    a, ia = read_clip(mp4, pick)
    b, ib = read_clip(mkv, pick)
    assert ia.tolist() == ib.tolist() == [[0, 3, 6, 9, 12, 15, 18, 21], [8, 11, 14, 17, 20, 23, 26, 29]]
    assert [frame_number(f) for f in b.reshape(-1, *b.shape[2:])] == ib.ravel().tolist()
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_worker_processes_decode_after_the_parent_did(index_root):
    # the parent decodes first (as `mobilezoo train` does when it checks the data), then forks workers:
    # a colour converter inherited through fork must not be used or freed there (it would hang)
    ds = VideoTask(recipe(index_root, test_clips=1)).val_dataset()
    first = ds[0]["video"]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, timeout=60, collate_fn=collate_skipping)
    batch = next(iter(loader))
    assert torch.equal(batch["video"][0], first)


def test_bad_videos_name_the_file(tmp_path):
    good = write_video(tmp_path / "good.mp4", 30)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    for bad in (cut, junk, tmp_path / "missing.mp4"):
        with pytest.raises(BadSampleError, match=str(bad).replace(".", r"\.")):
            read_clip(bad, lambda total: np.array([[0]]))


def test_truncated_video_with_index_up_front_is_caught(tmp_path):
    # moov first (faststart): the header announces 60 frames but only the first part of the data is there
    src = tmp_path / "src.mp4"
    with av.open(str(src), mode="w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"crf": "0"}  # lossless: frames are big, so the cut lands mid-stream
        rng = np.random.default_rng(0)
        for _ in range(60):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 48, 3), np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(BadSampleError, match=r"cut\.mp4.*(truncated|decode)"):
        read_clip(cut, lambda total: np.array([[0, total - 1]]))


# ---------------------------------------------------------------------------------------------- datasets

def test_eval_views_follow_the_test_protocol(index_root):
    task = VideoTask(recipe(index_root, test_clips=3, test_crops=3))
    ds = task.val_dataset()
    assert task.recipe.data.class_names == ["long", "short"]
    item = ds[0]  # long: 100 frames; clips of 8 frames 2 apart span 15, offsets 0, 42.5 -> 42, 85
    assert item["label"] == 0 and item["video"].shape == (9, 3, 8, 32, 32)
    starts = [0, 42, 85]
    for v, view in enumerate(item["video"]):
        assert view_numbers(view) == [starts[v // 3] + 2 * k for k in range(8)]
    # three crops along the 48-px width at x = 0, 8, 16: the blue gradient (2 per column) tells them apart
    blue = [float(view[2].mean()) * STD_255[2] + MEAN_255[2] for view in item["video"][:3]]
    expected = [2 * (x0 + 15.5) + 3 * 15.5 for x0 in (0, 8, 16)]
    assert np.allclose(blue, expected, atol=4)
    short = ds[1]  # 12 frames < 15: every clip starts at 0 and loops
    assert view_numbers(short["video"][0]) == [0, 2, 4, 6, 8, 10, 0, 2]


def test_training_clip_offset_is_random_and_in_range(index_root):
    ds = VideoTask(recipe(index_root)).datasets()[0]
    starts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        nums = view_numbers(ds[0]["video"])
        assert nums == [nums[0] + 2 * k for k in range(8)]
        starts.add(nums[0])
    assert min(starts) >= 0 and max(starts) <= 100 - 16 and len(starts) > 15  # randint(100 - 16 + 1)


def test_single_frame_repeats_the_middle_frame(index_root):
    ds = VideoTask(recipe(index_root, single_frame=True, test_clips=2, test_crops=1)).val_dataset()
    views = ds[0]["video"]
    assert view_numbers(views[0]) == [8] * 8  # clip 0..14: middle frame (index 4 of 8) is 8
    assert view_numbers(views[1]) == [93] * 8  # clip 85..99: 85 + 8


def test_time_reversal_relabels(index_root):
    r = recipe(index_root, time_reverse=1.0, reverse_label_map={"long": "short", "short": "long"})
    ds = VideoTask(r).datasets()[0]
    item = ds[0]
    nums = view_numbers(item["video"])
    assert nums == [nums[0] - 2 * k for k in range(8)] and item["label"] == 1  # played backwards, relabelled
    r = recipe(index_root, time_reverse=1.0, reverse_label_map={"short": "short"})
    item = VideoTask(r).datasets()[0][0]  # `long` has no reversed counterpart: never reversed
    nums = view_numbers(item["video"])
    assert nums == [nums[0] + 2 * k for k in range(8)] and item["label"] == 0


def test_flip_relabels_with_the_label_map(index_root):
    r = recipe(index_root, hflip=True, flip_label_map={"long": "short", "short": "long"})
    ds = VideoTask(r).datasets()[0]
    flips = 0
    for seed in range(20):
        torch.manual_seed(seed)
        item = ds[0]
        blue = item["video"][2, 0]  # (H, W) of frame 0: the gradient rises to the right unless flipped
        flipped = bool(blue[:, -1].mean() < blue[:, 0].mean())
        assert item["label"] == (1 if flipped else 0)
        flips += flipped
    assert 3 <= flips <= 17


def test_every_frame_gets_the_same_crop_and_colours():
    opts = {"short_side": 40, "scales": [1, 0.875, 0.75, 0.66, 0.5], "max_wh_scale_gap": 1,
            "color_jitter": [0.5, 0.5, 0.5, 0.1], "erase_prob": 1.0}
    tf = TrainClip(32, opts)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), np.uint8)
    for seed in range(10):
        torch.manual_seed(seed)
        out = tf(to_video(np.repeat(frame[None], 6, 0)), flip=bool(seed % 2))  # six identical frames
        assert out.shape == (3, 6, 32, 32)
        assert all(torch.equal(out[:, 0], out[:, t]) for t in range(1, 6))
    # and the crops differ between draws (a random crop, not a fixed one)
    outs = []
    for seed in range(2):
        torch.manual_seed(seed)
        outs.append(tf(to_video(np.repeat(frame[None], 2, 0)), flip=False))
    assert not torch.equal(outs[0], outs[1])


def test_both_layouts_give_the_same_samples(motion_root):
    base = {"clip_len": 8, "frame_interval": 2}
    folders = VideoTask(recipe(motion_root, layout="folders", **base))
    lists = VideoTask(recipe(motion_root, layout="list", **base))
    assert VideoTask(recipe(motion_root, **base))._layout() == "list"  # auto: the list file is there
    for split in ("train", "val"):
        cf, sf = folders.samples(split)
        cl, sl = lists.samples(split)
        assert cf == sorted(motion.CLASSES) and cl == list(motion.CLASSES)  # folder order is by name
        by_path_f = {str(Path(p).resolve()): cf[k] for p, k in sf}
        by_path_l = {str(Path(p).resolve()): cl[k] for p, k in sl}
        assert by_path_f == by_path_l and len(by_path_f) == (16 if split == "train" else 8)
    # and the same item comes out of either (names differ in order, so compare by class name)
    vf, vl = folders.val_dataset(), lists.val_dataset()
    names_f, names_l = folders.recipe.data.class_names, lists.recipe.data.class_names
    sf = {str(Path(p).resolve()): i for i, (p, _) in enumerate(vf.samples)}
    for j, (p, _) in enumerate(vl.samples):
        a, b = vl[j], vf[sf[str(Path(p).resolve())]]
        assert names_l[a["label"]] == names_f[b["label"]] and torch.equal(a["video"], b["video"])


def test_list_file_errors_name_the_line(tmp_path):
    root = tmp_path / "ds"
    write_video(root / "v" / "a.mp4", 20)
    (root / "classes.txt").write_text("walk\nrun\n")
    (root / "train_list.txt").write_text("v/a.mp4 0\nv/a.mp4 run\n")
    (root / "val_list.txt").write_text("# comment\n\nv/a.mp4 7\n")
    task = VideoTask(recipe(root))
    classes, samples = task.samples("train")
    assert classes == ["walk", "run"] and [k for _, k in samples] == [0, 1]
    with pytest.raises(DataError, match=r"val_list\.txt:3: label '7'"):
        task.samples("val")
    (root / "val_list.txt").write_text("just-a-path.mp4\n")
    with pytest.raises(DataError, match=r"val_list\.txt:1: expected"):
        task.samples("val")
    with pytest.raises(DataError, match="unknown option"):
        VideoTask(recipe(root, clip_length=8))
    with pytest.raises(DataError, match="test_crops must be one of 1, 3"):
        VideoTask(recipe(root, test_crops=5))
    with pytest.raises(DataError, match="frame_interval must be a positive integer"):
        VideoTask(recipe(root, frame_interval=0))


def test_bad_video_is_an_error_or_counted_when_skipping(tmp_path):
    root = tmp_path / "ds"
    write_video(root / "val" / "a" / "ok.mp4", 20)
    write_video(root / "val" / "b" / "ok.mp4", 20)
    bad = root / "val" / "b" / "broken.mp4"
    bad.write_bytes(b"\x00" * 300)
    task = VideoTask(recipe(root))
    ds = task.val_dataset()
    i = [Path(p).name for p, _ in ds.samples].index("broken.mp4")
    with pytest.raises(BadSampleError, match="broken.mp4"):
        ds[i]
    skipping = VideoTask(recipe(root, test_clips=2, test_crops=1))
    skipping.recipe.data.skip_bad_samples = True
    ds = skipping.val_dataset()
    batch = collate_skipping([ds[j] for j in range(len(ds))])
    assert batch["skipped"] == 1 and batch["video"].shape == (2, 2, 3, 8, 32, 32)


def test_too_short_video_without_padding_is_a_bad_sample(index_root):
    ds = VideoTask(recipe(index_root, out_of_bound="error")).val_dataset()
    assert ds[0]["video"].shape[0] == 30
    with pytest.raises(BadSampleError, match=r"b\.mp4: has 12 frames.*needs at least 15"):
        ds[1]


# ---------------------------------------------------------------------------------------------- model side

def test_views_are_averaged_as_softmax_probabilities(index_root):
    task = VideoTask(recipe(index_root))
    model = MeanColourModel(k=2)
    # two views of one video: mean red 0 -> logits (0, 0); mean red 5 -> logits (5, 10)
    video = torch.zeros(1, 2, 3, 8, 4, 4)
    video[0, 1, 0] = 5.0
    with torch.no_grad():
        p = task.probs(model, video)[0]
    expected = (np.array([0.5, 0.5]) + np.exp([5, 10]) / np.exp([5, 10]).sum()) / 2
    assert np.allclose(p.numpy(), expected, atol=1e-6)  # not softmax((2.5, 5)) = (0.076, 0.924)
    assert model.views == 2


def test_multi_view_eval_counts_and_metrics(index_root):
    task = VideoTask(recipe(index_root, test_clips=4, test_crops=3))
    ds = task.val_dataset()
    batch = collate_skipping([ds[0], ds[1]])
    assert batch["video"].shape == (2, 12, 3, 8, 32, 32)
    model = MeanColourModel(k=2)
    metric = task.metric()
    task.eval_step(model, batch, metric)
    assert model.views == 24
    m = metric.compute()
    assert m["count"] == 2 and "top5" not in m  # 2 classes: no top-5
    assert len(m["per_class_acc"]) == 2 and np.array(m["confusion"]).sum() == 2


def test_predict_gives_topk_per_file(index_root, tmp_path):
    task = VideoTask(recipe(index_root, test_clips=2, test_crops=3))
    task.recipe.data.class_names = ["a", "b", "c"]

    class Fixed(nn.Module):
        views = 0

        def forward(self, x):
            Fixed.views += len(x)
            return torch.tensor([[2.0, 1.0, 0.0]]).expand(len(x), 3)

    preds = task.predict(Fixed(), [str(index_root / "val")], topk=2)
    assert [Path(p["file"]).name for p in preds] == ["a.mp4", "b.mp4"]
    assert Fixed.views == 2 * 2 * 3
    e = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()  # 0.665, 0.245, 0.090
    for p in preds:
        assert [t["label"] for t in p["topk"]] == ["a", "b"]
        assert np.allclose([t["prob"] for t in p["topk"]], e[:2], atol=1e-5)
    json.dumps(preds)
    with pytest.raises(DataError, match="no such file"):
        task.predict(Fixed(), [str(tmp_path / "nothing.mp4")])



def test_predict_skips_unreadable_videos_given_a_handler(index_root, tmp_path):
    """Without a handler the first bad video stops predict; with one, it is handed the error and the rest run."""
    task = VideoTask(recipe(index_root, test_clips=1, test_crops=1))
    task.recipe.data.class_names = ["a", "b", "c"]
    folder = tmp_path / "mixed"
    good = [folder / "a.mp4", folder / "c.mp4"]
    for f in good:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes((index_root / "val" / "long" / "a.mp4").read_bytes())
    (folder / "b.mp4").write_bytes(b"this is not a video" * 50)

    class Fixed(nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, 1.0, 0.0]]).expand(len(x), 3)

    with pytest.raises(BadSampleError, match="b.mp4"):
        task.predict(Fixed(), [str(folder)])
    skipped = []
    preds = task.predict(Fixed(), [str(folder)], on_bad_sample=skipped.append)
    assert [p["file"] for p in preds] == [str(f) for f in good]
    assert len(skipped) == 1 and str(folder / "b.mp4") in str(skipped[0])

def test_fit_runs_on_motion_and_writes_the_report(motion_root, tmp_path):
    pytest.importorskip("mobilezoo.models.squeezetime")
    from mobilezoo.engine.loop import fit
    r = load_recipe("video_motion", {"data.name": str(motion_root), "out": str(tmp_path / "run"),
                                     "train.epochs": 1, "data.batch_size": 8, "train.threads": 1,
                                     "data.workers": 1})  # decoding in a DataLoader worker process
    task = VideoTask(r)
    m = fit(r, task)
    assert m["count"] == 8 and 0.0 <= m["top1"] <= 1.0 and "top5" in m  # 8 classes: top-5 reported
    run = Path(r.out)
    assert (run / "confusion.png").is_file() and "confusion matrix" in (run / "report.md").read_text()
    model = task.build_model()
    assert model(torch.zeros(2, 3, 16, 64, 64)).shape == (2, 8)


def test_example_inputs_are_single_view_clips_the_network_takes(index_root):
    """Export parity, INT8 calibration and latency run on (N, C, T, H, W) clips, not view stacks."""
    task = VideoTask(recipe(index_root))
    x = task.example_inputs(2)
    assert x.shape == (2, 3, 8, 32, 32)
    torch.testing.assert_close(x[0], task.calibration_dataset()[0]["video"][0].float())
    assert task.build_model().eval()(x).shape[0] == 2
