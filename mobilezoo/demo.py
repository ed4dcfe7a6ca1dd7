"""`make demo` / `mobilezoo demo`: every task on its embedded data, end to end, in one report.

Per task: train (a demo-sized recipe), evaluate, predict on val samples (the run's own report
figures: confusion matrix, detections, segmentation overlays, labelled clips), export to ONNX
with a parity check, quantize to INT8 and evaluate both ONNX files on the val split (and, with
the extras installed, OpenVINO's NNCF INT8 and LiteRT's full-integer INT8 files), and time
batch-1 inference with each runtime. Writes `OUT/report.md`,
`OUT/report.html`, `OUT/latency.png` and one run directory per task.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .recipes import load_recipe


@dataclass(frozen=True)
class DemoTask:
    """One demo section: the packaged recipe and its demo-sized overrides."""

    title: str
    recipe: str
    overrides: tuple[str, ...]
    quick: tuple[str, ...]  # --quick: seconds, for tests
    backbone_from: str | None = None  # the demo section whose trained model's backbone this one starts from


DEMOS: dict[str, DemoTask] = {
    # 5 epochs (a sixth of the accuracy recipe), evaluated once; 6 epochs gave 99.7% in 35-38 s on 2 cores.
    "classify": DemoTask("Image classification: tiny-MOAT-0 on digits", "classify_digits",
                         ("train.epochs=5", "train.eval_every=5"),
                         ("train.epochs=2", "data.limit_train=256", "data.limit_val=128", "train.bn_recalibrate=2")),
    # 6 epochs at 256 px, batch 4 (twice the steps of batch 8), no SSD crops, lr 0.01, evaluated once:
    # what fits the demo's 15 minutes on 2 cores (the recipe needs 12 epochs at 320 px, 14 min, for
    # mAP 0.570; 8 epochs here give 0.34-0.35 but take the demo to 17 min): mAP 0.258 in ~385 s.
    # docs/demo.md has the ladder.
    "detect": DemoTask("Object detection: SSDLite + MobileDet-CPU on shapes", "detect_shapes",
                       ("train.epochs=6", "data.img_size=256", "data.batch_size=4", "data.augment.ssd_crop=0",
                        "optim.lr=0.01", "train.eval_every=6"),
                       ("train.epochs=1", "data.limit_train=32", "data.limit_val=8", "data.img_size=128",
                        "train.bn_recalibrate=1")),
    # 2 epochs from the demo detector's MobileDet-CPU backbone (trained on the same images): mIoU
    # 0.278-0.313 in 82-88 s on 2 cores; 3 epochs give 0.34-0.36 in ~2 min, 3 from scratch 0.209.
    "segment": DemoTask("Semantic segmentation: DeepLabv3+ on the detector's MobileDet-CPU backbone, shapes-seg",
                        "segment_shapes",
                        ("model.args.backbone=mobiledet_cpu", "train.epochs=2", "train.eval_every=2"),
                        ("train.epochs=1", "data.limit_train=16", "data.limit_val=4", "data.augment.resize=128",
                         "data.img_size=96", "train.bn_recalibrate=1"),
                        backbone_from="detect"),
    # 3 epochs; 4 gave mean Dice 0.933 on the phantom in ~40 s on 2 cores.
    "segment3d": DemoTask("3-D segmentation: reversible MBConv U-Net on the BraTS phantom", "segment_brats_phantom",
                          ("train.epochs=3",),
                          ("train.epochs=1", "data.limit_train=4", "data.limit_val=2")),
    # 15 of the accuracy recipe's 40 epochs; 20 gave 95.0-98.1% single-view in 77-91 s on 2 cores,
    # 30 give 98.75-100% in ~2 min.
    "video": DemoTask("Video recognition: SqueezeTime (mini) on motion clips", "video_motion",
                      ("train.epochs=15",),
                      ("train.epochs=1", "data.limit_train=16", "data.limit_val=8", "data.batch_size=8")),
}


def _deploy(name: str, recipe, task, model: torch.nn.Module, shape: tuple[int, ...], run_dir: Path,
            runs: int) -> tuple[list[dict], dict]:
    """Batch-1 latency per runtime: PyTorch eager, fused, bf16, and ONNX Runtime fp32 and INT8 after
    an export whose parity with PyTorch is checked on a real sample, OpenVINO and LiteRT where installed;
    every INT8 file is also evaluated on the val split (its accuracy change). Returns (rows, export summary)."""
    from .bench.onnx_compare import compare_onnx
    from .bench.timing import batch1_latency_ms
    from .deploy.export import export_onnx
    from .deploy.quantize import quantize_int8, split_for_calibration
    from .layers.fuse import fuse_for_inference
    model = model.eval().float()
    x = torch.randn(shape)
    rows = [{"task": name, "runtime": "PyTorch fp32 eager", "ms": batch1_latency_ms(model, x, runs)}]
    fused = fuse_for_inference(model)
    rows.append({"task": name, "runtime": "PyTorch fp32 fused", "ms": batch1_latency_ms(fused, x, runs)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append({"task": name, "runtime": "PyTorch bf16 fused", "ms": batch1_latency_ms(fused, x, runs)})
    onnx_path, int8_path = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    # Detectors: the raw heads (decoded by the detector's own fp32 postprocess), which INT8 needs.
    summary = export_onnx(model, task.example_inputs(1), onnx_path, task, mode=task.int8_mode)
    calib = task.example_inputs(8 if runs < 10 else 64)
    quantize_int8(onnx_path, int8_path, split_for_calibration(calib))
    files = {"fp32": onnx_path, "int8": int8_path, **_openvino_models(task, onnx_path, calib),
             **_litert_models(task, model, run_dir / "model.tflite", calib)}
    # OpenVINO fp32 / bf16 and LiteRT fp32 compute what the fp32 file does (parity checked): timed only.
    compared = compare_onnx(recipe, task, files, runs=runs,
                            timed_only=("OpenVINO fp32", "OpenVINO bf16", "LiteRT fp32"))
    for label, r in compared["rows"].items():
        runtime = label if label.startswith(("OpenVINO", "LiteRT")) else f"ONNX Runtime {label}"
        rows.append({"task": name, "runtime": runtime, "ms": r["latency_ms"], f"val_{compared['metric']}": r["metric"]})
    return rows, {"parity": summary.get("parity"), "int8": compared}


def _openvino_models(task, onnx_path: Path, calib: torch.Tensor) -> dict:
    """OpenVINO fp32 / bf16 on the export and NNCF INT8 beside it, when the openvino extra is installed."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return {}
    from .deploy.openvino import OpenVinoModel, int8_path, quantize_openvino_int8
    from .deploy.quantize import split_for_calibration
    q = quantize_openvino_int8(onnx_path, int8_path(onnx_path), split_for_calibration(calib),
                               task.openvino_int8_options())
    return {f"OpenVINO {p}": OpenVinoModel(q if p == "int8" else onnx_path, p) for p in ("fp32", "bf16", "int8")}


def _litert_models(task, model: torch.nn.Module, path: Path, calib: torch.Tensor) -> dict:
    """LiteRT fp32 (parity checked) and its full-integer INT8 file, when the litert extra is installed
    and the task's models have a LiteRT form (2-D ones)."""
    from .deploy import litert
    try:
        import ai_edge_litert  # noqa: F401
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError:
        return {}
    if litert.refusal(task):
        return {}
    from .deploy.quantize import split_for_calibration
    litert.export_tflite(model, task.example_inputs(1), path, task, threads=torch.get_num_threads())
    q = litert.quantize_tflite_int8(path, litert.int8_path(path), split_for_calibration(calib))
    return {"LiteRT fp32": litert.LiteRTModel(path), "LiteRT int8": litert.LiteRTModel(q)}


def _low_precision_sentence(compared: dict, label: str, what: str) -> list[str]:
    """An INT8 file's accuracy and speed against its runtime's fp32, as one sentence (none when absent)."""
    q = compared["rows"].get(f"{label} int8")
    if q is None:
        return []
    fp32 = compared["rows"][f"{label} fp32"]["latency_ms"]
    return [f"{label} INT8 ({what}): {compared['metric']} {q['metric']:.4f}, change "
            f"{compared['change'][f'{label} int8']:+.4f} vs the fp32 file; batch-1 {fp32 / q['latency_ms']:.2f}x "
            f"{label} fp32's speed."]


def _embed_run_report(run: str, run_dir: Path) -> list[str]:
    """The run's own report.md body (figures and tables), with links made relative to the demo root."""
    text = (run_dir / "report.md").read_text().split("\n", 1)[-1]  # drop its title
    text = re.sub(r"\]\((?!https?:)([^)]+)\)", lambda m: f"]({run}/{m.group(1)})", text)
    text = re.sub(r"^#", "###", text, flags=re.M)  # its sections nest under the task's heading
    return [text.strip(), ""]


def _latency_chart(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        mine = {r["runtime"]: r["ms"] for r in rows if r["task"] == t}
        names = [rt for rt in runtimes if rt in mine]
        ax.barh(range(len(names)), [mine[n] for n in names], color="tab:blue")
        ax.set_yticks(range(len(names)), [n.replace("PyTorch ", "") for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("batch-1 latency (ms)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_html(markdown_text: str, path: Path) -> None:
    import markdown
    body = markdown.markdown(markdown_text, extensions=["tables"])
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>mobilezoo demo</title>"
                    "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
                    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
                    f"</head><body>{body}</body></html>\n")


def _backbone_override(name: str, demo: DemoTask, out: Path) -> list[str]:
    """`model.backbone_checkpoint` set to the model of the section this one starts from."""
    if demo.backbone_from is None:
        return []
    source = out / demo.backbone_from / "model.safetensors"
    if not source.is_file():
        raise UserError(f"{source}: missing; the {name} demo starts from the {demo.backbone_from} demo's backbone, "
                        f"so run that section first (--task {demo.backbone_from} --task {name})")
    return [f"model.backbone_checkpoint={json.dumps(str(source))}"]


def run_demo(out: Path, quick: bool = False, tasks: list[str] | None = None) -> dict:
    """Train, evaluate, predict, export and time every task (or `tasks`); write report.md/.html."""
    from tqdm import tqdm

    from .deploy.export import describe_parity
    from .engine import fit
    from .tasks import build_task, load_run
    names = tasks or list(DEMOS)
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise UserError(f"unknown demo task {unknown[0]!r}; expected one of {', '.join(DEMOS)}")
    names = [n for n in DEMOS if n in names]  # a section that starts from another's backbone runs after it
    out.mkdir(parents=True, exist_ok=True)
    lines, latency, results, t_all = ["# mobilezoo demo", ""], [], {}, time.time()
    for name in tqdm(names, desc="demo", unit="task"):
        demo, run_dir = DEMOS[name], out / name
        overrides = [f"out={json.dumps(str(run_dir))}", *demo.overrides, *(demo.quick if quick else ()),
                     *_backbone_override(name, demo, out)]
        recipe = load_recipe(demo.recipe, overrides)
        t0 = time.time()
        metrics = fit(recipe, build_task(recipe), overwrite=True)  # a demo run replaces the last one
        seconds = time.time() - t0
        recipe, task, model = load_run(run_dir)
        rows, export = _deploy(name, recipe, task, model, (1, *task.input_shape()), run_dir, runs=3 if quick else 20)
        latency += rows
        int8 = export["int8"]
        results[name] = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         "train_seconds": round(seconds, 1), "latency_ms": {r["runtime"]: r["ms"] for r in rows},
                         "onnx_parity": export["parity"], "int8": int8}
        lines += [f"## {demo.title}", "",
                  f"**{task.summary(metrics)}** after {recipe.train.epochs} epochs, trained in {seconds:.0f} s "
                  f"on this machine (recipe `{demo.recipe}` with {', '.join(demo.overrides)}).", "",
                  *_embed_run_report(name, run_dir),
                  "| runtime | batch-1 latency (ms) |", "|---|---|",
                  *[f"| {r['runtime']} | {r['ms']:.1f} |" for r in rows], "",
                  f"ONNX export `{name}/model.onnx`: {describe_parity(export['parity'])}. "
                  f"INT8 (`{name}/model.int8.onnx`, static QDQ calibrated on "
                  f"training samples), on the whole val split with ONNX Runtime: {int8['metric']} "
                  f"{int8['rows']['fp32']['metric']:.4f} (fp32) -> {int8['rows']['int8']['metric']:.4f} (INT8), "
                  f"change {int8['change']['int8']:+.4f}; batch-1 {int8['speedup']['int8']:.2f}x the fp32 speed, "
                  f"{int8['rows']['int8']['size_mb'] / int8['rows']['fp32']['size_mb']:.2f}x the size.",
                  *_low_precision_sentence(int8, "OpenVINO", "NNCF, `model.openvino-int8.xml`"),
                  *_low_precision_sentence(int8, "LiteRT", "full-integer, `model.int8.tflite`"), ""]
        print(f"demo {name}: {task.summary(metrics)} ({seconds:.0f} s)")
    _latency_chart(latency, out / "latency.png")
    lines += ["## Latency", "", "![batch-1 latency per runtime](latency.png)", "",
              f"Whole demo: {time.time() - t_all:.0f} s.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    _write_html(text, out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"demo: report {out / 'report.md'} and {out / 'report.html'}")
    return results
