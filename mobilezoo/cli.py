"""The `mobilezoo` command: list, info, train, eval, predict, bench, convert, search, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

# Flags shared by train/eval that map onto recipe fields.
EXPORTED_RUNTIMES = ("onnxruntime", "openvino", "litert")  # run the export on the CPU, in fp32 inputs
RECIPE_FLAGS = {
    "model": "model.name", "data": "data.name", "epochs": "train.epochs",
    "batch_size": "data.batch_size", "lr": "optim.lr", "img_size": "data.img_size",
    "device": "train.device", "precision": "train.precision", "workers": "data.workers",
    "seed": "train.seed", "out": "out", "ema": "train.ema_decay", "threads": "train.threads",
}


def _add_recipe_flags(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set optim.weight_decay=0.1")
    p.add_argument("--data", help="embedded dataset name (digits) or a folder with train/ and val/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    if not any("--precision" in a.option_strings for a in p._actions):  # eval: a runtime flag (below)
        p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast or fp32")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip unreadable samples (counted and reported) instead of stopping")
    if training:
        p.add_argument("--model", help="model name (see `mobilezoo list`)")
        p.add_argument("--epochs", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--img-size", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--ema", type=float, metavar="DECAY", help="EMA of weights (0 = off)")
        p.add_argument("--out", help="run directory to write")
        p.add_argument("--arch", help="detection: a MobileDet architecture JSON (e.g. from `mobilezoo search`)")
        p.add_argument("--qat", action="store_true",
                       help="quantization-aware training (train.qat): train through the fake INT8 weights and "
                       "activations of `export --tflite --int8`; to fine-tune a trained run, add "
                       "--set model.checkpoint=RUN/model.safetensors")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["torch", "compile", "onnxruntime", "openvino", "litert"], default="torch",
                   help="run the PyTorch model, the same compiled by torch.compile (TorchInductor, frozen "
                   "weights: compiles on the first batch of each shape, then faster), the run's ONNX export "
                   "in ONNX Runtime or OpenVINO (pip install 'mobilezoo[openvino]'), or its LiteRT file "
                   "RUN/model.tflite from `mobilezoo export RUN --tflite` (pip install 'mobilezoo[litert]')")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                   help="PyTorch: bf16 autocast or fp32 (default: the run's); --runtime openvino: the inference "
                   "precision (default fp32, always set: OpenVINO would pick bf16 on its own where the CPU has it); "
                   "int8 runs RUN/model.openvino-int8.xml from `mobilezoo export RUN --openvino-int8`; "
                   "--runtime litert: int8 runs RUN/model.int8.tflite from `mobilezoo export RUN --tflite --int8`")
    p.add_argument("--onnx", help="with --runtime onnxruntime or openvino: the ONNX file (default RUN/model.onnx)")


def _overrides(args) -> list[str]:
    exported = getattr(args, "runtime", "torch") in EXPORTED_RUNTIMES  # its --precision is the runtime's
    out = [f"{field}={json.dumps(getattr(args, flag))}" for flag, field in RECIPE_FLAGS.items()
           if getattr(args, flag, None) is not None and not (exported and flag == "precision")]
    if getattr(args, "skip_bad_samples", False):
        out.append("data.skip_bad_samples=true")
    if getattr(args, "qat", False):
        out.append("train.qat=true")
    if getattr(args, "arch", None):
        _check_arch(args.arch)
        out += ['model.name="ssdlite_mobiledet"', f"model.args.arch={json.dumps(str(args.arch))}"]
    return out + args.set


def _check_arch(path: str) -> None:
    """Validate an architecture file field by field (errors name the layer and the field)."""
    from .models.mobiledet import validate_arch
    validate_arch(path)


def _arch_model(name: str) -> tuple[str, dict]:
    """A model name, or an architecture .json file standing for `ssdlite_mobiledet` built from it."""
    if name.endswith(".json"):
        _check_arch(name)
        return "ssdlite_mobiledet", {"arch": name}
    return name, {}


def cmd_list(args) -> int:
    from .models import get_entry, list_models
    names = list_models(args.task)
    if args.task and not names:
        raise UserError(f"no models for task {args.task!r}")
    for n in names:
        print(f"{n:24s} {get_entry(n).task}")
    return 0


def cmd_info(args) -> int:
    from .deploy.profile import model_info
    name, kwargs = _arch_model(args.name)
    kwargs.update(_parse_kv(kv) for kv in args.arg)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    info = model_info(name, args.img_size, **kwargs)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.name}: {info['params']:,} parameters ({info['variables']:,} with BN statistics), "
              f"{info['macs'] / 1e9:.3f} GMACs "
              f"at {'x'.join(map(str, info['input_size']))}")
        for k, shape in info["output_shapes"].items():
            print(f"  {k:10s} {shape}")
    return 0


def _parse_kv(kv: str):
    import yaml
    if "=" not in kv:
        raise UserError(f"--arg {kv!r}: expected KEY=VALUE, e.g. rel_pos=false")
    k, v = kv.split("=", 1)
    return k, yaml.safe_load(v)


def cmd_train(args) -> int:
    from .engine import fit
    from .recipes import load_recipe
    from .tasks import build_task
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"--resume {run}: not a run directory (no config.yaml)")
        recipe = load_recipe(str(run / "config.yaml"), _overrides(args) + [f"out={json.dumps(str(run))}"])
    else:
        recipe = load_recipe(args.recipe or "classify_digits", _overrides(args))
    fit(recipe, build_task(recipe), resume=bool(args.resume), stop_after=args.stop_after, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    import torch

    from .engine import Context, evaluate, resolve_device
    from .engine.loop import eval_loader
    from .tasks import load_run
    _check_precision(args, "eval")
    recipe, task, model = load_run(args.run, _overrides(args))
    onnx = args.runtime in EXPORTED_RUNTIMES
    ctx = Context(torch.device("cpu") if onnx else resolve_device(recipe.train.device),
                  "fp32" if onnx else recipe.train.precision, channels_last=recipe.train.channels_last and not onnx)
    model = _with_runtime(args, ctx.prepare(model))
    metrics = evaluate(model, eval_loader(task, task.val_dataset(), recipe, ctx), task, ctx)
    out = Path(args.out or args.run)
    out.mkdir(parents=True, exist_ok=True)
    task.report(out, metrics, [])
    (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2) if args.json else f"{args.run}: {task.summary(metrics)}"
          + (f" ({metrics['skipped']} unreadable samples skipped)" if metrics["skipped"] else ""))
    return 0


def _check_precision(args, command: str) -> None:
    """--precision int8 is OpenVINO's and LiteRT's, bf16 (for ONNX Runtime, LiteRT or predict) OpenVINO's alone."""
    p = args.precision
    if args.runtime == "litert" and p == "bf16":
        raise UserError("--precision bf16 is not a LiteRT precision: --runtime litert runs RUN/model.tflite (fp32) "
                        "or, with --precision int8, RUN/model.int8.tflite")
    if p and args.runtime not in ("openvino", "litert") and (p == "int8" or args.runtime == "onnxruntime"
                                                            or command == "predict"):
        raise UserError(f"--precision {p} is for --runtime openvino (ONNX Runtime runs the file as exported, "
                        "INT8: --onnx RUN/model.int8.onnx)")


def _with_runtime(args, model):
    """The torch model, compiled with `--runtime compile`, or with `--runtime onnxruntime` / `openvino` /
    `litert` a session of the run's export."""
    precision = args.precision or "fp32"
    if args.runtime == "torch":
        return model
    if args.runtime == "compile":
        from .deploy.compiled import compile_for_inference
        return compile_for_inference(model)
    if args.runtime == "litert":
        return _litert_model(args, precision)
    path = Path(args.onnx or Path(args.run) / "model.onnx")
    if args.runtime == "openvino" and precision == "int8":
        from .deploy.openvino import int8_path
        path = int8_path(path)
        if not path.is_file():
            raise UserError(f"{path}: no OpenVINO INT8 file; run `mobilezoo export {args.run} --openvino-int8` first")
    elif not path.is_file():
        raise UserError(f"{path}: no ONNX file; run `mobilezoo export {args.run}` first (or pass --onnx)")
    if args.runtime == "openvino":
        from .deploy.openvino import OpenVinoModel
        return OpenVinoModel(path, precision, threads=args.threads)
    from .deploy.ort import OrtModel
    return OrtModel(path, threads=args.threads)


def _litert_model(args, precision: str):
    """The run's LiteRT file (INT8 with --precision int8) in LiteRT's interpreter."""
    from .deploy.litert import LiteRTModel, int8_path
    path = Path(args.run) / "model.tflite"
    flags = "--tflite"
    if precision == "int8":
        path, flags = int8_path(path), "--tflite --int8"
    if not path.is_file():
        raise UserError(f"{path}: no LiteRT file; run `mobilezoo export {args.run} {flags}` first")
    return LiteRTModel(path, threads=args.threads)


def _skip_and_warn(skipped: list[str]):
    """A handler for unreadable inputs: one warning line on stderr naming each, and a tally."""
    def on_bad_sample(e: BaseException) -> None:
        skipped.append(_one_line(e))
        print(f"mobilezoo predict: warning: skipped {skipped[-1]}", file=sys.stderr)
    return on_bad_sample


def _tally_skipped(skipped: list[str], predicted: int) -> None:
    """One closing line counting the skipped inputs; an error if nothing at all could be read."""
    from .errors import DataError
    if not skipped:
        return
    if not predicted:
        raise DataError(f"none of the inputs could be read ({len(skipped)} skipped)")
    print(f"mobilezoo predict: {len(skipped)} unreadable inputs skipped, {predicted} predicted", file=sys.stderr)


def cmd_predict(args) -> int:
    import torch

    from .engine import resolve_device
    from .tasks import load_run
    _check_precision(args, "predict")
    recipe, task, model = load_run(args.run, [f"train.device={args.device}"] if args.device else [])
    options = {k: getattr(args, k) for k in ("topk", "score_thresh", "annotations") if getattr(args, k) is not None}
    unknown = sorted(set(options) - set(task.predict_options))
    if unknown:
        takes = ", ".join(f"--{o.replace('_', '-')}" for o in task.predict_options) or "none"
        raise UserError(f"--{unknown[0].replace('_', '-')} is not an option of predict for {args.run}, a "
                        f"{task.name} run (its options: {takes})")
    device = resolve_device(recipe.train.device) if args.runtime not in EXPORTED_RUNTIMES else torch.device("cpu")
    model = _with_runtime(args, model.to(device))
    skipped: list[str] = []
    out = args.out or (Path(args.run) / "predictions" if task.predicts_into_folder else None)
    preds = task.predict(model, args.inputs, out, device=device,
                         on_bad_sample=_skip_and_warn(skipped) if args.skip_bad_samples else None, **options)
    _tally_skipped(skipped, preds.count)
    for line in preds.lines:
        print(line)
    for note in preds.notes:
        print(f"mobilezoo predict: {note}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .deploy.export import check_onnx, describe_parity, export_onnx
    from .deploy.quantize import quantize_int8, split_for_calibration
    src = Path(args.source)
    if not (src / "config.yaml").is_file():
        raise UserError(f"{src}: not a run directory (no config.yaml); export needs a trained run, whose "
                        "data checks the export")
    from .tasks import load_run
    recipe, task, model = load_run(src, [f"data.name={json.dumps(args.calib_data)}"] if args.calib_data else [])
    if args.tflite:
        _export_litert(args, recipe, task, model, src)
        return 0
    x = task.example_inputs(args.check_samples)
    out = Path(args.out or src / "model.onnx")
    if args.mode and args.mode not in task.export_modes:
        raise UserError(f"--graph {args.mode}: a {task.name} run exports one graph"
                        + (f" (choose from {', '.join(task.export_modes)})" if task.export_modes else ""))
    int8 = args.int8 or args.openvino_int8
    mode = task.int8_mode if int8 and task.int8_mode else args.mode
    # The graph INT8 needs takes any batch (calibration and evaluation batches); another graph is
    # exported at batch 1 unless asked (ONNX Runtime runs larger batches in chunks), and the parity
    # check then runs on every sample.
    dynamic = args.dynamic_batch or (mode is not None and mode == task.int8_mode)
    summary = export_onnx(model, x if dynamic else x[:1], out, task, opset=args.opset,
                          dynamic_batch=dynamic, mode=mode)
    parity = check_onnx(model, out, x, task) if len(x) > 1 and not dynamic else summary.get("parity")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), {describe_parity(parity)} (of {recipe.data.name})")
    if args.int8:
        calib = task.example_inputs(args.calib_samples)
        q = quantize_int8(out, out.with_name(out.stem + ".int8.onnx"), split_for_calibration(calib))
        print(f"wrote {q} ({q.stat().st_size / out.stat().st_size:.2f}x the fp32 size), calibrated on "
              f"{len(calib)} training samples of {recipe.data.name}")
        if args.compare:  # the accuracy and speed change on the val split
            from .bench.onnx_compare import compare_onnx, format_comparison
            result = compare_onnx(recipe, task, {"fp32": out, "int8": q}, threads=args.threads)
            q.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
            print(format_comparison(result) + f"\n(written to {q.with_suffix('.json')})")
    if args.openvino_int8:
        _export_openvino_int8(args, recipe, task, out)
    return 0


def _export_openvino_int8(args, recipe, task, onnx_path: Path) -> None:
    """NNCF INT8 of the export as an OpenVINO IR beside it, and (unless --no-compare) OpenVINO fp32,
    bf16 and INT8 side by side on the val split."""
    from .deploy.openvino import OpenVinoModel, int8_path, quantize_openvino_int8
    from .deploy.quantize import split_for_calibration
    calib = task.example_inputs(args.calib_samples)
    q = quantize_openvino_int8(onnx_path, int8_path(onnx_path), split_for_calibration(calib),
                               task.openvino_int8_options())
    print(f"wrote {q} (NNCF INT8 for OpenVINO), calibrated on {len(calib)} training samples of {recipe.data.name}")
    if args.compare:
        from .bench.onnx_compare import compare_onnx, format_comparison
        models = {f"openvino {p}": OpenVinoModel(q if p == "int8" else onnx_path, p, threads=args.threads)
                  for p in ("fp32", "bf16", "int8")}
        result = compare_onnx(recipe, task, models)
        report = q.with_name(q.stem + ".json")
        report.write_text(json.dumps(result, indent=2) + "\n")
        print(format_comparison(result) + f"\n(written to {report})")


def _export_litert(args, recipe, task, model, src: Path) -> None:
    """`export --tflite`: the fp32 LiteRT file checked against PyTorch, with --int8 its full-integer INT8
    beside it and (unless --no-compare) both evaluated on the val split."""
    from .deploy.export import describe_parity
    from .deploy.litert import LiteRTError, LiteRTModel, export_tflite, int8_path, quantize_tflite_int8, refusal
    for flag, given in (("--openvino-int8", args.openvino_int8), ("--dynamic-batch", args.dynamic_batch),
                        ("--opset", args.opset is not None)):
        if given:
            raise UserError(f"{flag} is for the ONNX export; a LiteRT file (--tflite) takes batch 1 at fixed sides "
                            "(export ONNX in a separate command)")
    why = refusal(task)
    if why:
        raise LiteRTError(why)
    out = Path(args.out or src / "model.tflite")
    x = task.example_inputs(args.check_samples)
    summary = export_tflite(model, x, out, task, mode=args.mode, threads=args.threads)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, NCHW input {'x'.join(map(str, summary['input_shape']))}), "
          f"{describe_parity(summary['parity'])} (of {recipe.data.name})")
    if not args.int8:
        return
    calib = task.example_inputs(args.calib_samples)
    q = quantize_tflite_int8(out, int8_path(out), [calib], threads=args.threads)
    lite = LiteRTModel(q, threads=args.threads)
    print(f"wrote {q} ({q.stat().st_size / out.stat().st_size:.2f}x the fp32 size; {lite.io_types()}), calibrated "
          f"on {len(calib)} training samples of {recipe.data.name}")
    if args.compare:
        from .bench.onnx_compare import compare_onnx, format_comparison
        models = {"litert fp32": LiteRTModel(out, threads=args.threads), "litert int8": lite}
        result = compare_onnx(recipe, task, models)
        report = q.with_name(out.stem + ".litert-int8.json")
        report.write_text(json.dumps(result, indent=2) + "\n")
        print(format_comparison(result) + f"\n(written to {report})")


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint, save_converted
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out {args.out!r}: expected a .safetensors path")
    c = convert_checkpoint(args.checkpoint, args.model, ema=args.ema, normalization=args.normalization,
                           input_size=args.input_size)
    out = save_converted(c, args.out)
    params = sum(v.numel() for k, v in c.state.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked")))
    read = f" ({c.summary})" if c.summary else ""
    print(f"{c.source}{read} -> {out}: {c.model_name}, {c.num_classes} classes, {params:,} parameters, "
          f"{c.weights} weights; expects {c.input_size} px inputs with {c.normalization} normalisation")
    for note in c.notes:
        print(f"note: {note}")
    print(f"use: create_model({c.model_name!r}, checkpoint={str(out)!r}) or "
          f"`mobilezoo train RECIPE --set model.checkpoint={out}`")
    return 0


def cmd_bench(args) -> int:
    from .bench.suites import NEEDS_MODELS, suite
    module = suite(args.suite)
    if args.suite in NEEDS_MODELS and not args.models:
        raise UserError(f"name at least one model to benchmark, e.g. `mobilezoo bench {args.suite} NAME --vs PEER`")
    result, text = module.run_cli(args, log=lambda m: print(m, file=sys.stderr))
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cmd_search(args) -> int:
    from .engine import resolve_device
    from .nas import fit_latency_model, run_search
    if args.action == "latency-model":
        report = fit_latency_model(runtime=args.runtime, threads=args.threads, samples=args.samples,
                                   out_path=args.out or "latency_model.json", space=args.space)
        print(f"latency model {report['model_path']}: held-out r^2 {report['r2']:.3f}, MAE {report['mae_ms']:.2f} ms "
              f"({report['mae_pct']:.1f}% of the mean {report['mean_ms']:.1f} ms); plot {report['plot_path']}")
        return 0
    if args.target_ms is None or args.latency_model is None:
        raise UserError("search needs --target-ms and --latency-model (make one with `mobilezoo search latency-model`)")
    arch = run_search(data=args.data, target_ms=args.target_ms, steps=args.steps, out_dir=args.out or "runs/search",
                      resume=args.resume, space=args.space, latency_model=args.latency_model, img_size=args.img_size,
                      threads=args.threads, stop_after=args.stop_after, workers=args.workers,
                      device=str(resolve_device(args.device)),
                      final_tolerance=None if args.final_argmax else args.final_tolerance,
                      samples_per_step=args.samples_per_step, controller_lr=args.controller_lr, tau=args.tau)
    print(f"searched architecture: {arch} (train it: mobilezoo train detect_shapes --arch {arch})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), quick=args.quick, tasks=args.task)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from .demo import DEMOS
    from .tasks import TASKS
    p = argparse.ArgumentParser(prog="mobilezoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("list", help="list registered models")
    s.add_argument("--task", help=f"only models of this task ({', '.join(TASKS)})")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("info", help="parameters, MACs and output shapes of a model")
    s.add_argument("name")
    s.add_argument("--img-size", type=int, nargs="+", metavar="N", help="input side, or H W")
    s.add_argument("--num-classes", type=int, help="classes (default: the model's own, e.g. 1000 / 3 regions)")
    s.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor option, e.g. rel_pos=false")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("train", help="train a model from a recipe")
    s.add_argument("recipe", nargs="?", help="packaged recipe name or YAML path (default classify_digits)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    s.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs of this invocation (resume later)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (refused without this flag)")
    _add_recipe_flags(s, training=True)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a trained run on its (or another) val split")
    s.add_argument("run", help="run directory (config.yaml + model.safetensors)")
    s.add_argument("--out", help="where to write eval.json and figures (default the run dir)")
    s.add_argument("--json", action="store_true", help="print all metrics as JSON")
    _add_runtime_flags(s)
    _add_recipe_flags(s, training=False)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("predict", help="predict on image or video files, folders, or BraTS case folders")
    s.add_argument("run", help="run directory")
    s.add_argument("inputs", nargs="+", help="image files or folders")
    s.add_argument("--topk", type=int, help="classification, video: labels per input (default 5)")
    s.add_argument("--score-thresh", type=float, help="detection: lowest score drawn/kept (default 0.3)")
    s.add_argument("--out", help="detect, segment, segment3d: the folder the predicted files go to (default "
                   "RUN/predictions); classify, video: a JSON file (default: print it)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=int, help="ONNX Runtime / OpenVINO / LiteRT threads")
    s.add_argument("--annotations", metavar="FILE",
                   help="detection: the COCO instances JSON the images belong to, whose image ids predictions.json "
                   "then carries (default: ROOT/annotations/instances_<split>.json beside images in ROOT/<split>/; "
                   "images in no such file get file_name only)")
    s.add_argument("--skip-bad-samples", action="store_true",
                   help="skip unreadable inputs (each named in a warning, then counted) instead of stopping")
    _add_runtime_flags(s)
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("bench", help="latency, throughput, memory and GMAC/s of our models against peers, "
                       "in one run: mobilezoo bench {classify,detect,video,runtimes} MODELS --vs PEERS")
    s.add_argument("suite", help="classify (ours vs timm:NAME[@SIZE], fp32/bf16), detect (end to end vs "
                   "tv:ssdlite320_mobilenet_v3_large), video (vs tv:NAME; eager:NAME is the reference, compile:NAME "
                   "compiled) or runtimes (every family in every runtime; no models: the whole suite)")
    s.add_argument("models", nargs="*", help="our model names (detect: or an architecture .json)")
    s.add_argument("--vs", nargs="*", default=[], metavar="PEER",
                   help="peers timed in the same run (timm:NAME[@SIZE], tv:NAME, monai:SegResNet); "
                   "ratios are reported against them")
    s.add_argument("--img-size", type=int, help="classify: input side (default 224); detect: 320")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="classify, video")
    s.add_argument("--batch", type=int, default=32, help="classify: batch size for throughput")
    s.add_argument("--iters", type=int, default=50, help="classify: timed batch-1 runs in all (spread over the rounds)")
    s.add_argument("--clip", default="16x224", help="video: FRAMESxSIDE (default 16x224)")
    s.add_argument("--runtimes", nargs="+", choices=["eager", "fp32", "bf16", "compile", "compile-bf16", "ort", "int8",
                                                     "ov-fp32", "ov-bf16", "ov-int8", "litert", "litert-int8"],
                   help="runtimes: PyTorch fp32 eager / fused fp32 / bf16 / compiled fp32 / compiled bf16, ONNX "
                   "Runtime fp32 / INT8, OpenVINO fp32 / bf16 / NNCF INT8, LiteRT fp32 / full-integer INT8 "
                   "(default: all)")
    s.add_argument("--quick", action="store_true", help="runtimes: small inputs and batches")
    s.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("export", help="ONNX or LiteRT export of a trained run, checked against PyTorch; INT8 "
                       "quantization")
    s.add_argument("source", help="run directory (config.yaml + model.safetensors)")
    s.add_argument("--format", choices=["onnx"], default="onnx")
    s.add_argument("--tflite", action="store_true",
                   help="export a LiteRT (TFLite) file instead of ONNX: RUN/model.tflite, fp32, batch 1, NCHW input "
                   "(detectors: the raw heads, anchors beside); 2-D models only (needs 'mobilezoo[litert]'; run it "
                   "with --runtime litert)")
    s.add_argument("--out", help="ONNX file (default RUN/model.onnx; with --tflite RUN/model.tflite)")
    s.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    s.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension")
    s.add_argument("--graph", "--detector-mode", dest="mode", metavar="MODE",
                   help="a task's alternative graph; detectors: full (default) = decoding + NMS in the graph, "
                   "raw = heads only, anchors beside")
    s.add_argument("--check-samples", type=int, default=4, help="real samples the parity check runs on")
    s.add_argument("--int8", action="store_true",
                   help="also write an INT8 (static, QDQ) model: RUN/model.int8.onnx; with --tflite a full-integer "
                   "LiteRT model (int8 input and output, int8 ops): RUN/model.int8.tflite")
    s.add_argument("--openvino-int8", action="store_true",
                   help="also write an OpenVINO INT8 model by NNCF: RUN/model.openvino-int8.xml (needs "
                   "'mobilezoo[openvino]'; run it with --runtime openvino --precision int8)")
    s.add_argument("--calib-data", help="data root for INT8 calibration (default: the run's own training data)")
    s.add_argument("--calib-samples", type=int, default=64)
    s.add_argument("--no-compare", dest="compare", action="store_false",
                   help="with --int8 / --openvino-int8: skip evaluating fp32 and INT8 on the val split (accuracy "
                   "and latency change, written to RUN/model.int8.json / model.openvino-int8.json / "
                   "model.litert-int8.json)")
    s.add_argument("--threads", type=int, help="ONNX Runtime / LiteRT threads for the checks and the comparison")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("convert", help="an official checkpoint (deeplab2 MOAT, TF OD API MobileDet, SqueezeTime) "
                       "-> safetensors")
    s.add_argument("checkpoint", help="TF checkpoint prefix (DIR/model.ckpt), its .index, or a folder holding one; "
                   "or a SqueezeTime .pth")
    s.add_argument("--out", required=True, help="output .safetensors file (the metadata records the model, "
                   "normalisation and resolution)")
    s.add_argument("--model", help="the model the file holds (default: read off the file)")
    s.add_argument("--ema", action="store_true", help="take the ExponentialMovingAverage copies (TF files)")
    s.add_argument("--normalization", choices=["imagenet", "inception"],
                   help="input normalisation the weights expect (default: as released: ImageNet-22k MOATs and "
                   "MobileDets inception, i.e. mean/std 0.5; others imagenet)")
    s.add_argument("--input-size", type=int,
                   help="resolution the weights expect (default: from the name, or as released)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("search", help="MobileDets architecture search (latency-aware) and its latency model")
    s.add_argument("action", nargs="?", choices=["run", "latency-model"], default="run",
                   help="run (default): search; latency-model: measure random architectures and fit the cost model")
    s.add_argument("--space", default="ibn_fused_tucker",
                   help="search space: ibn, ibn_fused, ibn_fused_tucker, cpu_ibn_fused_tucker")
    s.add_argument("--data", default="shapes", help="COCO-format root or embedded name (search)")
    s.add_argument("--target-ms", type=float, help="latency target in ms (search)")
    s.add_argument("--latency-model", help="cost model JSON from `search latency-model` (search)")
    s.add_argument("--steps", type=int, default=1000, help="search steps")
    s.add_argument("--img-size", type=int, default=320)
    s.add_argument("--resume", action="store_true", help="continue a search from its last checkpoint")
    s.add_argument("--stop-after", type=int, metavar="STEPS", help="stop after this many steps (resume later)")
    s.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch", help="latency-model runtime")
    s.add_argument("--samples", type=int, default=80, help="latency-model: architectures measured")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the search trains")
    s.add_argument("--workers", type=int, default=0, help="search: loader processes building batches ahead")
    s.add_argument("--final-tolerance", type=float, default=0.05,
                   help="search: the result is the controller's most likely architecture within this fraction "
                        "of the target (default 0.05)")
    s.add_argument("--samples-per-step", type=int, default=1, metavar="K",
                   help="search: K architectures scored per reward batch, leave-one-out baseline (1: EMA baseline)")
    s.add_argument("--controller-lr", type=float, default=5e-3, help="search: controller Adam learning rate")
    s.add_argument("--tau", type=float, default=-0.5, help="search: latency weight of the reward (negative)")
    s.add_argument("--final-argmax", action="store_true", help="search: the result is the per-decision argmax")
    s.add_argument("--out", help="search: output folder (default runs/search); latency-model: JSON path")
    s.set_defaults(fn=cmd_search)

    s = sub.add_parser("demo", help="every task on its embedded data: train, evaluate, predict, export, time")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--task", action="append", help=f"only this task (repeatable): {', '.join(DEMOS)}")
    s.add_argument("--quick", action="store_true", help="a few epochs on a subset (seconds)")
    s.set_defaults(fn=cmd_demo)
    return p


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[-1] if lines else type(e).__name__
    # Errors raised in DataLoader workers come back with the worker's traceback in the message.
    for prefix in ("mobilezoo.errors.", "mobilezoo.models.weights.", "mobilezoo.models.registry."):
        if line.startswith(prefix):
            line = line.split(": ", 1)[-1]
    return line


def _os_error(e: OSError, args) -> str:
    """'PATH: reason' for a failed file operation; writes report no file name, so the output the
    command was given stands in for it."""
    path = e.filename or getattr(args, "out", None) or getattr(args, "run", None) or getattr(args, "resume", None)
    reason = e.strerror or str(e)
    return f"{path}: {reason}" if path else reason


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2, Ctrl-C exits 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"mobilezoo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except OSError as e:  # an output folder below a file, read-only, or a full disk
        print(f"mobilezoo {args.command}: error: {_os_error(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilezoo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
