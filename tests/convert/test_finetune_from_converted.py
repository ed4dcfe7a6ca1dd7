"""The converted official tiny-MOAT-0 fine-tuned from the command line: on the embedded digits, the run
starts from the file's weights with a new 10-class head; as DeepLabv3+'s backbone, from its backbone
tensors; both record where the weights came from."""
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mobilezoo.cli import main
from mobilezoo.engine import loop

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "deeplab2_tiny_moat_0"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny_moat_0.safetensors"
    assert main(["convert", str(FIXTURE / "model.ckpt"), "--out", str(out)]) == 0
    return out


def train_capturing(monkeypatch, loader: str, argv: list[str]) -> tuple[int, dict]:
    """`mobilezoo train ARGV` on one thread; the run's weights captured right after `loop.LOADER` loaded the file."""
    initial, real = {}, getattr(loop, loader)

    def capture(model, path, *args, **kwargs):
        result = real(model, path, *args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(loop, loader, capture)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["train", *argv, "--device", "cpu"]), initial
    finally:
        torch.set_num_threads(threads)


def test_train_from_the_converted_fixture(tmp_path, capsys, monkeypatch, converted):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rc, initial = train_capturing(monkeypatch, "load_pretrained", [
        "classify_digits", "--epochs", "1", "--batch-size", "16", "--img-size", "32",
        "--set", f"model.checkpoint={converted}", "--set", "data.limit_train=32", "--set", "data.limit_val=16",
        "--out", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "head re-initialised for 10 classes (file has 1000)" in out
    file_state = load_file(str(converted))
    assert initial.keys() == file_state.keys()
    backbone = [k for k in file_state if not k.startswith("head.")]
    assert len(backbone) > 300 and all(torch.equal(initial[k], file_state[k]) for k in backbone)
    assert initial["head.weight"].shape == (10, 256)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["source"] == str(FIXTURE / "model.ckpt")
    assert config["data"]["mean"] == [0.485, 0.456, 0.406] and config["data"]["std"] == [0.229, 0.224, 0.225]


def test_converted_classifier_as_the_backbone_of_a_segmenter(tmp_path, capsys, monkeypatch, converted):
    """model.backbone_checkpoint: the classifier's tensors go into DeepLabv3+'s backbone (its norm and head
    left out, said in one line), the decoder starts fresh, and the file's normalisation is the run's."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "seg"
    rc, initial = train_capturing(monkeypatch, "load_backbone", [
        "segment_shapes", "--epochs", "1", "--batch-size", "4", "--img-size", "64",
        "--set", f"model.backbone_checkpoint={converted}", "--set", "data.augment.resize=64",
        "--set", "data.limit_train=8", "--set", "data.limit_val=4", "--set", "train.bn_recalibrate=1",
        "--out", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "left out 4 tensors of the classifier (head.*, norm.*)" in out
    file_state = load_file(str(converted))
    backbone = {k[len("backbone."):]: v for k, v in initial.items() if k.startswith("backbone.")}
    assert len(backbone) > 300 and all(torch.equal(v, file_state[k]) for k, v in backbone.items())
    assert any(k.startswith("aspp.") for k in initial)  # the rest of the segmenter is there, fresh
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["args"]["backbone"] == "tiny_moat_0"
    assert config["model"]["source"] == str(FIXTURE / "model.ckpt")
    assert config["data"]["mean"] == [0.485, 0.456, 0.406]


def test_backbone_checkpoint_errors_are_one_line(tmp_path, capsys, monkeypatch, converted):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    base = ["train", "segment_shapes", "--epochs", "1", "--img-size", "64", "--set", "data.limit_train=8",
            "--out", str(tmp_path / "run")]
    cases = [  # another backbone named than the file holds; a model without a backbone; both files given
        (["--set", f"model.backbone_checkpoint={converted}", "--set", "model.args.backbone=tiny_moat_1"],
         "holds a tiny_moat_0, but model.args.backbone is tiny_moat_1"),
        (["--model", "tiny_moat_0", "--set", f"model.backbone_checkpoint={converted}"], "has no backbone"),
        (["--set", f"model.backbone_checkpoint={converted}", "--set", f"model.checkpoint={converted}"],
         "both set"),
    ]
    for extra, message in cases:
        args = base if "--model" not in extra else ["train", "classify_digits", "--epochs", "1", "--img-size", "32",
                                                    "--set", "data.limit_train=8", "--out", str(tmp_path / "c")]
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_converted_detector_gives_its_backbone_to_a_segmenter(tmp_path):
    """The Object Detection API's MobileDet-CPU, converted, as DeepLabv3+'s backbone: the file says it holds an
    ssdlite_mobiledet_cpu, which is not the backbone's name, so the recipe's `mobiledet_cpu` stands and
    only the normalisation is taken; its backbone.* tensors load."""
    from mobilezoo.engine.finetune import apply_checkpoint_metadata
    from mobilezoo.models import create_model
    from mobilezoo.models.weights import load_backbone
    from mobilezoo.recipes import load_recipe
    out = tmp_path / "mobiledet.safetensors"
    assert main(["convert", str(FIXTURE.parent / "tfod_ssdlite_mobiledet_cpu" / "model.ckpt"), "--out", str(out)]) == 0
    recipe = load_recipe("segment_shapes", ["model.args.backbone=mobiledet_cpu", f"model.backbone_checkpoint={out}"])
    apply_checkpoint_metadata(recipe)
    assert recipe.model.args["backbone"] == "mobiledet_cpu" and "backbone_args" not in recipe.model.args
    assert recipe.data.mean is not None and recipe.model.source is not None
    seg = create_model("deeplabv3plus", num_classes=6, **{k: v for k, v in recipe.model.args.items()})
    assert "backbone tensors loaded into MobileDetBackbone; left out" in load_backbone(seg, out)
    file_state = load_file(str(out))
    assert all(torch.equal(v, file_state["backbone." + k]) for k, v in seg.backbone.state_dict().items())
