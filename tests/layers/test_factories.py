"""The shared activation / norm tables, TF-'same' padding helper and the 2-D / 3-D squeeze-excite."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilezoo.layers.conv import Conv2dSame, reference_padding, same_padding
from mobilezoo.layers.factories import get_act, get_norm
from mobilezoo.layers.squeeze_excite import SqueezeExcite


def test_activation_table_gives_the_torch_classes():
    assert get_act("relu6") is nn.ReLU6 and get_act("hswish") is nn.Hardswish and get_act("silu") is nn.SiLU
    with pytest.raises(ValueError, match="swish2"):
        get_act("swish2")


def test_norm_factory_builds_each_kind_at_each_dimension():
    gn = get_norm("group", dims=3)(16)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8 and gn.num_channels == 16
    inorm = get_norm("instance", dims=3)(4)
    assert isinstance(inorm, nn.InstanceNorm3d) and inorm.affine
    bn = get_norm("batch", eps=0.01, momentum=0.03)(5)
    assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 0.01 and bn.momentum == 0.03
    assert isinstance(get_norm("batch", dims=3)(5), nn.BatchNorm3d)
    with pytest.raises(ValueError, match="layer"):
        get_norm("layer")


@pytest.mark.parametrize("size", [7, 8, 9])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 2), (4, 1)])
def test_same_padding_matches_padding_the_input_as_tf_does(size, kernel, stride):
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel, stride)
    x = torch.randn(1, 3, size, size + 1)
    total = [max((-(-n // stride) - 1) * stride + kernel - n, 0) for n in x.shape[-2:]]
    ref = F.conv2d(F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)),
                   conv.weight, conv.bias, stride)
    for pad_weights in (True, False):
        xp, w, padding = same_padding(x, conv.weight, stride, pad_weights=pad_weights)
        torch.testing.assert_close(F.conv2d(xp, w, conv.bias, stride, padding), ref, rtol=1e-5, atol=1e-5)
    with reference_padding():
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_squeeze_excite_gates_each_channel_by_its_mean(dims):
    torch.manual_seed(0)
    se = SqueezeExcite(6, 2, act=nn.ReLU, dims=dims)
    x = torch.randn((2, 6) + (5,) * dims)
    mean = x.flatten(2).mean(-1)
    gate = torch.sigmoid(F.linear(F.relu(F.linear(mean, se.reduce.weight.flatten(1), se.reduce.bias)),
                                  se.expand.weight.flatten(1), se.expand.bias))
    ref = x * gate.view((2, 6) + (1,) * dims)
    torch.testing.assert_close(se(x), ref, rtol=1e-5, atol=1e-6)
    assert sorted(k for k, _ in se.state_dict().items()) == ["expand.bias", "expand.weight", "reduce.bias",
                                                             "reduce.weight"]


def test_squeeze_excite_traces_with_a_global_pool():
    # Traced, the pool must not bake in the input size: a traced SE serves another size.
    torch.manual_seed(0)
    se = SqueezeExcite(4, 2).eval()
    traced = torch.jit.trace(se, torch.randn(1, 4, 6, 6))
    x = torch.randn(1, 4, 9, 5)
    torch.testing.assert_close(traced(x), se(x), rtol=1e-5, atol=1e-6)


def test_squeeze_excite_refuses_other_dims():
    with pytest.raises(ValueError, match="dims=1"):
        SqueezeExcite(4, 2, dims=1)
