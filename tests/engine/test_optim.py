"""The optimizer: one fused kernel per step on CPU, with the arithmetic of PyTorch's reference loop."""
import pytest
import torch
from torch import nn

from mobilezoo.engine.optim import build_optimizer


def _model() -> nn.Module:
    """No conv bias before the BatchNorm: its gradient is rounding noise, which Adam scales up to +-lr."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_step_equals_the_reference_loop(name):
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    ours, ref = _model(), _model()
    ours(x), ref(x)  # materialise the lazy layer
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, 0.01, 0.05, (0.9, 0.999), name=name)
    assert all(g["fused"] for g in opt.param_groups)
    # PyTorch's single-tensor loop, the same groups: decay on weights, none on biases and norms.
    groups = [{"params": [p for p in ref.parameters() if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in ref.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        loop = torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, foreach=False)
    else:
        loop = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.999), foreach=False)
    for model, optimizer in ((ours, opt), (ref, loop)):
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a - b).abs().max() > 0 for a, b in zip(ours.parameters(), _model().parameters()) if a.shape == b.shape)
