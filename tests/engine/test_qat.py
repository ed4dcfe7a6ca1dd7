"""Quantization-aware training: fake INT8 where the LiteRT file computes in INT8, a plain state_dict,
and `train --qat` end to end (config, resume, export)."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

from mobilezoo.cli import main
from mobilezoo.engine import fit
from mobilezoo.engine.qat import FakeQuantizer, check_qat, fake_quant_weight
from mobilezoo.errors import UserError
from mobilezoo.models import create_model
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task


def _int8(t: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 on the tensor's own min/max widened to include 0 (TFLite's activation scheme)."""
    lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
    scale = (hi - lo) / 255
    zero = round(-128 - lo / scale)
    return (torch.clamp(torch.round(t / scale) + zero, -128, 127) - zero) * scale


def _int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, [-127, 127]."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def test_fake_quantized_forward_equals_a_manual_int8_simulation():
    """Input, conv (+ fused ReLU6: one rounding after it, none before), conv, hard-swish: each rounded where
    the LiteRT file holds an int8 tensor, weights per channel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 3, 1), nn.Hardswish())
    x = torch.randn(1, 2, 6, 6) * 3
    with torch.no_grad():
        plain = net(x)
        h = F.relu6(F.conv2d(_int8(x), _int8_weight(net[0].weight), net[0].bias, padding=1))
        g = F.conv2d(_int8(h), _int8_weight(net[2].weight), net[2].bias)
        expected = _int8(F.hardswish(_int8(g)))
    fq = FakeQuantizer(net)
    assert "0" not in fq.observers  # the conv's output before the fused ReLU6 is not an int8 tensor
    with torch.no_grad():
        trained = net.train()(x)  # one sample: the observed range is its min/max
        evaluated = net.eval()(x)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-6)
    assert (evaluated - plain).abs().max() > 1e-3
    with torch.no_grad(), fq.disabled():
        torch.testing.assert_close(net(x), plain)
    fq.remove()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain)


def test_weights_round_per_output_channel_to_at_most_255_levels():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-3, 1, 6).view(-1, 1, 1, 1)
    q = fake_quant_weight(w)
    for c in range(6):
        scale = w[c].abs().max() / 127
        levels = q[c] / scale
        assert q[c].unique().numel() <= 255
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
        assert (q[c] - w[c]).abs().max() <= scale / 2 + 1e-6
        torch.testing.assert_close(q[c].abs().max(), w[c].abs().max())


@pytest.mark.parametrize("name", ["ssdlite_mobiledet_cpu", "tiny_moat_0"])
def test_state_dict_keys_and_modules_stay_the_plain_models(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    keys, modules = list(model.state_dict()), [n for n, _ in model.named_modules()]
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        plain = model(x) if name.startswith("tiny") else model.head_outputs(x)[1]
    fq = FakeQuantizer(model)
    model.train()
    with torch.no_grad():
        model(x)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == modules
    assert "input" in fq.state_dict()
    model.eval()
    with torch.no_grad():
        fake = model(x) if name.startswith("tiny") else model.head_outputs(x)[1]
    assert not torch.allclose(fake, plain, atol=1e-4)
    if name.startswith("ssdlite"):  # the file's outputs: the concatenated raw heads
        assert {"head_outputs.boxes", "head_outputs.logits"} <= set(fq.state_dict())


def _int8_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MSE of `net` in simulated INT8, its ranges calibrated afresh on `x`."""
    net = copy.deepcopy(net)
    FakeQuantizer(net)
    with torch.no_grad():
        net.train()(x)
        return F.mse_loss(net.eval()(x), y).item()


def test_qat_lowers_the_int8_error_of_exact_fp32_weights():
    """A net that fits its targets exactly in fp32 (its own outputs) errs in INT8; fine-tuning it through
    fake INT8 moves its weights so that the simulated INT8 error drops (and the fp32 one rises above 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Hardswish(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU6(), nn.Conv2d(16, 4, 1))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        y = net(x)
    before = _int8_loss(net, x, y)
    assert before > 1e-6
    fq = FakeQuantizer(net)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    net.train()
    for _ in range(50):
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
    fq.remove()
    after = _int8_loss(net, x, y)
    with torch.no_grad():
        fp32_after = F.mse_loss(net(x), y).item()
    assert after < 0.85 * before, (before, after)
    assert fp32_after > 0


def _cli_train(folder, run, *flags):
    argv = ["train", "--qat", "--data", folder, "--img-size", 32, "--batch-size", 6, "--threads", 1,
            "--epochs", 2, "--out", run, "--set", "data.limit_train=12", "--set", "data.limit_val=6",
            "--set", "train.bn_recalibrate=1", "--set", "optim.warmup_epochs=0", *flags]
    assert main([str(a) for a in argv]) == 0


def test_cli_qat_run_resumes_exactly_keeps_plain_weights_and_exports(shapes_folder, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _cli_train(shapes_folder, straight)
    _cli_train(shapes_folder, split, "--stop-after", 1)
    assert main(["train", "--resume", str(split)]) == 0
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(split / "model.safetensors"))
    plain = create_model("tiny_moat_0", num_classes=3).state_dict()
    assert list(a) == list(b) and set(a) == set(plain)
    for k in a:  # the ranges observed in epoch 1 carry over the resume (they are in the trainer state)
        assert torch.equal(a[k], b[k]), k
    config = yaml.safe_load((straight / "config.yaml").read_text())
    assert config["train"]["qat"] is True
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_fake_int8"] is True for r in records)
    assert "fake-quantized INT8" in (straight / "report.md").read_text()
    capsys.readouterr()  # the saved weights are a plain model's: the export loads and checks them as any run's
    assert main(["export", str(straight), "--check-samples", "2"]) == 0
    assert "passed" in capsys.readouterr().out


class _Volumes:
    name = "segment3d"

    class inputs:
        spatial = 3


def test_qat_refusals_are_user_errors(shapes_folder, tiny_overrides, tmp_path):
    recipe = load_recipe(None, tiny_overrides(shapes_folder, tmp_path / "r", **{"train.qat": True}))
    with pytest.raises(UserError, match="segment3d model cannot be exported to LiteRT"):
        check_qat(recipe, _Volumes())
    for key, value, says in (("train.precision", "bf16", "must be fp32"), ("train.ema_decay", 0.9, "ema_decay")):
        bad = load_recipe(None, tiny_overrides(shapes_folder, tmp_path / key, **{"train.qat": True, key: value}))
        with pytest.raises(UserError, match=says):
            fit(bad, build_task(bad))
        assert not (tmp_path / key).exists()
