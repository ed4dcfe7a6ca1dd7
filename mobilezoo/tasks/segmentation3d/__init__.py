"""3-D brain-tumour segmentation on BraTS-format NIfTI cases (regions WT, TC, ET), with MONAI."""
from .brats import MODALITIES, REGIONS, Case, find_case, find_cases, labels_to_regions, load_case, regions_to_labels
from .dataset import BratsDataset, collate_volumes
from .metric import HD95_MAX, BratsMetric, case_scores
from .task import Segmentation3DTask

__all__ = ["Segmentation3DTask", "BratsDataset", "BratsMetric", "Case", "HD95_MAX", "MODALITIES", "REGIONS",
           "case_scores", "collate_volumes", "find_case", "find_cases", "labels_to_regions", "load_case",
           "regions_to_labels"]
