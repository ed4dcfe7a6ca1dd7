"""load_pretrained: a head sized for other classes is re-initialised, everything else loads strictly."""
import pytest
import torch
from safetensors.torch import save_file

from mobilezoo.models import CheckpointError, create_model
from mobilezoo.models.weights import head_keys, load_pretrained


def _save(model_or_state, path):
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def moat_1000(tmp_path_factory):
    torch.manual_seed(1)
    model = create_model("tiny_moat_0", num_classes=1000)
    return _save(model, tmp_path_factory.mktemp("w") / "moat1000.safetensors"), model.state_dict()


def test_a_head_for_other_classes_keeps_its_fresh_init_and_the_rest_loads(moat_1000):
    path, file_state = moat_1000
    torch.manual_seed(2)
    model = create_model("tiny_moat_0", num_classes=10)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reset = load_pretrained(model, path)
    assert reset is not None and reset.keys == ("head.weight", "head.bias")
    assert str(reset) == f"{path}: head re-initialised for 10 classes (file has 1000): head.weight, head.bias"
    state = model.state_dict()
    for k, v in state.items():
        if k in reset.keys:
            assert torch.equal(v, fresh[k]) and v.shape[0] == 10
        else:
            assert torch.equal(v, file_state[k]), k


def test_a_head_of_the_same_size_loads(moat_1000):
    path, file_state = moat_1000
    model = create_model("tiny_moat_0", num_classes=1000)
    assert load_pretrained(model, path) is None
    assert all(torch.equal(v, file_state[k]) for k, v in model.state_dict().items())


def test_any_other_mismatch_is_still_the_one_line_error(moat_1000, tmp_path):
    path, file_state = moat_1000
    state = dict(file_state)
    state["stem.0.weight"] = state["stem.0.weight"][:16]  # mis-shaped outside the head
    del state["stages.0.0.expand.0.weight"]  # missing
    state["extra.weight"] = torch.zeros(1)  # unexpected
    bad = _save(state, tmp_path / "bad.safetensors")
    model = create_model("tiny_moat_0", num_classes=10)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert "stem.0.weight" in msg and "stages.0.0.expand.0.weight" in msg and "extra.weight" in msg
    assert "head.weight" not in msg  # the head is not what is wrong


def test_ssdlite_class_heads_reset_box_heads_and_backbone_load(tmp_path):
    """A COCO detector (90 classes + background slot = 91 logits) into a 5-class detector."""
    torch.manual_seed(1)
    coco = create_model("ssdlite_mobiledet_cpu", num_classes=90, background_class=True)
    path = _save(coco, tmp_path / "coco.safetensors")
    model = create_model("ssdlite_mobiledet_cpu", num_classes=5)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    reset = load_pretrained(model, path)
    assert set(reset.keys) == {f"cls_heads.{i}.1.{p}" for i in range(6) for p in ("weight", "bias")}
    assert set(head_keys(model)) == set(reset.keys)
    assert (reset.num_classes, reset.file_classes) == (5, 91)
    file_state = coco.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k] if k in reset.keys else file_state[k]), k
    assert any(k.startswith("box_heads.") for k in file_state)  # box heads were among what loaded
