"""`make demo` / `mobilezoo demo`: every task on its embedded data, end to end, in one report.

Per task: train (a demo-sized recipe), evaluate, predict on val samples (the run's own report
figures: confusion matrix, detections, segmentation overlays, labelled clips), export to ONNX
with a parity check, quantize to INT8 and evaluate both ONNX files on the val split (and, with
the extras installed, OpenVINO's NNCF INT8 and LiteRT's full-integer INT8 files), and time
batch-1 inference with each runtime. The sections run in lanes side by side (`DemoTask.lane`: the
detector alone in one, the others in turn in the other), each a process on its share of the cores;
the timing comes last, with nothing else running. Writes `OUT/report.md`, `OUT/report.html`,
`OUT/latency.png` and one run directory per task.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .recipes import load_recipe


@dataclass(frozen=True)
class DemoTask:
    """One demo section: the packaged recipe, its demo-sized overrides and the lane it runs in."""

    title: str
    recipe: str
    overrides: tuple[str, ...]
    quick: tuple[str, ...]  # --quick: seconds, for tests
    lane: int = 1  # the sections of a lane run one after another; the lanes run side by side


DEMOS: dict[str, DemoTask] = {
    # 5 epochs (a sixth of the accuracy recipe), evaluated once: 99.44% in 34-37 s on one core.
    "classify": DemoTask("Image classification: tiny-MOAT-0 on digits", "classify_digits",
                         ("train.epochs=5", "train.eval_every=5"),
                         ("train.epochs=2", "data.limit_train=256", "data.limit_val=128", "train.bn_recalibrate=2")),
    # The detector has a lane (one core) to itself while the other sections run in the second one.
    # 10 epochs at 256 px, batch 4 (twice the steps of batch 8), no SSD crops, lr 0.01, evaluated once:
    # mAP 0.484, AP50 0.731 in 686-697 s on one core (the recipe: 12 epochs at 320 px, batch 8, 14 min on
    # 2 cores for mAP 0.570). docs/demo.md has the ladder.
    "detect": DemoTask("Object detection: SSDLite + MobileDet-CPU on shapes", "detect_shapes",
                       ("train.epochs=10", "data.img_size=256", "data.batch_size=4", "data.augment.ssd_crop=0",
                        "optim.lr=0.01", "train.eval_every=10"),
                       ("train.epochs=1", "data.limit_train=32", "data.limit_val=8", "data.img_size=128",
                        "train.bn_recalibrate=1"), lane=0),
    # DeepLabv3+ on a MobileDet-CPU backbone, from scratch: 3 epochs (mIoU 0.210 on one core; 4 gave 0.214).
    "segment": DemoTask("Semantic segmentation: DeepLabv3+ on MobileDet-CPU, shapes-seg", "segment_shapes",
                        ("model.args.backbone=mobiledet_cpu", "train.epochs=3", "train.eval_every=3"),
                        ("train.epochs=1", "data.limit_train=16", "data.limit_val=4", "data.augment.resize=128",
                         "data.img_size=96", "train.bn_recalibrate=1")),
    # 3 epochs: mean Dice 0.900 on the phantom in ~60 s on one core (4 gave 0.933 in ~40 s on 2 cores).
    "segment3d": DemoTask("3-D segmentation: reversible MBConv U-Net on the BraTS phantom", "segment_brats_phantom",
                          ("train.epochs=3",),
                          ("train.epochs=1", "data.limit_train=4", "data.limit_val=2")),
    # 25 of the accuracy recipe's 40 epochs: 99.38% in 113 s on one core (15 gave 88.75%).
    "video": DemoTask("Video recognition: SqueezeTime (mini) on motion clips", "video_motion",
                      ("train.epochs=25",),
                      ("train.epochs=1", "data.limit_train=16", "data.limit_val=8", "data.batch_size=8")),
}

CALIBRATION_SAMPLES = 32  # training samples each INT8 file is calibrated on (8 with --quick)
TIMED_ONLY = ("OpenVINO fp32", "OpenVINO bf16", "LiteRT fp32")  # compute what the fp32 ONNX file does (parity checked)


def _train_and_export(name: str, out: Path, quick: bool, threads: int, progress: bool) -> dict:
    """One section on `threads` threads: train, export to ONNX (parity checked), quantize to INT8 for each
    installed runtime and evaluate every INT8 file on the val split. Timing is left to `_latency`."""
    from .bench.onnx_compare import evaluate_files
    from .deploy.export import export_onnx
    from .deploy.quantize import quantize_int8, split_for_calibration
    from .engine import fit
    from .tasks import build_task, load_run
    demo, run_dir = DEMOS[name], out / name
    recipe = load_recipe(demo.recipe, [f"out={json.dumps(str(run_dir))}", *demo.overrides,
                                       *(demo.quick if quick else ())])
    print(f"demo {name}: training", flush=True)
    t0 = time.time()
    metrics = fit(recipe, build_task(recipe), overwrite=True, progress=progress)  # replaces the last demo run
    t1 = time.time()
    recipe, task, model = load_run(run_dir)
    model = model.eval().float()
    onnx_path, int8_path = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    # Detectors: the raw heads (decoded by the detector's own fp32 postprocess), which INT8 needs.
    summary = export_onnx(model, task.example_inputs(1), onnx_path, task, mode=task.int8_mode)
    calib = task.example_inputs(8 if quick else CALIBRATION_SAMPLES)
    quantize_int8(onnx_path, int8_path, split_for_calibration(calib))
    files = {"fp32": onnx_path, "int8": int8_path, **_openvino_files(task, onnx_path, calib),
             **_litert_files(task, model, run_dir / "model.tflite", calib, threads)}
    evaluated = evaluate_files(recipe, task, {k: _open(k, p, threads) for k, p in files.items()},
                               timed_only=TIMED_ONLY)
    print(f"demo {name}: {task.summary(metrics)} ({t1 - t0:.0f} s of training)", flush=True)
    return {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "summary": task.summary(metrics), "epochs": recipe.train.epochs, "trained": (t0, t1),
            "files": {k: str(p) for k, p in files.items()}, "parity": summary.get("parity"), "evaluated": evaluated}


def _run_lane(names: list[str], out: Path, quick: bool, threads: int, progress: bool = True) -> dict[str, dict]:
    """A lane's sections, one after another, in this process (training on `threads` threads unless
    a recipe says otherwise; `progress`: a per-step progress bar)."""
    torch.set_num_threads(threads)
    return {name: _train_and_export(name, out, quick, threads, progress) for name in names}


def _run_lanes(lanes: list[list[str]], out: Path, quick: bool, threads: int) -> dict[str, dict]:
    """Every lane at once, each in a process of its own on `threads` threads (training a small model
    scales poorly past one core: two lanes on two cores finish far sooner than one after the other);
    a single lane runs in this process. The first error stops every lane."""
    if len(lanes) == 1:
        return _run_lane(lanes[0], out, quick, threads)
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(lanes), initializer=_line_buffered) as pool:
        # No progress bars: two would overwrite each other; the epoch lines stay.
        pending = [pool.apply_async(_run_lane, (names, out, quick, threads, False)) for names in lanes]
        done: dict[str, dict] = {}
        while pending:
            for job in [j for j in pending if j.ready()]:
                done.update(job.get())  # re-raises a lane's error here; leaving the block stops the others
                pending.remove(job)
            time.sleep(0.5)
    return done


def _line_buffered() -> None:
    """A lane's process prints each line as it comes, also into a pipe or a file."""
    sys.stdout.reconfigure(line_buffering=True)


def _open(label: str, path, threads: int | None = None):
    """An exported file opened with the runtime its label names (ONNX Runtime for "fp32" / "int8")."""
    if label.startswith("OpenVINO"):
        from .deploy.openvino import OpenVinoModel
        return OpenVinoModel(path, label.split()[1], threads=threads)
    if label.startswith("LiteRT"):
        from .deploy.litert import LiteRTModel
        return LiteRTModel(path, threads=threads)
    from .deploy.ort import OrtModel
    return OrtModel(path, threads=threads)


def _latency(name: str, task, model: torch.nn.Module, section: dict, runs: int) -> tuple[list[dict], dict]:
    """Batch-1 latency of PyTorch (eager, fused, bf16) and of every exported file, timed one after another
    with nothing else running; returns (rows, the INT8 comparison: metric change and speed-up per file)."""
    from .bench.onnx_compare import summarise
    from .bench.timing import batch1_latency_ms
    from .layers.fuse import fuse_for_inference
    model = model.eval().float()
    x = torch.randn(1, *task.input_shape())
    rows = [{"task": name, "runtime": "PyTorch fp32 eager", "ms": batch1_latency_ms(model, x, runs)}]
    fused = fuse_for_inference(model)
    rows.append({"task": name, "runtime": "PyTorch fp32 fused", "ms": batch1_latency_ms(fused, x, runs)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append({"task": name, "runtime": "PyTorch bf16 fused", "ms": batch1_latency_ms(fused, x, runs)})
    sample, compared = task.example_inputs(1), {}
    for label, path in section["files"].items():
        ms = round(batch1_latency_ms(_open(label, path), sample, runs), 2)
        compared[label] = {**section["evaluated"][label], "latency_ms": ms}
        runtime = label if label.startswith(("OpenVINO", "LiteRT")) else f"ONNX Runtime {label}"
        rows.append({"task": name, "runtime": runtime, "ms": ms,
                     f"val_{task.headline}": section["evaluated"][label]["metric"]})
    return rows, summarise(task.headline, compared)


def _openvino_files(task, onnx_path: Path, calib: torch.Tensor) -> dict:
    """OpenVINO fp32 / bf16 on the export and NNCF INT8 beside it, when the openvino extra is installed."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return {}
    from .deploy.openvino import int8_path, quantize_openvino_int8
    from .deploy.quantize import split_for_calibration
    q = quantize_openvino_int8(onnx_path, int8_path(onnx_path), split_for_calibration(calib),
                               task.openvino_int8_options())
    return {"OpenVINO fp32": onnx_path, "OpenVINO bf16": onnx_path, "OpenVINO int8": q}


def _litert_files(task, model: torch.nn.Module, path: Path, calib: torch.Tensor, threads: int) -> dict:
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
    litert.export_tflite(model, task.example_inputs(1), path, task, threads=threads)
    q = litert.quantize_tflite_int8(path, litert.int8_path(path), split_for_calibration(calib))
    return {"LiteRT fp32": path, "LiteRT int8": q}


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


def run_demo(out: Path, quick: bool = False, tasks: list[str] | None = None) -> dict:
    """Train, evaluate, predict, export and time every task (or `tasks`); write report.md/.html."""
    from .deploy.export import describe_parity
    from .tasks import load_run
    names = tasks or list(DEMOS)
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise UserError(f"unknown demo task {unknown[0]!r}; expected one of {', '.join(DEMOS)}")
    names = [n for n in DEMOS if n in names]  # the report follows DEMOS
    lanes = [[n for n in names if DEMOS[n].lane == lane] for lane in sorted({DEMOS[n].lane for n in names})]
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    print(f"demo: {' | '.join(', '.join(lane) for lane in lanes)}"
          + (f" ({len(lanes)} lanes side by side)" if len(lanes) > 1 else ""), flush=True)
    threads = max(1, torch.get_num_threads() // len(lanes))  # the cores shared out between the lanes
    sections = _run_lanes(lanes, out, quick, threads)
    lines, latency, results = ["# mobilezoo demo", ""], [], {}
    if len(lanes) > 1:
        lines += [f"The sections trained in {len(lanes)} lanes side by side, each a process on "
                  f"{threads} of this machine's threads: "
                  f"{'; '.join(', '.join(lane) for lane in lanes)}. Latencies were timed at the end, "
                  "one runtime after another, with nothing else running.", ""]
    for name in names:
        demo, run_dir, section = DEMOS[name], out / name, sections[name]
        recipe, task, model = load_run(run_dir)
        rows, int8 = _latency(name, task, model, section, runs=3 if quick else 20)
        latency += rows
        t0, t1 = section["trained"]
        seconds = t1 - t0
        results[name] = {"metrics": section["metrics"], "train_seconds": round(seconds, 1),
                         "lane": demo.lane, "trained_from_to_s": [round(t0 - t_all, 1), round(t1 - t_all, 1)],
                         "latency_ms": {r["runtime"]: r["ms"] for r in rows}, "onnx_parity": section["parity"],
                         "int8": int8}
        lines += [f"## {demo.title}", "",
                  f"**{section['summary']}** after {section['epochs']} epochs, trained in "
                  f"{seconds:.0f} s on this machine "
                  f"(recipe `{demo.recipe}` with {', '.join(demo.overrides)}).", "",
                  *_embed_run_report(name, run_dir),
                  "| runtime | batch-1 latency (ms) |", "|---|---|",
                  *[f"| {r['runtime']} | {r['ms']:.1f} |" for r in rows], "",
                  f"ONNX export `{name}/model.onnx`: {describe_parity(section['parity'])}. "
                  f"INT8 (`{name}/model.int8.onnx`, static QDQ calibrated on "
                  f"training samples), on the whole val split with ONNX Runtime: {int8['metric']} "
                  f"{int8['rows']['fp32']['metric']:.4f} (fp32) -> {int8['rows']['int8']['metric']:.4f} (INT8), "
                  f"change {int8['change']['int8']:+.4f}; batch-1 {int8['speedup']['int8']:.2f}x the fp32 speed, "
                  f"{int8['rows']['int8']['size_mb'] / int8['rows']['fp32']['size_mb']:.2f}x the size.",
                  *_low_precision_sentence(int8, "OpenVINO", "NNCF, `model.openvino-int8.xml`"),
                  *_low_precision_sentence(int8, "LiteRT", "full-integer, `model.int8.tflite`"), ""]
    _latency_chart(latency, out / "latency.png")
    lines += ["## Latency", "", "![batch-1 latency per runtime](latency.png)", "",
              f"Whole demo: {time.time() - t_all:.0f} s.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    _write_html(text, out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"demo: report {out / 'report.md'} and {out / 'report.html'}")
    return results
