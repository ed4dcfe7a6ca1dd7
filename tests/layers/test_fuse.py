"""BN folding and conv+activation fusion give the same function as the unfused modules."""
import pytest
import torch
from torch import nn

import mobilezoo  # noqa: F401
from mobilezoo.layers.conv import Conv2dSame, ConvNormAct
from mobilezoo.layers.fuse import (
    FusedConvAct,
    GatedConv1x1,
    fold_bn_after,
    fold_bn_before,
    fuse_for_inference,
    replace_modules,
)
from mobilezoo.models import create_model


def _random_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return bn.eval()


def _randomise_all_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m)
    return model.eval()


def test_fold_bn_after_conv_is_exact():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 8, 3, padding=1, bias=False), _random_bn(nn.BatchNorm2d(8))
    x = torch.randn(2, 6, 9, 9)
    ref = bn(conv(x))
    torch.testing.assert_close(fold_bn_after(conv, bn)(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_bn_before_1x1_conv_is_exact():
    torch.manual_seed(0)
    bn, conv = _random_bn(nn.BatchNorm2d(6)), nn.Conv2d(6, 8, 1, bias=True)
    x = torch.randn(2, 6, 5, 7)
    ref = conv(bn(x))
    torch.testing.assert_close(fold_bn_before(bn, conv)(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_bn_before_refuses_a_padded_conv():
    with pytest.raises(ValueError, match="1x1"):
        fold_bn_before(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.GELU])
@pytest.mark.parametrize("kernel,stride,groups,size", [(1, 1, 1, 8), (3, 2, 1, 9), (5, 2, 12, 10), (3, 1, 12, 7)])
def test_fused_conv_act_matches_conv_bn_act(act, kernel, stride, groups, size):
    torch.manual_seed(0)
    block = ConvNormAct(12, 12, kernel, stride, groups=groups, act=act).eval()
    _random_bn(block[1])
    x = torch.randn(2, 12, size, size) * 3  # wide range so ReLU6 clips and GELU's tails matter
    with torch.no_grad():
        ref = block(x)
        fused = fuse_for_inference(block)
        assert isinstance(fused[0], FusedConvAct) and len(fused) == len(block)  # same slots: indexing still works
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), ref,
                                   rtol=1e-4, atol=1e-4)


def test_tf_same_padding_with_a_one_sided_pad_survives_fusion():
    """A strided Conv2dSame on an even input pads only after; the fused op must do the same."""
    torch.manual_seed(0)
    block = ConvNormAct(4, 4, 3, 2, act=nn.ReLU).eval()
    assert isinstance(block[0], Conv2dSame) and block[0].dynamic
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(nn.Sequential(block))(x), block(x), rtol=1e-5, atol=1e-5)


def test_fused_tiny_moat_equals_the_original_and_has_no_batchnorm_left():
    torch.manual_seed(0)
    model = _randomise_all_bn(create_model("tiny_moat_0", num_classes=10))
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # pre-norms folded too
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert sum(isinstance(m, GatedConv1x1) for m in fused.modules()) == 5  # every SE (stages 1-2)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref, out = model(x), fused(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fused(x).argmax(1), model(x).argmax(1))


def test_fused_model_with_autograd_falls_back_to_the_unfused_ops():
    torch.manual_seed(0)
    model = _randomise_all_bn(create_model("tiny_moat_0", num_classes=10))
    fused = fuse_for_inference(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_fused_detector_gives_the_same_detections():
    torch.manual_seed(0)
    model = _randomise_all_bn(create_model("ssdlite_mobiledet_cpu", num_classes=5))
    fused = fuse_for_inference(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    assert sum(isinstance(m, GatedConv1x1) for m in fused.modules()) == 19  # every SE of the CPU net
    x = torch.rand(1, 3, 160, 160) * 2 - 1
    with torch.inference_mode():
        ref, out = model(x)[0], fused(x)[0]
    assert len(out["boxes"]) == len(ref["boxes"])
    torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(out["scores"], ref["scores"], rtol=1e-3, atol=1e-4)


def test_fused_squeezetime_equals_the_original():
    """ResNet-style attribute triples (`fusable`) and lone convs are fused; outputs unchanged."""
    torch.manual_seed(0)
    model = _randomise_all_bn(create_model("squeezetime_mini", num_classes=8))
    fused = fuse_for_inference(model)
    block = fused.layer1[0]
    assert isinstance(block.conv1, FusedConvAct) and isinstance(block.bn1, nn.Identity)
    assert isinstance(fused.conv1, FusedConvAct) and isinstance(fused.relu, nn.Identity)
    assert not any(type(m) is nn.Conv2d for name, m in fused.named_modules() if not name.endswith(".conv"))
    x = torch.randn(2, 3, 16, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_a_used_fused_model_can_be_copied_and_cast_to_bf16():
    """Prepacked oneDNN weights have no storage: copies drop them and repack for their own dtype."""
    import copy
    torch.manual_seed(0)
    fused = fuse_for_inference(create_model("tiny_moat_0", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = fused(x)
        bf16 = copy.deepcopy(fused).to(torch.bfloat16)
        assert torch.equal(bf16(x.bfloat16()).argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name, shape", [("tiny_moat_0", (2, 3, 64, 64)), ("squeezetime_mini", (1, 3, 16, 64, 64))])
def test_folding_without_fusing_activations_keeps_plain_modules(name, shape):
    torch.manual_seed(0)
    model = _randomise_all_bn(create_model(name, num_classes=10))
    folded = fuse_for_inference(model, fuse_act=False)
    kinds = {type(m) for m in folded.modules()}
    assert FusedConvAct not in kinds and GatedConv1x1 not in kinds
    # only the BNs that a conv absorbs go: ResNet-style ones after a non-conv module (CTL) stay
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) < \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(type(m) is nn.GELU for m in folded.modules()) == sum(type(m) is nn.GELU for m in model.modules())
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_replace_modules_swaps_children_explicitly():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.ReLU(), nn.GELU()), nn.ReLU())
    out = replace_modules(model, lambda m: nn.SiLU() if isinstance(m, nn.ReLU) else None)
    assert out is model
    assert [type(m) for m in model.modules() if not list(m.children())] == [nn.Conv2d, nn.SiLU, nn.GELU, nn.SiLU]
