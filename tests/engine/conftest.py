import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """A 3-class ImageFolder (train 12 / val 6 per class) of 16x16 images the model can learn."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[:, :, c] += 150  # the class is the dominant colour channel
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_overrides():
    """Builds recipe overrides for a seconds-long tiny-MOAT-0 run at 32 px."""
    return _tiny_overrides


def _tiny_overrides(data, out, epochs=4, batch=8, **extra):
    """Recipe overrides for a seconds-long tiny-MOAT-0 run at 32 px."""
    o = {"data.name": str(data), "data.img_size": 32, "data.batch_size": batch,
         "data.eval_batch_size": 6, "train.epochs": epochs, "train.threads": 1,
         "train.bn_recalibrate": 1, "optim.warmup_epochs": 1, "out": str(out),
         "data.augment": {"scale": [0.6, 1.0], "hflip": True, "crop_pct": 1.0}}
    o.update(extra)
    return o
