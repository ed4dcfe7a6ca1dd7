"""Shared fixture: tiny synthetic class-per-folder image sets (ROOT/train/<class>/*.png, ROOT/val/...)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size: int = 16,
                       splits=("train", "val"), seed: int = 0) -> Path:
    """Write `per_class` noisy PNGs per class and split, each class tinted by its own colour channel."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., ci % 3] += 150
                Image.fromarray(a).save(folder / f"{name}_{j}.png")
    return Path(root)


@pytest.fixture(scope="session")
def make_image_folder():
    """The `write_image_folder(root, classes=..., per_class=..., ...)` helper."""
    return write_image_folder


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module (timings and tiny models on a busy 2-core box), restored after."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process without the interpreter's teardown: after a full run, the native runtimes
    loaded in one process (LiteRT's converter with JAX, OpenVINO, ONNX Runtime) crash in their exit
    handlers (SIGSEGV after every test has passed), which would turn a green run into exit code 139."""
    if os.environ.get("MOBILEZOO_NO_FAST_EXIT"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(getattr(config, "_mobilezoo_exitstatus", 0))


def pytest_sessionfinish(session, exitstatus):
    """Keep pytest's exit status for `pytest_unconfigure`'s fast exit."""
    session.config._mobilezoo_exitstatus = int(exitstatus)
