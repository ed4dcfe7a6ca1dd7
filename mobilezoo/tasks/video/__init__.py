"""Video recognition (SqueezeTime): PyAV decoding, mmaction2-style clip sampling, whole-clip transforms."""
from .dataset import VideoClips, folder_samples, list_samples
from .decode import VIDEO_EXTENSIONS, expand_videos, read_clip
from .task import DEFAULT_OPTIONS, VideoMetric, VideoTask

__all__ = ["VideoTask", "VideoClips", "VideoMetric", "DEFAULT_OPTIONS", "VIDEO_EXTENSIONS", "read_clip",
           "expand_videos", "folder_samples", "list_samples"]
