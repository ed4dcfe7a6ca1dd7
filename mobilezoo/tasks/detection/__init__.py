"""Object detection on COCO-format data (image folders + instances JSON), scored with COCO mAP."""
from .coco import CocoAnnotations, CocoDetection
from .metric import CocoMetric
from .task import DetectionTask
from .transforms import DEFAULT_AUGMENT, collate_detection, eval_transform, train_transform

__all__ = ["DetectionTask", "CocoAnnotations", "CocoDetection", "CocoMetric", "DEFAULT_AUGMENT",
           "collate_detection", "eval_transform", "train_transform"]
