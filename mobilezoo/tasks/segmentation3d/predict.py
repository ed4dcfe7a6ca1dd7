"""Sliding-window inference, label maps written on the input's voxel grid, and slice overlays."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.inferers import sliding_window_inference
from torch import nn

from .brats import LABELS, REGIONS, Case, labels_to_regions, load_case, regions_to_labels
from .metric import case_scores
from .transforms import preprocess

# BraTS colours: necrosis red, oedema green, enhancing yellow
LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 4: (1.0, 0.9, 0.1)}


def infer(model: nn.Module, x: torch.Tensor, roi: tuple[int, int, int], opts: dict) -> torch.Tensor:
    """Region logits (N, 3, D, H, W) of a volume of any size: overlapping windows of `roi`, blended
    with Gaussian weights (MONAI); windows that stick out are zero-padded and cropped back."""
    return sliding_window_inference(x, roi, opts["sw_batch_size"], model, overlap=opts["sw_overlap"],
                                    mode="gaussian").float()


def predict_regions(model: nn.Module, image, roi, opts: dict, device="cpu") -> torch.Tensor:
    """Bool regions (3, X, Y, Z) on the voxel grid of `image`, a MetaTensor (4, X, Y, Z) with its
    affine as loaded: it is preprocessed (RAS, brain crop, z-score), segmented, and the crop and
    orientation are undone with MONAI's inverse transforms."""
    pre = preprocess(with_label=False)
    x = pre({"image": image})["image"]
    logits = infer(model, x.as_tensor()[None].to(device), roi, opts)[0].cpu()
    pred = MetaTensor((logits > 0).float(), meta=copy.deepcopy(x.meta))  # the meta holds x's affine
    pred.applied_operations = copy.deepcopy(x.applied_operations)
    back = pre.inverse({"image": pred})["image"]
    return torch.as_tensor(back.as_tensor() > 0.5)


def write_labels(labels: np.ndarray, reference: Path, out: Path) -> None:
    """Write a uint8 label map with the header and affine of the `reference` NIfTI file."""
    import nibabel as nib
    ref = nib.load(str(reference))
    img = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header=ref.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    nib.save(img, str(out))


def overlay_png(background: np.ndarray, labels: list[np.ndarray], out: Path, titles: list[str] | None = None,
                title: str = "") -> None:
    """Axial, coronal and sagittal slices (RAS arrays) through the centre of the first label map's
    tumour, one row per label map drawn in colour over the same background (0 shown black)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = labels[0]
    centre = (np.argwhere(first > 0).mean(0) if first.any() else np.array(first.shape) / 2).astype(int)
    views = {"axial": (slice(None), slice(None), centre[2]), "coronal": (slice(None), centre[1], slice(None)),
             "sagittal": (centre[0], slice(None), slice(None))}
    lo, hi = np.percentile(background[background != 0], [1, 99]) if background.any() else (0, 1)
    fig, axes = plt.subplots(len(labels), 3, figsize=(10, 3.4 * len(labels) + 0.4), squeeze=False)
    for row, lab_map in enumerate(labels):
        for ax, (name, idx) in zip(axes[row], views.items()):
            grey = np.where(background[idx] != 0, np.clip((background[idx] - lo) / max(hi - lo, 1e-6), 0, 1), 0)
            rgb = np.repeat(grey[..., None], 3, -1)
            lab = lab_map[idx]
            for value, colour in LABEL_COLOURS.items():
                rgb[lab == value] = 0.45 * rgb[lab == value] + 0.55 * np.array(colour)
            ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower")  # first array axis horizontal
            ax.set_title(f"{titles[row]}: {name}" if titles else name)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An array on a voxel grid with `affine`, reoriented to RAS axes (nibabel) for display."""
    import nibabel as nib
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


@torch.no_grad()
def predict_case(model: nn.Module, case: Case, out_dir: Path, roi, opts: dict, device="cpu") -> dict:
    """Segment one case: write out_dir/<case>_seg.nii.gz (BraTS labels, the input's grid and header)
    and out_dir/<case>_overlay.png; return {case, file, overlay, voxels per label (+ dice/hd95 if
    the case has a seg)}."""
    data = load_case(case, with_seg=case.seg is not None)
    regions = predict_regions(model, data["image"], roi, opts, device)
    labels = regions_to_labels(regions, case.et_label)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_file, png = out_dir / f"{case.name}_seg.nii.gz", out_dir / f"{case.name}_overlay.png"
    write_labels(labels, case.images[0], seg_file)
    affine = data["image"].affine.numpy()
    shown = regions_to_labels(regions, 4)  # the colours are keyed by BraTS 2020 labels
    overlay_png(canonical(data["image"][0].numpy(), affine), [canonical(shown, affine)], png,
                title=f"{case.name}: necrosis red, oedema green, enhancing yellow")
    et = case.et_label
    out = {"case": case.name, "file": str(seg_file), "overlay": str(png),
           "voxels": {str(v if v != 4 else et): int((labels == (v if v != 4 else et)).sum()) for v in LABELS}}
    if "label" in data:  # a labelled case: score the prediction too
        target = labels_to_regions(data["label"].as_tensor())
        dice, hd95 = case_scores(regions, target, affine_to_spacing(torch.as_tensor(affine), r=3).tolist())
        out["dice"] = {k: round(d, 4) for k, d in zip(REGIONS, dice)}
        out["hd95"] = {k: round(h, 2) for k, h in zip(REGIONS, hd95)}
    return out
