"""report.md for a run: the recipe, the training curves and whatever figures the task adds."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_png(history: list[dict], path: Path) -> None:
    """Training loss and every scalar val_* metric in [0, 1] against epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if any("val_loss" in h for h in history):
        ev = [h for h in history if "val_loss" in h]
        a.plot([h["epoch"] for h in ev], [h["val_loss"] for h in ev], label="val loss")
    a.set_xlabel("epoch"), a.set_title("loss"), a.legend()
    keys = sorted({k for h in history for k, v in h.items()
                   if k.startswith("val_") and k != "val_loss" and isinstance(v, float) and 0 <= v <= 1})
    for k in keys:
        ev = [h for h in history if k in h]
        b.plot([h["epoch"] for h in ev], [h[k] for h in ev], marker=".", label=k[4:])
    b.set_xlabel("epoch"), b.set_title("validation"), b.set_ylim(0, 1.01), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gallery_png(items: list, names: list[str], path: Path, per_row: int = 8) -> None:
    """Images (C x H x W, any value range) titled "predicted / true", wrong ones in red."""
    rows = -(-len(items) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(1.3 * per_row, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, pred, true) in zip(axes.flat, items):
        lo, hi = image.min(), image.max()
        ax.imshow(((image - lo) / (hi - lo + 1e-8)).permute(1, 2, 0).numpy())
        ax.set_title(f"{names[pred]} / {names[true]}", fontsize=8, color="black" if pred == true else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_png(confusion: list[list[int]], names: list[str], path: Path) -> None:
    """Confusion matrix (rows: true class, columns: predicted) with counts."""
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.45 * k))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90 if k > 12 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    if k <= 30:
        top = max(max(r) for r in confusion) or 1
        for i in range(k):
            for j in range(k):
                if confusion[i][j]:
                    ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=7,
                            color="white" if confusion[i][j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, recipe, history: list[dict], task_lines: list[str]) -> Path:
    """Write run_dir/report.md with curves, the task's section and the resolved recipe."""
    curves_png(history, run_dir / "curves.png")
    last = history[-1] if history else {}
    lines = [f"# {recipe.task}: {recipe.model.name} on {recipe.data.name}", "",
             f"{len(history)} epochs, {last.get('step', 0)} steps, "
             f"{last.get('samples_per_s', 0):.1f} samples/s in the last epoch.", "",
             *task_lines, "", "## Training curves", "", "![training curves](curves.png)", "",
             "## Recipe", "", "See `config.yaml` for the fully resolved recipe.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
