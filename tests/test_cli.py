"""The `mobilezoo` command, run in-process through `main` (plus one real console-script process)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mobilezoo.cli import main

SUBCOMMANDS = ["list", "info", "train", "eval", "predict", "bench", "convert", "demo"]
CLASSIFY = ["moat_0", "moat_1", "moat_2", "moat_3", "moat_4",
            "tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3"]
CLASSES = ["cat", "dog", "eel"]
# a tiny run: 32 px, batch 4, 1 epoch, CPU, in-process loading, one thread (fast on a busy 2-core box)
TINY = ["--epochs", "1", "--batch-size", "4", "--img-size", "32", "--device", "cpu", "--workers", "0",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILEZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _torch_globals():
    """One intra-op thread while here; restore threads and autograd (which `predict` switches off
    process-wide, see test_predict_leaves_autograd_enabled) so nothing leaks into other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `mobilezoo ARGV`."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str, command: str) -> str:
    """The single error line of a failed command (progress bars aside), with no traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"mobilezoo {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


class Evil:
    """Unpickling this creates a file: proof that code in the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Custom:
    """An arbitrary class, as in a pickled training script object."""

    def __init__(self):
        self.payload = torch.zeros(3)


# --- help, list, info -----------------------------------------------------------------------------

def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mobilezoo {cmd}")
    assert "--help" in out


@pytest.mark.parametrize("cmd, registry", [("list", "tasks"), ("predict", "tasks"), ("demo", "demos")])
def test_help_lists_every_task_of_its_registry(capsys, cmd, registry):
    from mobilezoo.demo import DEMOS
    from mobilezoo.tasks import TASKS
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    words = set(re.findall(r"[\w-]+", capsys.readouterr().out))
    names = TASKS if registry == "tasks" else DEMOS
    assert set(names) <= words, set(names) - words


def test_list_classify(capsys):
    rc, out, _ = cli(capsys, "list", "--task", "classify")
    assert rc == 0
    rows = [ln.split() for ln in out.splitlines() if ln.strip()]
    assert sorted(r[0] for r in rows) == CLASSIFY
    assert all(r[1] == "classify" for r in rows)


def test_list_unknown_task(capsys):
    rc, _, err = cli(capsys, "list", "--task", "juggling")
    assert rc != 0
    assert "juggling" in error_line(err, "list")


def test_info_json_tiny_moat_0(capsys):
    rc, out, _ = cli(capsys, "info", "tiny_moat_0", "--json")
    assert rc == 0
    info = json.loads(out)
    assert {"params", "macs", "input_size", "output_shapes"} <= set(info)
    assert info["params"] == 3_355_348  # spec §2.2 (1000 classes, rel-PE)
    assert info["macs"] == pytest.approx(0.78e9, rel=0.03)  # spec §7: tiny-0 @224 0.78 GMACs
    assert info["input_size"] == [3, 224, 224]
    shapes = info["output_shapes"]
    assert [1, 1000] in shapes.values()
    # stage widths 32/64/128/256 (spec §2.2) at strides 4..32 of a 224 input
    assert shapes["stride4"] == [1, 32, 56, 56] and shapes["stride8"] == [1, 64, 28, 28]
    assert shapes["stride16"] == [1, 128, 14, 14] and shapes["stride32"] == [1, 256, 7, 7]


def test_info_img_size_and_classes(capsys):
    rc, out, _ = cli(capsys, "info", "tiny_moat_0", "--json", "--img-size", "256", "--num-classes", "10")
    assert rc == 0
    info = json.loads(out)
    assert info["input_size"] == [3, 256, 256]
    assert info["output_shapes"]["stride32"] == [1, 256, 8, 8]
    assert [1, 10] in info["output_shapes"].values()
    assert info["params"] == 3_355_348 - 990 * 257  # 990 fewer classes: 256 weights + 1 bias each
    assert info["macs"] == pytest.approx(1.04e9, rel=0.03)  # spec §7: tiny-0 @256 1.04 GMACs


def test_info_text(capsys):
    rc, out, _ = cli(capsys, "info", "tiny_moat_0")
    assert rc == 0
    assert "3,355,348" in out and "224x224" in out


def _console_script() -> Path:
    script = Path(sys.executable).parent / "mobilezoo"
    assert script.is_file(), f"console script missing next to {sys.executable}"
    return script


def test_console_script_unknown_model_one_line(tmp_path):
    """A real process: non-zero exit, one line on stderr, a suggestion, no traceback."""
    env = {**os.environ, "MOBILEZOO_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([str(_console_script()), "info", "moat_9"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "moat_9" in lines[0]
    assert "moat_0" in lines[0]  # the closest names include the base variant
    assert p.stdout == ""


# --- user errors before training -----------------------------------------------------------------

def test_train_missing_data_folder(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--data", "/nonexistent/imgs", "--out", tmp_path / "run", *TINY)
    assert rc != 0
    assert "/nonexistent/imgs" in error_line(err, "train")


def test_train_unknown_set_key(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--set", "nosuch.key=1", "--out", tmp_path / "run")
    assert rc != 0
    assert "nosuch" in error_line(err, "train")
    assert not (tmp_path / "run").exists()


def test_train_bad_set_value(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--set", "train.epochs=0", "--out", tmp_path / "run")
    assert rc != 0
    assert "train.epochs" in error_line(err, "train")


def test_eval_not_a_run_dir(capsys, tmp_path):
    (tmp_path / "plain").mkdir()
    rc, _, err = cli(capsys, "eval", tmp_path / "plain")
    assert rc != 0
    assert str(tmp_path / "plain") in error_line(err, "eval")


# --- a full tiny run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=CLASSES, per_class=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    """One 1-epoch tiny-MOAT-0 run on the 3-class folder, shared by the tests below."""
    base = tmp_path_factory.mktemp("trained")
    run = base / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILEZOO_CACHE", str(base / "cache"))
        rc = main(["train", "--data", str(data_root), "--out", str(run), *TINY])
    torch.set_num_threads(threads)
    assert rc == 0
    return run


def test_train_writes_the_run_directory(trained, data_root):
    for name in ["config.yaml", "model.safetensors", "trainer_state.pt", "metrics.jsonl",
                 "report.md", "curves.png", "confusion.png"]:
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0, name
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["data"]["name"] == str(data_root)
    assert cfg["data"]["class_names"] == CLASSES
    assert cfg["data"]["img_size"] == 32 and cfg["data"]["batch_size"] == 4
    assert cfg["train"]["epochs"] == 1 and cfg["out"] == str(trained)
    records = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    r = records[0]
    assert r["epoch"] == 1 and r["step"] == 3  # 12 training images / batch 4
    assert r["train_skipped"] == 0 and r["val_count"] == 12
    assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and np.isfinite(r["train_loss"])
    weights = load_file(str(trained / "model.safetensors"))
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert any(tuple(v.shape) == (3, 256) for v in weights.values())  # a 3-class head on 256 features
    state = torch.load(trained / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 3
    report = (trained / "report.md").read_text()
    assert "curves.png" in report and "confusion.png" in report and "tiny_moat_0" in report
    for png in ("curves.png", "confusion.png"):
        with Image.open(trained / png) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_trained_bn_statistics_are_not_left_reset(trained):
    """With fewer training images than eval_batch_size (12 < 128), BN recalibration must still see
    data; running statistics reset to mean 0 / var 1 and never updated mean evaluation uses garbage."""
    weights = load_file(str(trained / "model.safetensors"))
    means = [v for k, v in weights.items() if k.endswith("running_mean")]
    assert means
    assert any(m.abs().sum() > 0 for m in means)


def test_eval_round_trip(trained, capsys, tmp_path):
    rc, out, err = cli(capsys, "eval", trained, "--out", tmp_path / "ev", "--json")
    assert rc == 0, err
    printed = json.loads(out)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert printed == saved
    assert saved["count"] == 12 and saved["skipped"] == 0
    assert np.array(saved["confusion"]).shape == (3, 3) and np.array(saved["confusion"]).sum() == 12
    assert (tmp_path / "ev" / "confusion.png").is_file()
    # same weights and data as the run's own final evaluation
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["top1"] == pytest.approx(last["val_top1"])
    assert saved["loss"] == pytest.approx(last["val_loss"], rel=1e-4)


def test_eval_prints_a_summary(trained, capsys, tmp_path):
    rc, out, _ = cli(capsys, "eval", trained, "--out", tmp_path / "ev")
    assert rc == 0
    assert "top-1" in out and "12" in out


def test_predict_round_trip(trained, data_root, capsys, tmp_path):
    out_file = tmp_path / "preds.json"
    rc, out, err = cli(capsys, "predict", trained, data_root / "val", "--out", out_file, "--topk", "2")
    assert rc == 0, err
    preds = json.loads(out_file.read_text())
    images = sorted(str(p) for p in (data_root / "val").rglob("*.png"))
    assert sorted(p["file"] for p in preds) == images
    for p in preds:
        probs = [t["prob"] for t in p["topk"]]
        assert len(p["topk"]) == 2 and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6
        assert {t["label"] for t in p["topk"]} <= set(CLASSES)
    assert len(out.strip().splitlines()) == len(images)  # one summary line per image


def test_predict_prints_json_without_out(trained, data_root, capsys):
    one = sorted((data_root / "val" / "dog").glob("*.png"))[0]
    rc, out, _ = cli(capsys, "predict", trained, one)
    assert rc == 0
    (p,) = json.loads(out)
    assert p["file"] == str(one) and len(p["topk"]) == 3  # topk 5 capped at 3 classes
    assert sum(t["prob"] for t in p["topk"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_leaves_autograd_enabled(trained, data_root, capsys):
    """`main` is callable in-process (the demo, notebooks); predict must not switch autograd off
    for the rest of the process."""
    assert torch.is_grad_enabled()
    rc, _, _ = cli(capsys, "predict", trained, data_root / "val" / "cat")
    assert rc == 0
    assert torch.is_grad_enabled()


def test_predict_missing_input(trained, capsys, tmp_path):
    rc, _, err = cli(capsys, "predict", trained, tmp_path / "nope.png")
    assert rc != 0
    assert "nope.png" in error_line(err, "predict")


@pytest.mark.parametrize("cmd", ["eval", "predict"])
def test_pickled_weights_in_run_dir_are_refused(trained, data_root, capsys, tmp_path, cmd):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "code_ran"
    pickled = tmp_path / "evil.pt"
    torch.save(Evil(marker), pickled)
    torch.load(pickled, weights_only=False)  # the payload is live...
    assert marker.exists()
    marker.unlink()
    shutil.copyfile(pickled, run / "model.safetensors")
    extra = [data_root / "val"] if cmd == "predict" else []
    rc, _, err = cli(capsys, cmd, run, *extra)
    assert rc != 0
    assert "model.safetensors" in error_line(err, cmd)
    assert not marker.exists()  # ...but was never run


def test_pt_checkpoint_with_custom_class_is_refused(data_root, capsys, tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"head.weight": torch.zeros(3, 256), "extra": Custom()}, ckpt)
    rc, _, err = cli(capsys, "train", "--data", data_root, "--out", tmp_path / "run",
                     "--set", f"model.checkpoint={ckpt}", *TINY)
    assert rc != 0
    line = error_line(err, "train")
    assert str(ckpt) in line
    assert "\x1b" not in line  # plain text, no terminal escape codes copied from torch's message
    assert any(w in line.lower() for w in ("refused", "unsafe", "weights-only", "weights only"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --- bad samples during training -----------------------------------------------------------------

@pytest.fixture
def corrupt_root(make_image_folder, tmp_path) -> tuple[Path, Path]:
    """12 training files (11 good + 1 corrupt, so batches of 4 see every file), 12 val images."""
    root = make_image_folder(tmp_path / "imgs", classes=CLASSES, per_class=4)
    (root / "train" / "dog" / "dog_3.png").unlink()
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(7).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return root, bad


@pytest.mark.parametrize("workers", ["0", "1"])
def test_train_stops_on_corrupt_image(corrupt_root, capsys, tmp_path, workers):
    root, bad = corrupt_root
    rc, _, err = cli(capsys, "train", "--data", root, "--out", tmp_path / "run", *TINY,
                     "--workers", workers)
    assert rc != 0
    assert str(bad) in error_line(err, "train")


def test_train_skips_and_counts_corrupt_image(corrupt_root, capsys, tmp_path):
    root, _ = corrupt_root
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--data", root, "--out", run, *TINY, "--epochs", "2",
                       "--skip-bad-samples")
    assert rc == 0, err
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["train_skipped"] for r in records] == [1, 1]
    assert all(r["val_count"] == 12 for r in records)
    assert "skipped 1" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["skip_bad_samples"] is True


# --- convert (official SqueezeTime checkpoints) ---------------------------------------------------

def _official_layout(model) -> dict:
    """Our state dict renamed to the official mmaction2 layout: backbone.* + cls_head.fc_cls.*."""
    return {("cls_head.fc_cls." + k[len("head."):]) if k.startswith("head.") else "backbone." + k: v.clone()
            for k, v in model.state_dict().items()}


def test_convert_official_checkpoint_to_safetensors(capsys, tmp_path):
    from mobilezoo.models import create_model
    torch.manual_seed(0)
    src = create_model("squeezetime_mini", num_classes=5)
    torch.save({"meta": {"epoch": 3}, "state_dict": _official_layout(src)}, tmp_path / "official.pth")
    rc, out, err = cli(capsys, "convert", tmp_path / "official.pth", "--model", "squeezetime_mini",
                       "--out", tmp_path / "sqt.safetensors")  # the 5 classes are read off the file
    assert rc == 0, err
    converted = load_file(str(tmp_path / "sqt.safetensors"))
    assert converted.keys() == src.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in src.state_dict().items())


def test_convert_names_every_missing_and_unexpected_key(capsys, tmp_path):
    from mobilezoo.models import create_model
    state = _official_layout(create_model("squeezetime_mini", num_classes=5))
    del state["backbone.conv1.weight"], state["cls_head.fc_cls.bias"]
    state["backbone.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "official.pth")
    rc, _, err = cli(capsys, "convert", tmp_path / "official.pth", "--model", "squeezetime_mini",
                     "--out", tmp_path / "sqt.safetensors")
    line = error_line(err, "convert")
    assert rc == 2 and not (tmp_path / "sqt.safetensors").exists()
    for key in ("conv1.weight", "head.bias", "backbone.extra.weight"):
        assert key in line


def test_info_video_and_3d_models_keep_frames_and_depth(capsys):
    rc, out, _ = cli(capsys, "info", "squeezetime_mini", "--img-size", 32, "--num-classes", 8, "--json")
    info = json.loads(out)
    assert rc == 0 and info["input_size"] == [3, 16, 32, 32] and info["output_shapes"]["output"] == [1, 8]
    rc, out, _ = cli(capsys, "info", "revunet3d", "--img-size", 32, "--json")
    info = json.loads(out)
    assert info["input_size"] == [4, 32, 32, 32] and info["output_shapes"]["output"] == [1, 3, 32, 32, 32]
    assert info["params"] == 800_995


# --- architecture files (detection, search) -------------------------------------------------------

def test_info_and_train_accept_an_architecture_file(capsys, tmp_path):
    from mobilezoo.models.mobiledet import ARCHS
    arch = tmp_path / "cpu.json"
    arch.write_text(json.dumps(ARCHS["cpu"]))
    rc, out, _ = cli(capsys, "info", arch, "--num-classes", 90, "--json")
    _, ref, _ = cli(capsys, "info", "ssdlite_mobiledet_cpu", "--num-classes", 90, "--json")
    assert rc == 0 and json.loads(out)["params"] == json.loads(ref)["params"]


def test_a_malformed_architecture_file_names_the_layer_and_field(capsys, tmp_path):
    from mobilezoo.models.mobiledet import ARCHS
    layers = json.loads(json.dumps(ARCHS["cpu"]))
    layers[4]["kernel"] = "3"
    arch = tmp_path / "bad.json"
    arch.write_text(json.dumps(layers))
    for argv in (["info", arch], ["train", "detect_shapes", "--arch", arch, "--out", tmp_path / "run"]):
        rc, _, err = cli(capsys, *argv)
        line = error_line(err, argv[0])
        assert rc == 2 and "layer 4" in line and "kernel" in line
    assert not (tmp_path / "run").exists()


# --- export + ONNX Runtime ------------------------------------------------------------------------

def test_export_then_eval_and_predict_with_onnxruntime(capsys, trained, data_root, tmp_path):
    out = tmp_path / "m.onnx"
    rc, stdout, err = cli(capsys, "export", trained, "--out", out, "--int8", "--calib-samples", 8)
    assert rc == 0, err
    import re
    line = stdout.splitlines()[0]  # the parity check as a sentence, on the run's own images
    found = re.search(r"checked against PyTorch on (\d+) real inputs: outputs differ by at most (\S+) ", line)
    assert found and int(found[1]) >= 2 and float(found[2]) <= 1e-4
    assert line.endswith(f"passed (of {data_root})")
    int8 = tmp_path / "m.int8.onnx"
    assert int8.stat().st_size < 0.5 * out.stat().st_size
    _, torch_metrics, _ = cli(capsys, "eval", trained, "--json", "--out", tmp_path / "t")
    rc, ort_metrics, err = cli(capsys, "eval", trained, "--json", "--runtime", "onnxruntime", "--onnx", out,
                               "--out", tmp_path / "o")
    assert rc == 0, err
    assert json.loads(ort_metrics)["top1"] == json.loads(torch_metrics)["top1"]
    # export --int8 evaluated both files on the val split: the fp32 row is what `eval` measures
    report = json.loads((tmp_path / "m.int8.json").read_text())
    assert report["metric"] == "top1" and set(report["rows"]) == {"fp32", "int8"}
    assert report["rows"]["fp32"]["metric"] == json.loads(ort_metrics)["top1"]
    rows = report["rows"]
    assert report["change"]["int8"] == pytest.approx(rows["int8"]["metric"] - rows["fp32"]["metric"])
    assert "val top1" in stdout and "vs fp32" in stdout
    image = next(data_root.rglob("*.png"))
    _, torch_pred, _ = cli(capsys, "predict", trained, image, "--topk", 1)
    rc, ort_pred, err = cli(capsys, "predict", trained, image, "--topk", 1, "--runtime", "onnxruntime", "--onnx", out)
    assert rc == 0, err
    assert json.loads(ort_pred)[0]["topk"][0]["label"] == json.loads(torch_pred)[0]["topk"][0]["label"]


@pytest.mark.slow  # compiling takes ~30 s on 2 cores: with the slow tests, to keep `make test` under 10 minutes
def test_eval_with_the_compiled_model_gives_the_same_metrics(capsys, trained, tmp_path):
    _, torch_metrics, _ = cli(capsys, "eval", trained, "--json", "--out", tmp_path / "t")
    rc, compiled, err = cli(capsys, "eval", trained, "--json", "--runtime", "compile", "--out", tmp_path / "c")
    assert rc == 0, err
    want, got = json.loads(torch_metrics), json.loads(compiled)
    assert got["count"] == want["count"] > 0
    assert got["top1"] == want["top1"] and got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_onnxruntime_without_an_export_is_a_one_line_error(capsys, trained, tmp_path):
    rc, _, err = cli(capsys, "eval", trained, "--runtime", "onnxruntime", "--onnx", tmp_path / "none.onnx")
    assert rc == 2 and "none.onnx" in error_line(err, "eval") and "export" in error_line(err, "eval")


def test_bench_names_its_suites_and_where_the_memory_experiment_went(capsys):
    rc, _, err = cli(capsys, "bench", "memory", "revunet3d")
    line = error_line(err, "bench")
    assert rc == 2 and "'memory'" in line and "revunet_memory.py" in line and "runtimes" in line


# --- numbers on the command line -------------------------------------------------------------------

def test_small_learning_rates_reach_the_recipe(capsys, tmp_path):
    from mobilezoo.cli import _overrides, build_parser
    from mobilezoo.recipes import load_recipe
    args = build_parser().parse_args(["train", "--lr", "0.00001", "--set", "optim.weight_decay=1e-5",
                                      "--set", "optim.min_lr_ratio=3e-4"])
    r = load_recipe("classify_digits", _overrides(args))
    assert (r.optim.lr, r.optim.weight_decay, r.optim.min_lr_ratio) == (1e-5, 1e-5, 3e-4)


def test_a_non_number_is_one_line_naming_the_field(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--set", "optim.weight_decay=lots", "--out", tmp_path / "run")
    assert rc == 2
    assert "optim.weight_decay" in error_line(err, "train")
    assert not (tmp_path / "run").exists()


# --- finished and existing runs, outputs that cannot be written ----------------------------------------

def test_resuming_a_finished_run_says_it_is_complete(trained, capsys):
    before = (trained / "model.safetensors").read_bytes()
    rc, _, err = cli(capsys, "train", "--resume", trained)
    assert rc == 2
    line = error_line(err, "train")
    assert str(trained) in line and "complete (1 of 1 epochs)" in line and "--epochs" in line
    assert (trained / "model.safetensors").read_bytes() == before


def test_training_into_a_run_folder_needs_overwrite(trained, data_root, capsys, tmp_path):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    rc, _, err = cli(capsys, "train", "--data", data_root, "--out", trained, *TINY)
    assert rc == 2
    assert str(trained) in error_line(err, "train") and "--overwrite" in error_line(err, "train")
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    rc, _, err = cli(capsys, "train", "--data", data_root, "--out", copy, *TINY, "--seed", "4", "--overwrite")
    assert rc == 0, err
    assert (copy / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.parametrize("where", ["below_a_file", "read_only"])
def test_an_output_folder_that_cannot_be_made_is_one_line(data_root, capsys, tmp_path, where):
    (tmp_path / "plain.txt").write_text("x")
    out = tmp_path / "plain.txt" / "run" if where == "below_a_file" else Path("/sys/mobilezoo_run")
    rc, _, err = cli(capsys, "train", "--data", data_root, "--out", out, *TINY)
    assert rc == 2
    assert str(out) in error_line(err, "train")


def test_predict_onto_a_full_disk_is_one_line(trained, data_root, capsys):
    rc, _, err = cli(capsys, "predict", trained, data_root / "val" / "cat", "--out", "/dev/full")
    assert rc == 2
    line = error_line(err, "predict")
    assert "/dev/full" in line and "No space left on device" in line


def test_predict_refuses_another_tasks_options(trained, data_root, capsys):
    for flag, value in (("--annotations", "instances_val.json"), ("--score-thresh", "0.5")):
        rc, _, err = cli(capsys, "predict", trained, data_root / "val" / "cat", flag, value)
        assert rc == 2
        line = error_line(err, "predict")
        assert flag in line and "classify run" in line and "--topk" in line


def test_info_on_a_bare_backbone_lists_its_feature_maps(capsys):
    rc, out, err = cli(capsys, "info", "mobiledet_cpu", "--img-size", "64", "--json")
    assert rc == 0, err
    shapes = json.loads(out)["output_shapes"]
    assert len(shapes) >= 2 and all(s[0] == 1 and s[2] <= 64 // 8 for s in shapes.values())
