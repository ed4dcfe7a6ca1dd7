"""Slow: revunet3d from scratch on the embedded brats-phantom reaches mean Dice WT >= 0.85,
TC >= 0.75 and ET >= 0.70 on its val cases, and the trained model predicts on the input grid."""
import json
import time

import nibabel as nib
import numpy as np
import pytest

from mobilezoo.data import brats_phantom
from mobilezoo.engine import fit
from mobilezoo.engine.checkpoint import WEIGHTS
from mobilezoo.models import load_weights
from mobilezoo.recipes import load_recipe
from mobilezoo.tasks.segmentation3d import Segmentation3DTask, find_case


@pytest.mark.slow
def test_revunet3d_brats_phantom_reaches_targets(tmp_path):
    pytest.importorskip("mobilezoo.models.revunet3d")  # importing registers the model
    t0 = time.time()
    root = brats_phantom.ensure(tmp_path / "brats-phantom")  # the full default set, not the user's cache
    recipe = load_recipe("segment_brats_phantom", {"data.name": str(root), "out": str(tmp_path / "run")})
    metrics = fit(recipe, Segmentation3DTask(recipe))
    print(f"\nbrats-phantom: Dice WT {metrics['dice_wt']:.3f} TC {metrics['dice_tc']:.3f} "
          f"ET {metrics['dice_et']:.3f}, HD95 {metrics['hd95_wt']:.1f}/{metrics['hd95_tc']:.1f}/"
          f"{metrics['hd95_et']:.1f} mm, {time.time() - t0:.0f} s")
    assert metrics["count"] == brats_phantom.NUM_VAL
    assert metrics["dice_wt"] >= 0.85, metrics
    assert metrics["dice_tc"] >= 0.75, metrics
    assert metrics["dice_et"] >= 0.70, metrics
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_dice"] == pytest.approx(metrics["dice"])

    # the saved run predicts a val case on its own (LPS) grid with the Dice the evaluation measured
    run = load_recipe(str(tmp_path / "run" / "config.yaml"))
    task = Segmentation3DTask(run)
    model = task.build_model()
    load_weights(model, tmp_path / "run" / WEIGHTS)
    case = find_case(root / "val" / "BraTS20_Training_301")
    out = task.predict(model, [str(case.folder)], out=tmp_path / "pred")[0]
    written, flair = nib.load(out["file"]), nib.load(str(case.images[0]))
    assert written.shape == flair.shape and np.allclose(written.affine, flair.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}
    evaluated = next(c for c in metrics["per_case"] if c["case"] == case.name)
    for region in ("WT", "TC", "ET"):
        assert out["dice"][region] == pytest.approx(evaluated[f"dice_{region.lower()}"], abs=1e-3)
