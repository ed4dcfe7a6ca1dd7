"""Accuracy and speed of exported ONNX files side by side, on the run's own val split.

`compare_onnx(recipe, task, {"fp32": a.onnx, "int8": b.onnx})` evaluates every file with ONNX
Runtime on the whole val split (the task's metric, as `mobilezoo eval --runtime onnxruntime`
does) and times batch-1 inference on a real sample; the first file is the baseline of the
headline-metric change and the speed-up."""
from __future__ import annotations

from pathlib import Path

import torch

from ..deploy.ort import OrtModel
from ..engine import Context, evaluate
from ..engine.loop import eval_loader
from .timing import batch1_latency_ms


def compare_onnx(recipe, task, files: dict, threads: int | None = None, runs: int = 20,
                 timed_only: tuple[str, ...] = ()) -> dict:
    """{"metric", "rows": {label: {"metric", "latency_ms", "size_mb"}}, "change", "speedup"} with the
    change and speed-up of each file relative to the first. A value is an ONNX file (run by ONNX
    Runtime) or a model already opened on an exported file (e.g. an OpenVinoModel). Labels in
    `timed_only` are timed but not evaluated (a runtime whose accuracy another row already shows)."""
    models = {label: path if hasattr(path, "session") else OrtModel(path, threads=threads)
              for label, path in files.items()}
    rows = evaluate_files(recipe, task, models, timed_only=timed_only)
    x = task.example_inputs(1)
    for label, model in models.items():
        rows[label]["latency_ms"] = round(batch1_latency_ms(model, x, runs), 2)
    return summarise(task.headline, rows)


def evaluate_files(recipe, task, models: dict, timed_only: tuple[str, ...] = ()) -> dict:
    """{label: {"metric", "size_mb", "count"}}: the headline metric of each model opened on an exported
    file, on the whole val split (None for labels in `timed_only`), without timing."""
    ctx = Context(torch.device("cpu"), "fp32", channels_last=False)
    rows = {}
    for label, model in models.items():
        metrics = ({} if label in timed_only else
                   evaluate(model, eval_loader(task, task.val_dataset(), recipe, ctx), task, ctx))
        rows[label] = {"metric": float(metrics[task.headline]) if metrics else None,
                       "size_mb": round(_file_size(model.path) / 1e6, 2), "count": metrics.get("count")}
    return rows


def summarise(metric: str, rows: dict) -> dict:
    """`compare_onnx`'s result from rows holding "metric" and "latency_ms": the change and speed-up of
    each row against the first."""
    base = next(iter(rows.values()))
    return {"metric": metric, "rows": rows,
            "change": {k: round(r["metric"] - base["metric"], 5) for k, r in rows.items() if r["metric"] is not None},
            "speedup": {k: round(base["latency_ms"] / r["latency_ms"], 3) for k, r in rows.items()}}


def _file_size(path: Path) -> int:
    """Bytes of a model file, with an OpenVINO IR's weights (.bin beside its .xml)."""
    weights = Path(path).with_suffix(".bin")
    return Path(path).stat().st_size + (weights.stat().st_size if weights.is_file() else 0)


def format_comparison(result: dict) -> str:
    """One line per file: metric (change), batch-1 latency (speed-up), size."""
    first = next(iter(result["rows"]))
    lines = []
    for label, r in result["rows"].items():
        change = "" if label == first else (f" ({result['change'][label]:+.4f} vs {first}; "
                                            if label in result["change"] else " (") + \
            ("" if label == first else f"{result['speedup'][label]:.2f}x faster)")
        metric = "not evaluated" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(f"{label}: val {result['metric']} {metric}, batch-1 {r['latency_ms']:.1f} ms, "
                     f"{r['size_mb']:.1f} MB{change}")
    return "\n".join(lines)
