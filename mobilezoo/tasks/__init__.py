"""Tasks: each owns its datasets, head/loss, metrics and prediction; the engine runs them all."""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..engine.checkpoint import EMA_WEIGHTS, WEIGHTS
from ..errors import RecipeError, UserError
from ..models.weights import load_weights
from ..recipes import Recipe, load_recipe
from .base import Task

# name -> (module, class): each task's module (and what it imports, e.g. MONAI for segment3d) loads
# when the task is first used, not with every command.
_TASK_CLASSES = {"classify": ("classification", "ClassificationTask"), "detect": ("detection", "DetectionTask"),
                 "segment3d": ("segmentation3d", "Segmentation3DTask"), "video": ("video", "VideoTask"),
                 "segment": ("segmentation", "SegmentationTask")}


class _Tasks(Mapping):
    """The task classes by name, each imported on first access."""

    def __getitem__(self, name: str) -> type[Task]:
        module, cls = _TASK_CLASSES[name]
        return getattr(importlib.import_module(f".{module}", __name__), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_TASK_CLASSES)

    def __len__(self) -> int:
        return len(_TASK_CLASSES)


TASKS: Mapping[str, type[Task]] = _Tasks()


def task_of(model_name: str) -> type[Task]:
    """The task class a registered model belongs to; a bare backbone (feature maps out) gets the
    base Task's image defaults."""
    from ..models import get_entry
    return TASKS.get(get_entry(model_name).task, Task)


def load_run(run_dir: str | Path, overrides: list[str] | None = None):
    """(recipe, task, model) of a run directory, with its best weights loaded (EMA if any)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    recipe = load_recipe(str(run_dir / "config.yaml"), overrides)
    task = build_task(recipe)
    model = task.build_model()
    weights = run_dir / EMA_WEIGHTS if (run_dir / EMA_WEIGHTS).is_file() else run_dir / WEIGHTS
    load_weights(model, weights)
    return recipe, task, model.eval()


def build_task(recipe: Recipe) -> Task:
    """The task object the recipe names."""
    if recipe.task not in TASKS:
        raise RecipeError(f"unknown task {recipe.task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[recipe.task](recipe)


__all__ = ["Task", "TASKS", "build_task", "load_run", "task_of"]
