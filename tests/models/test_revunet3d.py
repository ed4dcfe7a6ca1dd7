"""Reversible MBConv 3D U-Net (spec revunet3d.md §1-2, §7): layout, parameter count, reversible vs
plain equivalence, options, and memory that stays flat as couplings are added."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mobilezoo.models.revunet3d  # noqa: F401  (registers revunet3d and unet3d_mbconv)
from mobilezoo.errors import UserError
from mobilezoo.layers.mbconv3d import MBConv3d
from mobilezoo.layers.reversible import AdditiveCoupling, ReversibleSequence
from mobilezoo.layers.squeeze_excite import SqueezeExcite
from mobilezoo.models.registry import create_model, get_entry, list_models
from mobilezoo.models.revunet3d import REGIONS, RevUNet3d

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(channels=(16, 32), encoder_blocks=(2, 2), decoder_blocks=(2,))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def n_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def spec_param_count(channels, enc, dec, t=4, in_ch=4, out_ch=3) -> int:
    """Parameters of the §2.2 layout, counted from its layer list (MBConv per §1.2, GN affine)."""
    def mbconv(h):  # expand 1x1x1 + GN, depthwise 3x3x3 + GN, project 1x1x1 + GN; no biases
        return t * h * h + 2 * t * h + 27 * t * h + 2 * t * h + t * h * h + 2 * h

    total = 27 * in_ch * channels[0]  # stem 3x3x3, no bias
    total += sum(n * 2 * mbconv(c // 2) for c, n in zip(channels, enc))
    total += sum(n * 2 * mbconv(c // 2) for c, n in zip(channels, dec))
    total += sum(27 * a * b + 2 * b for a, b in zip(channels, channels[1:]))  # down 3x3x3 s2 + GN
    total += sum(8 * b * a + a for a, b in zip(channels, channels[1:]))  # up 2x2x2 s2 transposed, bias
    return total + channels[0] * out_ch + out_ch  # head 1x1x1 with bias


# ----------------------------------------------------------------------------- registry and defaults


def test_registered_for_segment3d():
    assert {"revunet3d", "unet3d_mbconv"} <= set(list_models("segment3d"))
    for name in ("revunet3d", "unet3d_mbconv"):
        entry = get_entry(name)
        assert entry.task == "segment3d" and entry.input_size == (4, 128, 128, 128)
    timm = pytest.importorskip("timm")
    assert isinstance(timm.create_model("revunet3d"), RevUNet3d)


def test_default_layout_is_the_spec_default():
    model = create_model("revunet3d")
    assert model.reversible and not create_model("unet3d_mbconv").reversible
    assert REGIONS == ("WT", "TC", "ET")
    # stem 3x3x3 4 -> 16 without bias, head 1x1x1 16 -> 3 logits
    assert (model.stem.in_channels, model.stem.out_channels, model.stem.kernel_size) == (4, 16, (3, 3, 3))
    assert model.stem.bias is None
    assert (model.head.in_channels, model.head.out_channels, model.head.kernel_size) == (16, 3, (1, 1, 1))
    # 4 levels (16, 32, 64, 128), couplings (1, 1, 2, 4) down and (1, 1, 1) up
    assert [len(s.blocks) for s in model.encoder] == [1, 1, 2, 4]
    assert [len(s.blocks) for s in model.decoder] == [1, 1, 1]
    for seq, c in zip(model.encoder, (16, 32, 64, 128)):
        for block in seq.blocks:
            assert block.f is not block.g  # independent weights
            for fn in (block.f, block.g):
                assert isinstance(fn, MBConv3d)
                assert fn.depthwise[0].in_channels == fn.depthwise[0].groups == 4 * c // 2  # t = 4
    downs = [m[0] for m in model.down]
    assert [(d.in_channels, d.out_channels, d.stride, d.kernel_size) for d in downs] == [
        (16, 32, (2, 2, 2), (3, 3, 3)), (32, 64, (2, 2, 2), (3, 3, 3)), (64, 128, (2, 2, 2), (3, 3, 3))]
    ups = list(model.up)
    assert all(isinstance(u, nn.ConvTranspose3d) and u.stride == (2, 2, 2) and u.kernel_size == (2, 2, 2)
               for u in ups)
    assert [(u.in_channels, u.out_channels) for u in ups] == [(32, 16), (64, 32), (128, 64)]
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm3d, nn.InstanceNorm3d))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 8 for m in norms)
    acts = {type(m) for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU, nn.ReLU6, nn.GELU, nn.LeakyReLU))}
    assert acts == {nn.SiLU}
    assert not any(isinstance(m, SqueezeExcite) for m in model.modules())


def test_parameter_count():
    expected = spec_param_count((16, 32, 64, 128), (1, 1, 2, 4), (1, 1, 1))
    assert n_params(create_model("revunet3d")) == n_params(create_model("unet3d_mbconv")) == expected == 800_995
    # spec §7.2 (base 16, 4 levels, encoder (1, 1, 2, 4) x m, decoder (1, 1, 1) x m): 0.80 M and 2.07 M
    assert round(expected / 1e6, 2) == 0.80
    m4 = create_model("revunet3d", encoder_blocks=(4, 4, 8, 16), decoder_blocks=(4, 4, 4))
    assert round(n_params(m4) / 1e6, 2) == 2.07


# ----------------------------------------------------------------------------- reversible == plain


def twin_step(dtype):
    """The same weights in revunet3d and unet3d_mbconv: outputs, input grads and parameter grads of each."""
    torch.manual_seed(0)
    rev = create_model("revunet3d", **SMALL).to(dtype).train()
    plain = create_model("unet3d_mbconv", **SMALL).to(dtype).train()
    assert [(k, v.shape) for k, v in rev.state_dict().items()] == \
           [(k, v.shape) for k, v in plain.state_dict().items()]
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(1, 4, 16, 16, 8, dtype=dtype)
    target = torch.rand(1, 3, 16, 16, 8, dtype=dtype)
    results = []
    for model in (rev, plain):
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        nn.functional.binary_cross_entropy_with_logits(out, target).backward()
        results.append((out.detach(), xg.grad, [p.grad for p in model.parameters()]))
    return results


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reversible_and_plain_twins_agree(dtype, tol):
    (out_r, gx_r, gp_r), (out_p, gx_p, gp_p) = twin_step(dtype)
    assert out_r.shape == (1, 3, 16, 16, 8)
    assert rel(out_r, out_p) <= tol
    assert rel(gx_r, gx_p) <= tol
    for a, b in zip(gp_r, gp_p):
        assert rel(a, b) <= tol


# ----------------------------------------------------------------------------- shapes and options


@pytest.mark.parametrize("size", [(8, 16, 12), (4, 4, 4), (12, 8, 20)])
def test_any_size_divisible_by_the_bottom_stride(size):
    model = RevUNet3d(channels=(16, 16, 32), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 4, *size)).shape == (2, 3, *size)


def test_bad_input_shape_names_the_shape():
    model = RevUNet3d(channels=(16, 16, 32), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1))
    with pytest.raises(UserError, match=r"divisible by 4.*\(1, 4, 8, 16, 10\)"):
        model(torch.randn(1, 4, 8, 16, 10))
    with pytest.raises(ValueError, match=r"N x 4 x D x H x W"):
        model(torch.randn(1, 3, 8, 8, 8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=(16, 30), encoder_blocks=(1, 1), decoder_blocks=(1,)), "divisible by 8"),
    (dict(channels=(16, 31), encoder_blocks=(1, 1), decoder_blocks=(1,)), "even"),
    (dict(channels=(16, 24), encoder_blocks=(1, 1), decoder_blocks=(1,), norm="instance", expansion=1.3),
     "whole number"),
    (dict(encoder_blocks=(1, 1)), "encoder_blocks"),
    (dict(decoder_blocks=(1, 1, 1, 1)), "decoder_blocks"),
    (dict(norm="layer"), "norm"),
    (dict(act="tanh"), "act"),
])
def test_bad_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        create_model("revunet3d", **kwargs)


def test_options_change_the_blocks():
    model = create_model("unet3d_mbconv", channels=(16, 32), encoder_blocks=(1, 2), decoder_blocks=(3,),
                         expansion=2, norm="batch", act="relu", se=0.25, in_chans=2, num_classes=5)
    assert model.stem.in_channels == 2 and model.head.out_channels == 5
    assert [len(s.blocks) for s in model.encoder] == [1, 2] and len(model.decoder[0].blocks) == 3
    mb = model.encoder[1].blocks[0].f
    assert mb.depthwise[0].groups == 2 * 16  # t * C/2
    se = [m for m in mb.modules() if isinstance(m, SqueezeExcite) and m.dims == 3]
    assert len(se) == 1 and se[0].reduce.out_channels == max(1, int(0.25 * 16))
    assert isinstance(mb.depthwise[1], nn.BatchNorm3d) and isinstance(mb.depthwise[2], nn.ReLU)
    assert not any(isinstance(m, (nn.GroupNorm, nn.SiLU)) for m in mb.expand.modules())


def test_batchnorm_variant_counts_each_step_once():
    torch.manual_seed(0)
    model = create_model("revunet3d", channels=(16, 32), encoder_blocks=(2, 2), decoder_blocks=(1,),
                         norm="batch").train()
    model(torch.randn(2, 4, 8, 8, 8)).sum().backward()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(bns) > 20
    assert all(bn.num_batches_tracked.item() == 1 for bn in bns)


def test_couplings_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = RevUNet3d(**SMALL)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)  # first call: the forward, not the recomputation
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (ReversibleSequence, nn.Conv3d)):
            m.register_forward_hook(record(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 4, 8, 8, 8))
    out.float().sum().backward()
    assert seen["stem"] == torch.bfloat16  # autocast is on for the non-reversible parts
    inside = {k: v for k, v in seen.items() if k.startswith(("encoder", "decoder"))}
    assert len(inside) > 10 and set(inside.values()) == {torch.float32}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_every_coupling_is_reversible_and_additive():
    model = create_model("revunet3d")
    seqs = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    assert len(seqs) == 7 and all(s.reversible for s in seqs)
    assert sum(isinstance(m, AdditiveCoupling) for m in model.modules()) == 8 + 3
    model.reversible = False
    assert not any(s.reversible for s in seqs)


# ----------------------------------------------------------------------------- memory (spec §7.2)

MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from mobilezoo.models.revunet3d import RevUNet3d

    def rss_mib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024

    def measure(m, reversible, size):
        torch.manual_seed(0)
        model = RevUNet3d(channels=(16, 32), encoder_blocks=(m, m), decoder_blocks=(m,), reversible=reversible)
        model(torch.randn(1, 4, 4, 4, 4)).sum().backward()  # kernels loaded, .grad buffers allocated
        x, target = torch.randn(1, 4, size, size, size), torch.rand(1, 3, size, size, size)
        base = rss_mib()
        F.binary_cross_entropy_with_logits(model(x), target).backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base

    # One fresh process per configuration: a forked child starts with its own peak-RSS counter,
    # and the import (seconds) is paid once.
    size, out = int(sys.argv[1]), {}
    for m in (1, 4):
        for reversible in (True, False):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.write(w, json.dumps(measure(m, reversible, size)).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as fh:
                out[f"{'rev' if reversible else 'plain'}{m}"] = json.loads(fh.read())
            assert os.waitpid(pid, 0)[1] == 0
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not hasattr(os, "fork"), reason="needs Linux")
def test_memory_flat_in_couplings_per_level():
    """Peak RSS of one training step above the model + input baseline, 1 vs 4 couplings per level."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               # A fixed mmap threshold hands every freed activation back to the OS, so RSS follows
               # live tensors; glibc's adaptive threshold otherwise keeps freed blocks and fragments.
               MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "24"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    mib = json.loads(proc.stdout.strip().splitlines()[-1])
    rev_ratio, plain_ratio = mib["rev4"] / mib["rev1"], mib["plain4"] / mib["plain1"]
    # measured: reversible 23 -> 26 MiB (1.1x), plain 61 -> 212 MiB (3.5x); spec §7.2: +24% vs +263%
    assert rev_ratio < 1.5, mib
    assert plain_ratio > 2.5, mib
    assert mib["rev1"] < mib["plain1"], mib
