"""Every registered model keeps the same contract, as timm's test_models checks its zoo: built by
timm's create_model, forward and backward at a small size, every parameter reached by the
gradient, feature maps where it is a backbone, the fused inference copy and the ONNX export
computing what the model computes."""
import pytest
import timm
import torch
from torch import nn

import mobilezoo  # noqa: F401  (registers the models with timm)
from mobilezoo.deploy.export import export_onnx
from mobilezoo.layers.fuse import fuse_for_inference
from mobilezoo.models import get_entry, list_models
from mobilezoo.tasks import task_of

# The three largest MOATs (73M-483M parameters) take minutes on 2 cores: they run with the slow tests.
HEAVY = {"moat_2", "moat_3", "moat_4"}
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()]
SMALL = {"classify": {"num_classes": 7}, "detect": {"num_classes": 3}, "video": {"num_classes": 5}}
# One model per family is exported (the export is per family; the variants differ only in sizes).
EXPORTED = ["tiny_moat_0", "ssdlite_mobiledet_cpu", "squeezetime_mini", "revunet3d"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model through timm's create_model, and a small batch of the task's inputs."""
    task, entry = task_of(name), get_entry(name)
    shape = task.inputs.sample_shape(quick=True)
    if entry.task == "classify":
        shape = (3, 64, 64)  # MOAT-4 has 480M parameters: the smallest side with all four strides
    kwargs = {**SMALL.get(entry.task, {}), **({"num_frames": shape[1]} if entry.task == "video" else {})}
    if name == "ssdlite_mobiledet":
        kwargs["arch"] = "cpu"  # the detector of any architecture (a searched one's file, or a named one)
    if entry.task == "classify":
        kwargs["drop_path_rate"] = 0.0  # a dropped residual branch gets no gradient by design
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    batch = 1 if entry.task == "segment3d" else 2
    return model, torch.randn(batch, *shape)


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding them changes the convolutions."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []  # sizes and other plain values


def _loss(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if get_entry(name).task == "detect":
        # one box per anchor scale, so that every level's box head has a matched anchor
        side = x.shape[-1]
        boxes = torch.tensor([[1.0, 1.0, 1 + f * side, 1 + f * side] for f in (0.12, 0.25, 0.4, 0.55, 0.75, 0.97)])
        targets = [{"boxes": boxes, "labels": torch.arange(len(boxes)) % 3} for _ in range(len(x))]
        return sum(model(x, targets).values())
    return sum(t.float().square().mean() for t in _tensors(model(x)))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_every_parameter(name):
    model, x = _build(name)
    model.train()
    loss = _loss(name, model, x)
    assert torch.isfinite(loss)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not
                                                                                p.grad.abs().sum() > 0)]
    assert not unreached, f"{len(unreached)} parameters get no gradient, e.g. {unreached[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_fused_copy_computes_the_same(name):
    model, x = _build(name)
    model, network = _randomise_bn(model).eval(), task_of(name).network  # detectors: the raw heads
    with torch.no_grad():
        ref, fused = network(model)(x), network(fuse_for_inference(model))(x)
    for r, f in zip(_tensors(ref), _tensors(fused)):
        assert r.shape == f.shape
        torch.testing.assert_close(f, r, rtol=1e-3, atol=1e-3 * max(1.0, float(r.abs().max())))


@pytest.mark.parametrize("name", [n for n in NAMES if get_entry(getattr(n, "values", [n])[0]).task == "classify"])
def test_classifiers_give_feature_maps_at_strides_4_to_32(name):
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True).eval()
    side = 64
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, side, side))
    reductions = [backbone.feature_info[i]["reduction"] for i in backbone.out_indices]
    assert reductions == [4, 8, 16, 32][-len(reductions):]
    for m, r in zip(maps, reductions):
        assert m.shape[-2:] == (side // r, side // r)


@pytest.mark.parametrize("name", EXPORTED)
def test_export_computes_what_the_model_computes(name, tmp_path):
    model, x = _build(name)
    task = task_of(name)
    model = _randomise_bn(model).eval()
    info = export_onnx(model, x, tmp_path / f"{name}.onnx", task, dynamic_batch=not task.export_modes,
                       mode=task.int8_mode, threads=1)
    assert info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]
