"""SqueezeTime's PyTorch releases through `mobilezoo convert`: the class count comes from the file
(K400 400, K600 600, HMDB51 51, or none for the ImageNet-1k backbone)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mobilezoo.cli import main
from mobilezoo.models import create_model


def _mmaction_file(path, model, head: bool = True):
    """An mmaction2-style release: `backbone.*` (+ `cls_head.fc_cls.*`) in a `state_dict`."""
    state = {("cls_head.fc_cls." + k[5:]) if k.startswith("head.") else "backbone." + k: v
             for k, v in model.state_dict().items() if head or not k.startswith("head.")}
    torch.save({"meta": {"epoch": 100}, "state_dict": state}, path)


@pytest.mark.parametrize("classes", [51, 0])
def test_class_count_is_read_off_the_file(tmp_path, classes):
    torch.manual_seed(classes)
    src = create_model("squeezetime_mini", num_classes=classes or 400)
    _mmaction_file(tmp_path / "release.pth", src, head=bool(classes))
    out = tmp_path / "sqt.safetensors"
    assert main(["convert", str(tmp_path / "release.pth"), "--model", "squeezetime_mini", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["mobilezoo.num_classes"] == str(classes)
    assert json.loads(meta["mobilezoo.mean"]) == [0.485, 0.456, 0.406]  # the release configs' ImageNet statistics
    converted = load_file(str(out))
    assert ("head.weight" in converted) == bool(classes)
    expected = {k: v for k, v in src.state_dict().items() if classes or not k.startswith("head.")}
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], v) for k, v in expected.items())
    model = create_model("squeezetime_mini", checkpoint=out).eval()  # builds the file's head (or none)
    with torch.no_grad():
        y = model(torch.randn(1, 3, 16, 64, 64))
    assert y.shape == (1, classes or src.num_features)
