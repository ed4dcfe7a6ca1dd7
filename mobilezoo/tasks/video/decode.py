"""Video files read with PyAV: only the frames a clip needs, in presentation order, as uint8 RGB."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import BadSampleError
from ..base import expand_files

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
SEEK_MIN_FRAMES = 64  # seek only when this many frames would otherwise be decoded just to be dropped


def expand_videos(paths: list[str]) -> list[Path]:
    """Video files named directly or found (recursively, sorted) under named folders."""
    return expand_files(paths, VIDEO_EXTENSIONS, "video")


def decode_indices(container, stream, need: list[int]) -> tuple[dict, int]:
    """Decode the sorted frame numbers `need`; returns ({index: av.VideoFrame}, frames decoded).

    Decoding stops after the last needed frame. When the first needed frame is far from the start,
    the container seeks to the key frame before it and frame numbers come from timestamps (relative
    to the first frame's); if those do not line up (variable frame rate, odd timestamps) it decodes
    from the start instead."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if need and need[0] >= SEEK_MIN_FRAMES and fps and stream.time_base:
        first = next(container.decode(stream), None)
        if first is not None and first.pts is not None:
            got = _decode_after_seek(container, stream, need, fps, first.pts)
            if got is not None:
                return got
        container.seek(0, stream=stream, backward=True, any_frame=False)
    wanted, frames, n = set(need), {}, 0
    last = need[-1] if need else -1
    for n, frame in enumerate(container.decode(stream), 1):
        i = n - 1
        if i in wanted:
            frames[i] = frame
        if i >= last:
            break
    return frames, n


def timestamp_index(frame, time_base, fps: float, first_pts: int) -> int | None:
    """The frame number a decoded frame's timestamp stands for at a constant frame rate, or None."""
    if frame.pts is None:
        return None
    return int(round(float((frame.pts - first_pts) * time_base) * fps))


def _decode_after_seek(container, stream, need: list[int], fps: float, first_pts: int) -> tuple[dict, int] | None:
    container.seek(first_pts + int(need[0] / fps / stream.time_base), stream=stream, backward=True,
                   any_frame=False)
    wanted, frames, n, prev = set(need), {}, 0, None
    for frame in container.decode(stream):
        n += 1
        i = timestamp_index(frame, stream.time_base, fps, first_pts)
        # the first frame after the seek must not be past what we need, and numbers must step by one
        if i is None or (prev is None and i > need[0]) or (prev is not None and i != prev + 1):
            return None
        prev = i
        if i in wanted:
            frames[i] = frame
        if i >= need[-1]:
            break
    return frames, n


def read_clip(path: str | Path, choose: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Open a video, let `choose(total_frames)` pick frame numbers (any shape), decode just those.

    Returns (frames uint8 (*indices.shape, H, W, 3), indices). Anything unreadable (missing,
    truncated, not a video, fewer frames than the header announces) is a BadSampleError naming
    the file; `choose` may raise ValueError for a video too short for it, reported the same way."""
    import av
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadSampleError(f"{path}: cannot open video ({_first_line(e)})") from None
    with container:
        if not container.streams.video:
            raise BadSampleError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1  # DataLoader workers decode videos in parallel; more threads oversubscribe
        try:
            total = int(stream.frames or 0)
            if total <= 0:  # the container does not say (webm, some mkv): decode it all once
                frames = dict(enumerate(container.decode(stream)))
                total = len(frames)
                if total == 0:
                    raise BadSampleError(f"{path}: no decodable frames")
                indices = np.asarray(_choose(path, choose, total))
            else:
                indices = np.asarray(_choose(path, choose, total))
                need = sorted(set(indices.ravel().tolist()))
                frames, decoded = decode_indices(container, stream, need)
                missing = [i for i in need if i not in frames]
                if missing:
                    raise BadSampleError(f"{path}: truncated or corrupt, decoded {decoded} of the {total} "
                                         f"frames the header announces (frame {missing[0]} is missing)")
            rgb = _reformatter()
            pictures = {i: rgb.reformat(frames[i], format="rgb24").to_ndarray()
                        for i in set(indices.ravel().tolist())}
        except av.FFmpegError as e:
            raise BadSampleError(f"{path}: cannot decode video ({_first_line(e)})") from None
    out = np.stack([pictures[i] for i in indices.ravel().tolist()])
    return out.reshape(*indices.shape, *out.shape[1:]), indices


_REFORMATTERS: dict[int, object] = {}


def _reformatter():
    # One per process: it keeps its swscale context between frames of the same size and format, which
    # `frame.to_ndarray(format=...)` (a new context for every frame) does not, about 10x faster. A
    # process never uses nor frees one inherited through fork (a DataLoader worker): swscale's slice
    # threads do not survive fork, and using or freeing that context hangs. It stays referenced here.
    pid = os.getpid()
    if pid not in _REFORMATTERS:
        from av.video.reformatter import VideoReformatter
        _REFORMATTERS[pid] = VideoReformatter()
    return _REFORMATTERS[pid]


def _choose(path: Path, choose, total: int):
    try:
        return choose(total)
    except ValueError as e:
        raise BadSampleError(f"{path}: {e}") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
