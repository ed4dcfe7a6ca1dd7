"""The converted official tiny-MOAT-0 fine-tuned on the embedded digits from the command line:
the run starts from the file's weights with a new 10-class head, and records where they came from."""
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mobilezoo.cli import main
from mobilezoo.engine import loop

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "deeplab2_tiny_moat_0"


def test_train_from_the_converted_fixture(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "tiny_moat_0.safetensors"
    assert main(["convert", str(FIXTURE / "model.ckpt"), "--out", str(converted)]) == 0
    initial = {}

    def capture(model, path, *args, **kwargs):  # the run's weights right after it loaded the file
        reset = real(model, path, *args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return reset

    real = loop.load_pretrained
    monkeypatch.setattr(loop, "load_pretrained", capture)
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", "classify_digits", "--epochs", "1", "--batch-size", "16", "--img-size", "32",
                   "--device", "cpu", "--set", f"model.checkpoint={converted}", "--set", "data.limit_train=32",
                   "--set", "data.limit_val=16", "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
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
