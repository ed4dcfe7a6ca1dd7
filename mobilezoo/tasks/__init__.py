"""Tasks: each owns its datasets, head/loss, metrics and prediction; the engine runs them all."""
from __future__ import annotations

from ..errors import RecipeError
from ..recipes import Recipe
from .base import Task
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation3d import Segmentation3DTask
from .video import VideoTask

TASKS: dict[str, type[Task]] = {"classify": ClassificationTask, "detect": DetectionTask,
                                "segment3d": Segmentation3DTask, "video": VideoTask}


def build_task(recipe: Recipe) -> Task:
    """The task object the recipe names."""
    if recipe.task not in TASKS:
        raise RecipeError(f"unknown task {recipe.task!r}; expected one of {', '.join(TASKS)}")
    return TASKS[recipe.task](recipe)


__all__ = ["Task", "TASKS", "build_task"]
