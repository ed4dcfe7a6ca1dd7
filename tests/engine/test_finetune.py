"""Fine-tuning from pretrained files: new head, normalisation and model options from the file's
metadata, layer-wise lr decay, a frozen backbone (and its resume)."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mobilezoo.cli import main
from mobilezoo.engine import fit, loop
from mobilezoo.engine.finetune import BN_RECALIBRATE
from mobilezoo.engine.optim import build_optimizer
from mobilezoo.models import create_model
from mobilezoo.models.moat import VARIANTS
from mobilezoo.models.weights import META_BN_STATS, META_MEAN, META_MODEL_ARGS, META_SOURCE, META_STD
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks import build_task


@pytest.fixture(autouse=True)
def _one_thread(tmp_path_factory, monkeypatch):
    """One intra-op thread (restored after) and one shared dataset cache for the module."""
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path_factory.getbasetemp() / "finetune-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(model, path, **metadata):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


@pytest.fixture
def initial_weights(monkeypatch):
    """The weights a run starts from: captured right after fit's own `load_pretrained`."""
    captured = {}

    def capture(model, path, *args, **kwargs):
        reset = real(model, path, *args, **kwargs)
        captured.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return reset

    real = loop.load_pretrained
    monkeypatch.setattr(loop, "load_pretrained", capture)
    return captured


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _fit(overrides, **kw):
    recipe = load_recipe(None, overrides)
    return fit(recipe, build_task(recipe), **kw)


def test_digits_from_a_1000_class_file(tmp_path, capsys, monkeypatch, initial_weights):
    """A 1000-class tiny-MOAT-0 with mean/std 0.5 into the 10 digits: the head is new, the rest the
    file's; the run records and uses the file's normalisation and source."""
    torch.manual_seed(1)
    pretrained = create_model("tiny_moat_0", num_classes=1000)
    path = _save(pretrained, tmp_path / "moat.safetensors", **{
        META_MEAN: [0.5] * 3, META_STD: [0.5] * 3, META_SOURCE: "x/model.ckpt"})
    from mobilezoo.tasks.classification import ClassificationTask
    seen = []
    real_loss = ClassificationTask.loss

    def loss(self, model, batch):
        seen.append((batch["image"].min().item(), batch["image"].max().item()))
        return real_loss(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    run = tmp_path / "run"
    rc, out, err = _cli(capsys, "train", "classify_digits", "--epochs", 1, "--set", f"model.checkpoint={path}",
                        "--set", "data.img_size=32", "--set", "data.limit_train=32", "--set", "data.limit_val=20",
                        "--batch-size", 16, "--set", "data.eval_batch_size=20", "--set", "train.bn_recalibrate=1",
                        "--device", "cpu", "--out", run)
    assert rc == 0, err
    assert f"{path}: head re-initialised for 10 classes (file has 1000): head.weight, head.bias" in out.splitlines()
    file_state = pretrained.state_dict()
    assert initial_weights.keys() == file_state.keys()
    for k, v in initial_weights.items():
        if k.startswith("head."):
            assert v.shape[0] == 10
        else:
            assert torch.equal(v, file_state[k]), k
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["mean"] == [0.5] * 3 and cfg["data"]["std"] == [0.5] * 3
    assert not torch.equal(initial_weights["head.weight"], file_state["head.weight"][:10])  # fresh, not a slice
    assert cfg["model"]["source"] == "x/model.ckpt"
    # Training batches were normalised to [-1, 1] (ImageNet's statistics would give -2.1 .. 2.6).
    assert len(seen) == 2 and all(-1 - 1e-5 <= lo and hi <= 1 + 1e-5 for lo, hi in seen)
    assert min(lo for lo, _ in seen) < -0.9 and max(hi for _, hi in seen) > 0.9
    # Evaluation, predict and export build their inputs with the transform of the saved config.
    task = build_task(load_recipe(str(run / "config.yaml")))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(task.eval_transform()(image), image.float() / 255 * 2 - 1)


def test_ssdlite_coco_file_into_shapes(tmp_path, capsys, initial_weights):
    """A 91-slot COCO detector into detect_shapes: only the class heads' final convs are new."""
    from mobilezoo.data import shapes
    root = shapes.ensure(tmp_path / "shapes", num_train=2, num_val=2)
    torch.manual_seed(1)
    coco = create_model("ssdlite_mobiledet_cpu", num_classes=90, background_class=True)
    path = _save(coco, tmp_path / "coco.safetensors")
    rc, out, err = _cli(capsys, "train", "detect_shapes", "--data", root, "--img-size", 64, "--batch-size", 2,
                        "--epochs", 1, "--set", "data.eval_batch_size=2", "--set", "train.bn_recalibrate=1",
                        "--set", f"model.checkpoint={path}", "--device", "cpu", "--out", tmp_path / "run")
    assert rc == 0, err
    new = {f"cls_heads.{i}.1.{p}" for i in range(6) for p in ("weight", "bias")}
    line = next(ln for ln in out.splitlines() if "head re-initialised" in ln)
    assert line.startswith(f"{path}: head re-initialised for 5 classes (file has 91): ")
    assert set(line.split(": ")[-1].split(", ")) == new
    file_state = coco.state_dict()
    assert initial_weights.keys() == file_state.keys()
    for k, v in initial_weights.items():
        if k in new:
            assert v.shape[0] * 91 == file_state[k].shape[0] * 5, k
        else:
            assert torch.equal(v, file_state[k]), k  # backbone, extras, box heads, class heads' depthwise part
    assert any(k.startswith("box_heads.") for k in initial_weights)


# --- layer-wise lr decay ----------------------------------------------------------------------------

def test_layer_decay_groups_follow_the_block_depth():
    """Head at lr, block i of n at lr x d^(n - i), the stem at lr x d^(n + 1) (the final norm
    goes with the last block, as timm groups it); no weight decay on norms, biases, rel-pos tables."""
    from mobilezoo.cli import _overrides, build_parser
    recipe = load_recipe("classify_digits", _overrides(build_parser().parse_args(
        ["train", "--set", "optim.layer_decay=0.75"])))
    d, lr, wd = recipe.optim.layer_decay, recipe.optim.lr, recipe.optim.weight_decay
    assert d == 0.75
    model = create_model("tiny_moat_0", num_classes=10)
    opt = build_optimizer(model, lr, wd, recipe.optim.betas, layer_decay=d)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    depths = VARIANTS["tiny_moat_0"].depths
    n = sum(depths)
    first_block = [sum(depths[:s]) for s in range(4)]
    for name, p in model.named_parameters():
        part = name.split(".")
        if part[0] == "stem":
            depth = n + 1
        elif part[0] == "stages":
            depth = n - (first_block[int(part[1])] + int(part[2]))
        elif part[0] == "norm":
            depth = 1
        else:
            assert part[0] == "head"
            depth = 0
        g = group_of[id(p)]
        assert g["lr"] == pytest.approx(lr * d ** depth), name
        no_decay = p.ndim <= 1 or "rel_table" in name
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
    assert len(group_of) == len(list(model.parameters()))


def test_layer_decay_reaches_the_run_and_bad_values_name_the_field(shapes_folder, tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=1, **{"optim.layer_decay": 0.5, "optim.lr": 1e-3}))
    groups = torch.load(run / "trainer_state.pt", weights_only=True)["optimizer"]["param_groups"]
    n = sum(VARIANTS["tiny_moat_0"].depths)
    lrs = sorted({g["initial_lr"] for g in groups})
    assert lrs == pytest.approx([1e-3 * 0.5 ** k for k in range(n + 1, -1, -1)], rel=1e-9)
    for bad in ("1.5", "lots"):
        rc, _, err = _cli(capsys, "train", "--set", f"optim.layer_decay={bad}", "--out", tmp_path / "bad")
        lines = [ln for ln in err.splitlines() if ln.startswith("mobilezoo train: error:")]
        assert rc == 2 and len(lines) == 1 and "optim.layer_decay" in lines[0]


# --- frozen backbone ----------------------------------------------------------------------------------

def _backbone(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_frozen_backbone_then_all_and_resume_inside_and_after_the_phase(
        shapes_folder, tiny_overrides, tmp_path, initial_weights):
    """2 frozen epochs + 1: while frozen only the head moves (BN statistics too stay, even through
    the recalibration before each evaluation); then the backbone trains; stopping after epoch 1
    and after epoch 2 and resuming gives the uninterrupted run's weights bit for bit."""
    torch.manual_seed(1)
    path = _save(create_model("tiny_moat_0", num_classes=1000), tmp_path / "moat.safetensors")
    file_state = load_file(str(path))
    extra = {"model.checkpoint": str(path), "optim.freeze_backbone_epochs": 2, "optim.lr": 3e-3}
    _fit(tiny_overrides(shapes_folder, tmp_path / "straight", epochs=3, **extra))
    start = dict(initial_weights)

    split = tmp_path / "split"
    for epoch in (1, 2):
        _fit(tiny_overrides(shapes_folder, split, epochs=3, **extra), stop_after=1, resume=epoch > 1)
        weights = load_file(str(split / "model.safetensors"))
        for k, v in _backbone(weights).items():
            assert torch.equal(v, file_state[k]), f"epoch {epoch}: {k} moved while frozen"
        assert not torch.equal(weights["head.weight"], start["head.weight"])
        assert any("running_var" in k for k in _backbone(weights))
    _fit(tiny_overrides(shapes_folder, split, epochs=3, **extra), resume=True)

    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    params = [n for n, _ in create_model("tiny_moat_0", num_classes=3).named_parameters() if not n.startswith("head.")]
    moved = [n for n in params if not torch.equal(a[n], file_state[n])]
    assert "stem.0.weight" in moved and len(moved) > 0.8 * len(params)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [json.loads(x) | {"samples_per_s": y["samples_per_s"]} for x, y in zip(
        (split / "metrics.jsonl").read_text().splitlines(), lines)]


def test_file_without_bn_statistics_and_with_model_options(shapes_folder, tiny_overrides, tmp_path, capsys):
    """META_BN_STATS "missing": the run recomputes the statistics (before a frozen backbone
    trains on them, too); META_MODEL_ARGS builds the file's model, the recipe's own args winning."""
    torch.manual_seed(1)
    path = _save(create_model("tiny_moat_0", num_classes=3, rel_pos=False), tmp_path / "norel.safetensors", **{
        META_BN_STATS: "missing", META_MODEL_ARGS: {"rel_pos": False, "drop_path_rate": 0.3}})
    run = tmp_path / "run"
    _fit(tiny_overrides(shapes_folder, run, epochs=1, **{
        "model.checkpoint": str(path), "model.args": {"drop_path_rate": 0.0}, "train.bn_recalibrate": 0,
        "optim.freeze_backbone_epochs": 1}))
    out = capsys.readouterr().out
    assert f"{path}: the file has no BatchNorm statistics; they will be recomputed on {BN_RECALIBRATE} " in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["bn_recalibrate"] == BN_RECALIBRATE
    assert cfg["model"]["args"] == {"rel_pos": False, "drop_path_rate": 0.0}
    file_state, weights = load_file(str(path)), load_file(str(run / "model.safetensors"))
    assert not any("rel_table" in k for k in weights)
    # The backbone was frozen, yet its statistics are the recomputed ones, not the file's 0 / 1.
    assert torch.equal(weights["stem.0.weight"], file_state["stem.0.weight"])
    assert not torch.equal(weights["stem.1.running_var"], file_state["stem.1.running_var"])
