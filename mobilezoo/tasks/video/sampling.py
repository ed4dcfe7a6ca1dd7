"""Which frames a clip takes: mmaction2's SampleFrames, written out.

A clip is `clip_len` frames, `interval` apart. Training takes `num_clips` clips at random offsets
(one per equal segment of the video); testing takes `num_clips` clips spread evenly from the first
possible offset to the last, or the centred clip when there is one. Frame numbers past the end of a
short video follow `out_of_bound`: "loop" (mmaction2's default) wraps them around to the start,
"repeat_last" repeats the clip's last real frame, "error" rejects the video."""
from __future__ import annotations

import numpy as np
import torch

OUT_OF_BOUND = ("loop", "repeat_last", "error")


def train_offsets(total: int, clip_len: int, interval: int, num_clips: int = 1,
                  generator: torch.Generator | None = None) -> np.ndarray:
    """First frame of each training clip (mmaction2 `_get_train_clips`, keep_tail_frames=False)."""
    span = clip_len * interval
    avg = (total - span + 1) // num_clips
    if avg > 0:
        jitter = torch.randint(avg, (num_clips,), generator=generator).numpy()
        return np.arange(num_clips) * avg + jitter
    if total > max(num_clips, span):
        return np.sort(torch.randint(total - span + 1, (num_clips,), generator=generator).numpy())
    if avg == 0:
        ratio = (total - span + 1.0) / num_clips
        return np.around(np.arange(num_clips) * ratio).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def eval_offsets(total: int, clip_len: int, interval: int, num_clips: int = 1) -> np.ndarray:
    """First frame of each test clip (mmaction2 `_get_test_clips`): evenly spread, or centred."""
    span = (clip_len - 1) * interval + 1
    max_offset = max(total - span, 0)
    if num_clips > 1:
        # numpy's round (half to even), as mmaction2 does
        return np.round(np.arange(num_clips) * (max_offset / (num_clips - 1))).astype(np.int64)
    return np.array([max_offset // 2])


def clip_indices(offsets: np.ndarray, total: int, clip_len: int, interval: int,
                 out_of_bound: str = "loop") -> np.ndarray:
    """(num_clips, clip_len) frame numbers of the clips starting at `offsets`, kept inside the video."""
    inds = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(clip_len)[None] * interval
    if out_of_bound == "loop":
        return np.mod(inds, total)
    if out_of_bound == "repeat_last":
        safe = inds < total
        last = np.max(np.where(safe, inds, 0), axis=1, keepdims=True)
        return np.where(safe, inds, last)
    if out_of_bound == "error":
        if (inds >= total).any():
            need = (clip_len - 1) * interval + 1
            raise ValueError(f"has {total} frames; a clip of {clip_len} frames {interval} apart needs "
                             f"at least {need} (data.augment.out_of_bound is 'error')")
        return inds
    raise ValueError(f"out_of_bound must be one of {', '.join(OUT_OF_BOUND)}, got {out_of_bound!r}")


def single_frame(inds: np.ndarray) -> np.ndarray:
    """Every frame of each clip replaced by the clip's middle frame (a no-motion control)."""
    mid = inds[:, inds.shape[1] // 2][:, None]
    return np.repeat(mid, inds.shape[1], axis=1)
