"""deeplab2 MOAT checkpoints -> our MOAT: the fixture written by deeplab2's own code reproduces its
TF logits; every variant's names (written here from deeplab2's naming rules) map strictly."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mobilezoo.cli import main
from mobilezoo.convert import convert_checkpoint
from mobilezoo.convert.deeplab2_moat import deeplab2_moat_state_dict, infer_variant
from mobilezoo.convert.tensorbundle import read_checkpoint
from mobilezoo.models import CheckpointError, create_model
from mobilezoo.models.moat import VARIANTS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "deeplab2_tiny_moat_0"
EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def tensors():
    return read_checkpoint(FIXTURE / "model.ckpt")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted from the command line, raw and EMA."""
    out = tmp_path_factory.mktemp("converted")
    for flag in ([], ["--ema"]):
        name = "ema" if flag else "raw"
        assert main(["convert", str(FIXTURE / "model.ckpt"), "--out", str(out / f"{name}.safetensors"), *flag]) == 0
    return out


def _logits(path) -> np.ndarray:
    model = create_model("tiny_moat_0", checkpoint=path).eval()
    x = torch.from_numpy(np.load(FIXTURE / "input.npy")).permute(0, 3, 1, 2)  # NHWC -> NCHW
    with torch.no_grad():
        return model(x).numpy()


def test_converted_fixture_reproduces_the_tf_logits(converted):
    reference = np.load(FIXTURE / "logits.npy")
    assert np.abs(_logits(converted / "raw.safetensors") - reference).max() < 1e-4
    # The EMA copies are other weights (x1.01): they must give other logits.
    assert np.abs(_logits(converted / "ema.safetensors") - reference).max() > 1e-2


def test_ema_file_holds_the_ema_copies(converted, tensors):
    raw, ema = load_file(str(converted / "raw.safetensors")), load_file(str(converted / "ema.safetensors"))
    kernel = tensors["moat/block_02_00/attention/o/weight" + EMA]  # [heads, head_dim, C]
    assert torch.allclose(ema["stages.2.0.attn.proj.weight"], torch.from_numpy(kernel.reshape(-1, 128).T))
    # BatchNorm statistics have no EMA copy: both files hold the raw ones.
    assert torch.equal(raw["stem.1.running_var"], ema["stem.1.running_var"])
    assert torch.equal(raw["stem.1.running_var"], torch.from_numpy(tensors["moat/stem/norm_0/moving_variance"]))


def test_metadata_records_model_normalisation_and_source(converted):
    with safe_open(str(converted / "raw.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mobilezoo.model"] == "tiny_moat_0" and meta["mobilezoo.num_classes"] == "1000"
    assert json.loads(meta["mobilezoo.mean"]) == [0.485, 0.456, 0.406]  # released 1k files: ImageNet mean/std
    assert meta["mobilezoo.input_size"] == "256" and meta["mobilezoo.weights"] == "raw"
    assert meta["mobilezoo.source"].endswith("model.ckpt")
    model = create_model("tiny_moat_0", checkpoint=converted / "raw.safetensors")
    config = timm.data.resolve_data_config({}, model=model)  # what a timm user asks
    assert config["input_size"] == (3, 256, 256) and config["std"] == (0.229, 0.224, 0.225)


def test_22k_names_and_flags_choose_the_normalisation(tmp_path):
    folder = tmp_path / "tiny_moat0_imagenet_22k_and_1k_384_w_position_embedding"  # the release naming scheme
    shutil.copytree(FIXTURE, folder)
    c = convert_checkpoint(folder)
    assert (c.normalization, c.input_size) == ("inception", 384)
    assert convert_checkpoint(folder, normalization="imagenet", input_size=224).normalization == "imagenet"


def test_one_error_lists_missing_unexpected_and_misshapen(tensors):
    broken = dict(tensors)
    del broken["moat/block_03_01/attention/q/bias"]
    broken["moat/block_09_00/extra/kernel"] = np.zeros(3, np.float32)
    broken["moat/stem/conv_1/bias"] = np.zeros(31, np.float32)
    with pytest.raises(CheckpointError) as e:
        deeplab2_moat_state_dict(broken, create_model("tiny_moat_0"), "x/model.ckpt")
    message = str(e.value)
    assert "\n" not in message and message.startswith("x/model.ckpt")
    for name in ("moat/block_03_01/attention/q/bias", "moat/block_09_00/extra/kernel", "moat/stem/conv_1/bias (31,)"):
        assert name in message


def test_files_without_batchnorm_statistics_keep_defaults_and_say_so(tensors):
    early = {k: v for k, v in tensors.items() if not k.endswith(("moving_mean", "moving_variance"))}
    state = deeplab2_moat_state_dict(early, create_model("tiny_moat_0"), "x")
    assert torch.equal(state["stem.1.running_var"], torch.ones(32))
    assert torch.equal(state["stem.1.weight"], torch.from_numpy(tensors["moat/stem/norm_0/gamma"]))


def test_corrupt_checkpoint_is_one_line_error(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    data = tmp_path / "ckpt" / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    assert main(["convert", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "model.ckpt.data-00000-of-00001" in err
    assert not (tmp_path / "x.safetensors").exists()


# --- every variant, from deeplab2's naming rules -------------------------------------------------

def deeplab2_names(variant: str, rel_pos: bool = True, classes: int = 1000) -> dict[str, tuple]:
    """Names and TF shapes of deeplab2's MOAT variables (no EMA, no optimizer), written from
    `moat.py` / `moat_blocks.py` / `moat_attention.py`: stem conv_0, norm_0, conv_1; MBConv blocks
    with SE in stages 0-1; MOAT blocks (MBConv without SE + attention) in stages 2-3; a shortcut
    conv where the width changes; expansion 4 of the output width; heads of 32 channels; tables
    of side 2P-1 with P = 14 at stride 16 and 7 at stride 32."""
    cfg = VARIANTS[variant]
    names = {}

    def bn(scope, c):
        names.update({f"{scope}/{k}": (c,) for k in ("gamma", "beta", "moving_mean", "moving_variance")})

    stem = "moat/stem"
    names[f"{stem}/conv_0/kernel"], names[f"{stem}/conv_0/bias"] = (3, 3, 3, cfg.stem[0]), (cfg.stem[0],)
    bn(f"{stem}/norm_0", cfg.stem[0])
    names[f"{stem}/conv_1/kernel"], names[f"{stem}/conv_1/bias"] = (3, 3, cfg.stem[0], cfg.stem[1]), (cfg.stem[1],)
    c_in = cfg.stem[1]
    for s, (depth, c) in enumerate(zip(cfg.depths, cfg.widths)):
        for b in range(depth):
            p, mid = f"moat/block_{s:02d}_{b:02d}", 4 * c
            bn(f"{p}/pre_norm", c_in)
            names[f"{p}/expand_conv/kernel"] = (1, 1, c_in, mid)
            bn(f"{p}/expand_norm", mid)
            names[f"{p}/depthwise_conv/depthwise_kernel"] = (3, 3, mid, 1)
            bn(f"{p}/depthwise_norm", mid)
            if s < 2:
                se = c // 4
                names.update({f"{p}/se/reduce_conv2d/kernel": (1, 1, mid, se), f"{p}/se/reduce_conv2d/bias": (se,),
                              f"{p}/se/expand_conv2d/kernel": (1, 1, se, mid), f"{p}/se/expand_conv2d/bias": (mid,)})
            names[f"{p}/shrink_conv/kernel"], names[f"{p}/shrink_conv/bias"] = (1, 1, mid, c), (c,)
            if c_in != c:
                names[f"{p}/shortcut_conv/kernel"], names[f"{p}/shortcut_conv/bias"] = (1, 1, c_in, c), (c,)
            if s >= 2:
                heads = c // 32
                names.update({f"{p}/attention_norm/gamma": (c,), f"{p}/attention_norm/beta": (c,)})
                for proj in "qkv":
                    names[f"{p}/attention/{proj}/weight"] = (c, heads, 32)
                    names[f"{p}/attention/{proj}/bias"] = (heads, 32)
                names[f"{p}/attention/o/weight"], names[f"{p}/attention/o/bias"] = (heads, 32, c), (c,)
                if rel_pos:
                    side = 2 * (14 if s == 2 else 7) - 1
                    names[f"{p}/attention/relative_position_embedding"] = (heads, side, side)
            c_in = c
    names.update({"moat/final_layer_norm/gamma": (c_in,), "moat/final_layer_norm/beta": (c_in,),
                  "moat/logits_head/kernel": (1, 1, c_in, classes), "moat/logits_head/bias": (classes,)})
    return names


def _random(names: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, shape in names.items()}


def test_naming_rules_match_the_fixture(tensors):
    # The rules above, checked once against the file deeplab2 itself wrote.
    trained = {n: tuple(v.shape) for n, v in tensors.items() if not n.endswith(EMA)}
    assert trained == deeplab2_names("tiny_moat_0")


@pytest.mark.parametrize("variant,rel_pos", [("tiny_moat_1", True), ("tiny_moat_2", False),
                                             ("tiny_moat_3", True), ("moat_0", False)])
def test_every_variant_maps_strictly(variant, rel_pos):
    tensors = _random(deeplab2_names(variant, rel_pos, classes=7))
    name, args = infer_variant(tensors)
    assert name == variant and args == ({} if rel_pos else {"rel_pos": False})
    model = create_model(variant, num_classes=7, **args)
    state = deeplab2_moat_state_dict(tensors, model, "x")
    model.load_state_dict(state)  # strict
    c = VARIANTS[variant].widths[2]
    q, k = tensors["moat/block_02_00/attention/q/weight"], tensors["moat/block_02_00/attention/k/weight"]
    qkv = model.stages[2][0].attn.qkv.weight.detach().numpy()
    assert np.array_equal(qkv[:c], q.reshape(c, c).T) and np.array_equal(qkv[c:2 * c], k.reshape(c, c).T)
    head = tensors["moat/logits_head/kernel"][0, 0]
    assert np.array_equal(model.head.weight.detach().numpy(), head.T)
    dw = tensors["moat/block_01_00/depthwise_conv/depthwise_kernel"]
    assert np.array_equal(model.stages[1][0].depthwise[0].weight.detach().numpy()[:, 0], dw[..., 0].transpose(2, 0, 1))


def test_tables_of_another_size_are_resized_as_tf_image_resize():
    tensors = _random(deeplab2_names("tiny_moat_0"))
    small = np.random.default_rng(1).standard_normal((4, 13, 13)).astype(np.float32)
    tensors["moat/block_02_00/attention/relative_position_embedding"] = small  # built at a 7x7 window
    state = deeplab2_moat_state_dict(tensors, create_model("tiny_moat_0"), "x")

    def tf_bilinear(a: np.ndarray, size: int) -> np.ndarray:
        """tf.image.resize(bilinear, half_pixel_centers) along both axes, from its definition."""
        src = np.clip((np.arange(size) + 0.5) * a.shape[-1] / size - 0.5, 0, a.shape[-1] - 1)
        lo = np.floor(src).astype(int)
        hi, t = np.minimum(lo + 1, a.shape[-1] - 1), src - lo
        rows = a[:, lo] * (1 - t)[:, None] + a[:, hi] * t[:, None]
        return rows[:, :, lo] * (1 - t) + rows[:, :, hi] * t

    expected = tf_bilinear(small, 27)
    assert np.abs(state["stages.2.0.attn.rel_table"].numpy() - expected).max() < 1e-5
