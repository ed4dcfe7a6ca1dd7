"""Semantic segmentation on image + class-mask folders (VOC / ADE20K / Cityscapes style), scored by mIoU."""
from .dataset import IGNORE, SegmentationFolder, read_classes, read_mask
from .metric import SegmentationMetric, confusion, scores
from .task import SegmentationTask
from .transforms import DEFAULT_OPTIONS, EvalTransform, check_options, collate_segmentation, train_transform

__all__ = ["SegmentationTask", "SegmentationFolder", "SegmentationMetric", "IGNORE", "DEFAULT_OPTIONS",
           "EvalTransform", "check_options", "collate_segmentation", "confusion", "read_classes", "read_mask",
           "scores", "train_transform"]
