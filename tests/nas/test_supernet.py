"""Supernet: a sampled sub-network with inherited weights equals the standalone model."""
import random

import pytest
import torch
from torch import nn

from mobilezoo.models import create_model
from mobilezoo.nas.space import sample, to_arch
from mobilezoo.nas.supernet import SuperDetector, export_weights


def _randomise_bn(net: nn.Module, seed: int) -> None:
    # Non-trivial running statistics and affine parameters, so that slicing them wrongly shows.
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def _archs(space, n, seed, want=("tucker", "fused", "ibn")):
    """n random choice vectors, resampled until together they hold skips and every wanted family."""
    rng = random.Random(seed)
    while True:
        cs = [sample(space, rng) for _ in range(n)]
        archs = [to_arch(space, c) for c in cs]
        types = {layer["type"] for a in archs for layer in a}
        if set(want) <= types and any(len(a) < space.num_positions for a in archs):
            return cs


@pytest.mark.parametrize("se, act", [(False, "relu6"), (True, "hswish")])
def test_subnetwork_equals_standalone(tiny_space, se, act):
    space = tiny_space(se=se, act=act)
    torch.manual_seed(0)
    net = SuperDetector(space, num_classes=3)
    _randomise_bn(net, 1)
    net.eval()
    x = torch.randn(2, 3, 64, 96)
    for choices in _archs(space, 4, seed=2):
        arch = to_arch(space, choices)
        std = create_model("ssdlite_mobiledet", arch=arch, num_classes=3)
        std.load_state_dict(export_weights(net, choices))  # strict: every tensor of the standalone model
        std.eval()
        with torch.no_grad():
            got, ref = net.head_outputs(x, choices), std.head_outputs(x)
            assert got[2] == ref[2]
            torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
            det_sup, det_std = net(x, choices=choices), std(x)
        torch.testing.assert_close(det_sup[0]["scores"], det_std[0]["scores"], atol=1e-5, rtol=1e-5)


def test_training_step_matches_standalone(tiny_space):
    # Train-mode BN (batch statistics) and the detection loss: same loss and same gradient.
    space = tiny_space()
    torch.manual_seed(0)
    net = SuperDetector(space, num_classes=3).train()
    choices = _archs(space, 1, seed=5, want=("tucker",))[0]
    std = net.standalone(choices).train()
    x = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([2])}]
    loss_sup = sum(net(x, targets, choices).values())
    loss_std = sum(std(x, targets).values())
    torch.testing.assert_close(loss_sup, loss_std, atol=1e-5, rtol=1e-5)
    loss_sup.backward()
    loss_std.backward()
    g_std = std.backbone.layers[0][0].weight.grad
    g_sup = net.backbone.stem[0].weight.grad[: g_std.shape[0]]
    torch.testing.assert_close(g_sup, g_std, atol=1e-5, rtol=1e-4)
    # running statistics moved in the shared slice only (first C entries)
    c = std.backbone.layers[0][1].num_features
    torch.testing.assert_close(net.backbone.stem[1].running_mean[:c], std.backbone.layers[0][1].running_mean)


def test_choices_share_leading_filters_and_centre_kernels(tiny_space):
    space = tiny_space(("ibn",))
    net = SuperDetector(space, num_classes=3)
    names = [d.name for d in space.decisions]
    k = names.index("block3.layer0.op")
    ops = space.decisions[k].options
    small, big = [0] * len(names), [0] * len(names)
    small[k], big[k] = ops.index("ibn_k3_e4"), ops.index("ibn_k5_e8")
    pos = space.decisions[k].position
    w_small = export_weights(net, small)[f"backbone.layers.{pos}.body.1.0.weight"]
    w_big = export_weights(net, big)[f"backbone.layers.{pos}.body.1.0.weight"]
    assert w_small.shape[0] * 2 == w_big.shape[0] and w_small.shape[-1] == 3 and w_big.shape[-1] == 5
    torch.testing.assert_close(w_small, w_big[: w_small.shape[0], :, 1:4, 1:4], rtol=0, atol=0)


def test_supernet_is_an_ssdlite_over_its_backbone_and_loads_old_key_layouts(tiny_space):
    from mobilezoo.models.ssdlite import SSDLite
    torch.manual_seed(0)
    net = SuperDetector(tiny_space(), num_classes=3)
    assert isinstance(net, SSDLite) and not hasattr(net, "det")
    state = net.state_dict()
    # the layout saved before the supernet was composed: stem./layers. at the top, the tail under det.
    old = {(k[len("backbone."):] if k.startswith("backbone.") else "det." + k): v + 1 for k, v in state.items()}
    fresh = SuperDetector(tiny_space(), num_classes=3)
    fresh.load_state_dict(old)  # strict
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[k] + 1, rtol=0, atol=0)
