"""`make demo` / `mobilezoo demo`: train, evaluate and predict on the embedded data, with a report."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .recipes import load_recipe


def run_demo(out: Path, quick: bool = False) -> dict:
    """tiny-MOAT-0 on digits: train (resumable), evaluate, predict a few val images, write report.md."""
    from .engine import fit, load_run
    from .tasks import build_task

    # 15 epochs (half the accuracy recipe) keeps the demo to a few minutes on 2 cores.
    overrides = [f"out={json.dumps(str(out / 'classify'))}", "train.epochs=15"]
    if quick:
        overrides += ["train.epochs=2", "data.limit_train=256", "data.limit_val=128",
                      "train.bn_recalibrate=2"]
    recipe = load_recipe("classify_digits", overrides)
    t0 = time.time()
    metrics = fit(recipe, build_task(recipe))
    train_s = time.time() - t0
    _, task, model = load_run(out / "classify")
    root = task.root / "val"
    samples = [sorted((root / c).glob("*.png"))[0] for c in recipe.data.class_names]
    preds = task.predict(model, [str(s) for s in samples], topk=3)
    (out / "classify" / "predictions.json").write_text(json.dumps(preds, indent=2) + "\n")
    correct = sum(p["topk"][0]["label"] == Path(p["file"]).parent.name for p in preds)
    lines = ["# mobilezoo demo", "",
             f"## Image classification: tiny-MOAT-0 on digits ({train_s:.0f} s on this machine)", "",
             f"val top-1 **{100 * metrics['top1']:.2f}%**, top-5 {100 * metrics['top5']:.2f}% "
             f"on {metrics['count']} held-out images; {correct}/{len(preds)} sample predictions "
             "correct.", "",
             "![training curves](classify/curves.png) ![confusion matrix](classify/confusion.png)", "",
             "| image | top-1 | probability |", "|---|---|---|",
             *[f"| {Path(p['file']).parent.name}/{Path(p['file']).name} | {p['topk'][0]['label']} "
               f"| {100 * p['topk'][0]['prob']:.1f}% |" for p in preds], "",
             "Full run: [classify/report.md](classify/report.md).", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"demo: val top-1 {100 * metrics['top1']:.2f}% in {train_s:.0f} s; report {out / 'report.md'}")
    return metrics
