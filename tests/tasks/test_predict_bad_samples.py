"""Bad image files at predict time: short error messages, 16-bit PNGs read as 8-bit, and
`mobilezoo predict --skip-bad-samples` (classification; detection is in test_detection.py)."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilezoo.cli import main
from mobilezoo.errors import BadSampleError
from mobilezoo.models.weights import save_weights
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task
from mobilezoo.tasks.base import read_image


@pytest.fixture(autouse=True)
def _torch_globals(monkeypatch, tmp_path):
    """One thread, a private cache; restore threads and autograd (predict switches it off)."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


def _png_bytes(size=(24, 16), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


CORRUPT = {
    "noise.png": lambda: np.random.default_rng(1).bytes(300),
    "noise.jpg": lambda: np.random.default_rng(2).bytes(300),
    "truncated.png": lambda: _png_bytes()[:60],
    "truncated.jpg": lambda: _jpeg_bytes()[:200],
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_unreadable_image_error_is_the_file_and_a_short_reason(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(CORRUPT[name]())
    with pytest.raises(BadSampleError) as e:
        read_image(path)
    msg = str(e.value)
    m = re.fullmatch(re.escape(str(path)) + r": cannot read image \((.+)\)", msg)
    assert m, msg
    reason = m.group(1)
    assert "/" not in reason and ".cpp" not in reason and "csrc" not in reason, msg  # no library build path
    assert len(reason) < 80, msg


def test_16_bit_png_reads_as_8_bit_rgb(tmp_path):
    levels = np.array([[0, 257 * 100, 257 * 200, 65535]], np.uint16)
    im = Image.fromarray(levels)
    assert im.mode == "I;16"
    im.save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 4)
    assert image[0].tolist() == [[0, 100, 200, 255]]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


# --- mobilezoo predict --skip-bad-samples (classification) -------------------------------------

CLASSES = ["blue", "green", "red"]


@pytest.fixture
def classify_run(tmp_path) -> Path:
    """A run directory holding an untrained tiny MOAT at 32 px (enough to predict with)."""
    recipe = load_recipe("classify_digits", {"data.name": str(tmp_path / "unused"), "data.class_names": CLASSES,
                                             "train.device": "cpu", "train.threads": 1})
    run = tmp_path / "run"
    run.mkdir()
    recipe.save(run / "config.yaml")
    torch.manual_seed(0)
    save_weights(build_task(recipe).build_model(), run / "model.safetensors")
    return run


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Three readable images and two unreadable ones, sorted so that a bad one comes second."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, colour in (("a.png", (0, 0, 255)), ("c.png", (0, 255, 0)), ("e.png", (255, 0, 0))):
        (folder / name).write_bytes(_png_bytes(colour=colour))
    (folder / "b.png").write_bytes(CORRUPT["noise.png"]())
    (folder / "d.jpg").write_bytes(CORRUPT["truncated.jpg"]())
    return folder


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_classification_predict_stops_at_the_first_bad_file_in_one_line(classify_run, mixed_folder, capsys):
    rc, out, err = _cli(capsys, "predict", classify_run, mixed_folder)
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("mobilezoo predict: error: ") and str(mixed_folder / "b.png") in line
    assert "/__w/" not in line and ".cpp" not in line


def test_classification_predict_skips_counts_and_names_bad_files(classify_run, mixed_folder, capsys, tmp_path):
    rc, out, err = _cli(capsys, "predict", classify_run, mixed_folder, "--skip-bad-samples",
                        "--out", tmp_path / "preds.json", "--topk", 2)
    assert rc == 0, err
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert [Path(p["file"]).name for p in preds] == ["a.png", "c.png", "e.png"]
    assert all(len(p["topk"]) == 2 and p["topk"][0]["label"] in CLASSES for p in preds)
    warnings = [ln for ln in err.splitlines() if ln.startswith("mobilezoo predict: warning: skipped")]
    assert len(warnings) == 2
    assert str(mixed_folder / "b.png") in warnings[0] and str(mixed_folder / "d.jpg") in warnings[1]
    assert "2 unreadable inputs skipped, 3 predicted" in err


def test_classification_predict_with_nothing_readable_is_an_error(classify_run, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(CORRUPT["noise.png"]())
    rc, _, err = _cli(capsys, "predict", classify_run, tmp_path / "bad", "--skip-bad-samples")
    assert rc == 2 and "none of the inputs could be read (1 skipped)" in err


def test_classification_predicts_a_16_bit_png_like_its_8_bit_copy(classify_run, tmp_path, capsys):
    grey = np.tile(np.linspace(0, 255, 32).round().astype(np.uint16), (32, 1))
    (tmp_path / "grey").mkdir()
    Image.fromarray(grey * 257).save(tmp_path / "grey" / "deep.png")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey" / "flat.png")
    rc, out, err = _cli(capsys, "predict", classify_run, tmp_path / "grey", "--topk", 3)
    assert rc == 0, err
    deep, flat = json.loads(out)
    assert deep["topk"] == flat["topk"]
