"""GLM-4.1V video preprocessing in numpy + PIL (spec 6.2).

A video becomes frames sampled at 2 fps (at most 300 s), resized together by smart_resize over T x H x W, normalised
like images and cut into temporal groups of 2 frames; each group gets one timestamp (whole seconds) for the prompt.

Differences from transformers 4.57's ``Glm4vVideoProcessor`` (which needs torchvision):
* frames are resized with PIL bicubic on uint8 (as the slow image processor does), not torchvision's antialiased
  tensor bicubic; pixels differ by about one grey level, the frame indices, grids and prompt are identical;
* a clip shorter than half a second keeps one frame (5.x rule) where 4.57 samples none and fails.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .image_processing import (ImageProcessorConfig, pad_temporal, patchify, rescale_and_normalize, resize_frame,
                               smart_resize, to_rgb)
from .media import MediaOptions, UnreadableMediaError, array_to_image, decode_video, describe, load_image


@dataclass
class VideoProcessorConfig(ImageProcessorConfig):
    """Video settings (``video_preprocessor_config.json``); pixel limits apply to T*H*W of the whole clip.

    fps: frames sampled per second of video; max_duration: longer clips get fps*max_duration frames spread over
    their whole length; do_sample_frames=False keeps every given frame.
    """

    max_pixels: int = 28 * 28 * 2 * 30000
    fps: float = 2.0
    max_duration: float = 300.0
    do_sample_frames: bool = True
    # "glm4v": Glm4vVideoProcessor's rule (``fps`` frames per second, ``max_duration``); "glm46v":
    # Glm46VVideoProcessor's (a frame rate chosen by the clip's length, see sample_frame_indices_46v). Not a file
    # field: processor.read_processor_configs sets it from the folder's processor class.
    sampling: str = "glm4v"


@dataclass
class Video:
    """Decoded frames of one video.

    frames: HWC frames (PIL images or uint8 arrays), all the same size.
    fps: frame rate of the *source* video, used for sampling and timestamps.
    frame_indices: position of each frame in the source (None: 0, 1, 2, ...).
    total_num_frames: frames in the source (None: len(frames)).
    sampled: True when ``frames`` already is the sampled subset (as ``load_video`` returns it).
    """

    frames: Union[Sequence, np.ndarray]
    fps: float
    frame_indices: Optional[List[int]] = None
    total_num_frames: Optional[int] = None
    sampled: bool = False
    source: str = "video frames"

    @classmethod
    def from_frames(cls, frames, fps: float, source: str = "video frames") -> "Video":
        """All frames of a clip played at ``fps`` (a list of PIL images / HWC arrays, or a [T, H, W, C] array)."""
        if fps is None or not float(fps) > 0:
            raise UnreadableMediaError(source, f"frames need a positive fps, got {fps!r}",
                                       "pass the frame rate the frames were captured at")
        if len(frames) == 0:
            raise UnreadableMediaError(source, "no frames given")
        return cls(frames=frames, fps=float(fps), source=source)


def sample_frame_indices(total_num_frames: int, fps: float, *, target_fps: float = 2.0,
                         max_duration: float = 300.0, duration: Optional[float] = None) -> List[int]:
    """Indices of the frames GLM-4.1V looks at (transformers' ``Glm4vVideoProcessor.sample_frames``).

    Steps:
    1. duration = ``duration`` if given (non-zero), else round((total - 1) / fps) + 1.
    2. duration <= max_duration: n = floor(duration * target_fps) frames (at least 1, the 5.x rule) at
       min(last, ceil(i * fps / target_fps)) for i < n.
    3. Longer: n = int(max_duration * target_fps); all frames if n >= total, else n times spread evenly over
       [0, duration] (both ends included), each at min(last, ceil(t * fps)).
    4. Drop repeats keeping order; if the count is odd, repeat the last index (frames pair up in time).

    Worked examples:
    * 30 frames at 10 fps (3 s): n = 6, indices ceil(i * 5) = [0, 5, 10, 15, 20, 25].
    * 10 frames at 4 fps (2.5 s): n = 5, indices [0, 2, 4, 6, 8], odd -> [0, 2, 4, 6, 8, 8].
    * 400 frames at 1 fps (400 s > 300): n = 600 >= 400 -> all 400 frames.
    """
    if total_num_frames <= 0 or not fps > 0:
        raise ValueError(f"sample_frame_indices needs frames and a positive fps, got {total_num_frames}, {fps}")
    last = total_num_frames - 1
    duration = duration or round(last / fps) + 1
    if duration <= max_duration:
        n = max(1, int(math.floor(duration * target_fps)))
        indices = [min(last, int(math.ceil(i * fps / target_fps))) for i in range(n)]
    else:
        n = int(max_duration * target_fps)
        if n >= total_num_frames:
            indices = list(range(total_num_frames))
        else:
            times = np.linspace(0, duration, n, endpoint=True)
            indices = [min(last, int(math.ceil(t * fps))) for t in times]
    unique = list(dict.fromkeys(indices))  # ordered de-duplication
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


# Glm46VVideoProcessor's constants (transformers 5.x hard-codes them; its config file's fps is not used by it):
# clips up to 30 s are sampled at 3 fps, up to 300 s at 1 fps, longer ones at 0.5 fps over at most 2400 s, and at
# most 640 frames in all.
_46V_RATES = ((30.0, 3.0), (300.0, 1.0), (2400.0, 0.5))
_46V_MAX_DURATION = 2400.0
_46V_MAX_FRAMES = 640


def sample_frame_indices_46v(total_num_frames: int, fps: float, *, temporal_patch_size: int = 2,
                             duration: Optional[float] = None) -> List[int]:
    """Indices of the frames GLM-4.6V looks at (transformers 5.x ``Glm46VVideoProcessor.sample_frames``).

    1. duration as in :func:`sample_frame_indices`; the rate r is 3 / 1 / 0.5 fps for clips up to 30 / 300 / 2400 s
       (longer clips count as 2400 s); the target count is n = min(int(min(duration, 2400) * r * tps), 640)
       (tps = temporal patch size, 2).
    2. Fewer source frames than n: n indices spread evenly over all frames (np.linspace, truncated; repeats).
       Else walk the frames in time order and keep a frame whenever its time t = i / fps reaches the next mark
       (marks every 1 / (tps * r) s from 0), stopping once the mark passes int(duration) seconds.
    3. Too few kept: n indices spread evenly between the first and last kept frame; too many: n spread over all.
    4. Drop repeats keeping order; an odd count repeats the last index.
    (This is the rule of the class as merged; an earlier draft also resampled when the walk kept fewer than 3.)

    Example: 30 frames at 10 fps (3 s): r = 3, n = 18; marks every 1/6 s keep the first frame at or after each
    mark, [0, 2, 4, 5, 7, 9, 10, 12, ..., 27, 29], and the 18th mark reaches 3 s: exactly n frames.
    The marks are accumulated by repeated addition, as transformers does, so float rounding agrees.
    """
    if total_num_frames <= 0 or not fps > 0:
        raise ValueError(f"sample_frame_indices_46v needs frames and a positive fps, got {total_num_frames}, {fps}")
    last = total_num_frames - 1
    duration = duration or round(last / fps) + 1
    effective = min(duration, _46V_MAX_DURATION)
    rate = next(r for limit, r in _46V_RATES if effective <= limit)  # effective <= 2400, the last limit
    n = min(int(effective * rate * temporal_patch_size), _46V_MAX_FRAMES)

    def spread(lo: int, hi: int) -> List[int]:
        return np.linspace(lo, hi, n, dtype=int).tolist()

    if total_num_frames < n:
        indices = spread(0, last)
    else:
        indices, mark, step, stop = [], 0.0, 1.0 / (temporal_patch_size * rate), int(duration)
        for i in range(total_num_frames):
            if i / fps >= mark:
                mark += step
                indices.append(i)
                if mark >= stop:
                    break
        if len(indices) < n:
            indices = spread(indices[0], indices[-1]) if indices else spread(0, last)
        elif len(indices) > n:
            indices = spread(0, last)
    unique = list(dict.fromkeys(indices))
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


def pick_frames(total_num_frames: int, fps: float, config: "VideoProcessorConfig",
                duration: Optional[float] = None) -> List[int]:
    """The sampling rule of ``config`` (its ``sampling`` family) applied to a clip."""
    if config.sampling == "glm46v":
        return sample_frame_indices_46v(total_num_frames, fps, temporal_patch_size=config.temporal_patch_size,
                                        duration=duration)
    return sample_frame_indices(total_num_frames, fps, target_fps=config.fps, max_duration=config.max_duration,
                                duration=duration)


def group_timestamps(frame_indices: Sequence[int], fps: float, grid_t: int,
                     temporal_patch_size: int = 2) -> List[float]:
    """Seconds of the first frame of each temporal group, padded with the last value to ``grid_t`` entries.

    Example: indices [0, 5, 10, 15, 20, 25] at 10 fps -> times [0, .5, 1, 1.5, 2, 2.5] -> groups [0.0, 1.0, 2.0].
    """
    times = [i / fps for i in frame_indices][::temporal_patch_size][:grid_t]
    while len(times) < grid_t:
        times.append(times[-1] if times else 0.0)
    return times


def load_video(source, config: Optional[VideoProcessorConfig] = None,
               options: Optional[MediaOptions] = None) -> Video:
    """A ``Video`` from a path / URL / data: URI / bytes (decoding only the sampled frames), a ``Video``, or a
    dict ``{"frames": [...], "fps": ...}``."""
    config = config or VideoProcessorConfig()
    if isinstance(source, Video):
        return source
    if isinstance(source, dict) and "frames" in source:
        return Video.from_frames(source["frames"], source.get("fps"), source.get("source", "video frames"))
    if isinstance(source, (list, tuple, np.ndarray)):
        raise UnreadableMediaError(describe(source), "frames without a frame rate",
                                   "wrap them as Video.from_frames(frames, fps=...) or {'frames': ..., 'fps': ...}")

    def select(total: int, fps: float) -> List[int]:
        if not config.do_sample_frames:
            return list(range(total))
        return pick_frames(total, fps, config, duration=total / fps)  # transformers' PyAV reader: frames / fps

    decoded = decode_video(source, select, options)
    return Video(frames=decoded.frames, fps=decoded.fps, frame_indices=decoded.frame_indices,
                 total_num_frames=decoded.total_num_frames, sampled=True, source=decoded.source)


def _frame_to_rgb(frame, source: str) -> Image.Image:
    if isinstance(frame, Image.Image):
        return to_rgb(frame)
    if isinstance(frame, np.ndarray):
        return to_rgb(array_to_image(frame, source))
    if isinstance(frame, (str, os.PathLike)):  # frames extracted to image files
        return to_rgb(load_image(frame))
    raise UnreadableMediaError(source, f"frame of type {type(frame).__name__}", "frames must be PIL images, "
                               "HWC numpy arrays or image paths")


def preprocess_video(video: Video, config: VideoProcessorConfig) -> Dict[str, object]:
    """One video -> {"patches": [t*h*w, 1176] float32, "grid_thw": (t, h, w), "timestamps": [t floats],
    "frame_indices": sampled source indices}."""
    frames = list(video.frames)
    indices = list(video.frame_indices) if video.frame_indices is not None else list(range(len(frames)))
    if len(indices) != len(frames):
        raise UnreadableMediaError(video.source, f"{len(frames)} frames but {len(indices)} frame indices")
    if not video.sampled and config.do_sample_frames:
        picks = pick_frames(len(frames), video.fps, config, duration=len(frames) / video.fps)
        frames, indices = [frames[k] for k in picks], [indices[k] for k in picks]
    images = [_frame_to_rgb(f, f"{video.source} frame {k}") for k, f in zip(indices, frames)]
    height, width = images[0].height, images[0].width
    if any((im.height, im.width) != (height, width) for im in images):
        raise UnreadableMediaError(video.source, "frames differ in size", "give frames of one size")
    tp = config.temporal_patch_size
    if config.do_resize:
        # transformers calls smart_resize with the unpadded frame count; a lone frame counts as one group.
        height, width = smart_resize(max(len(images), tp), height, width, temporal_factor=tp,
                                     factor=config.factor, min_pixels=config.min_pixels,
                                     max_pixels=config.max_pixels, source=video.source)
    pixels = np.stack([rescale_and_normalize(resize_frame(im, height, width, config), config) for im in images])
    stacked = pad_temporal(pixels.transpose(0, 3, 1, 2), tp)  # [T, H, W, 3] -> [T', 3, H, W], T' even
    patches, grid = patchify(stacked, config)
    return {"patches": patches, "grid_thw": grid, "frame_indices": indices,
            "timestamps": group_timestamps(indices, video.fps, grid[0], tp)}


def preprocess_videos(videos: Sequence[Video], config: VideoProcessorConfig) -> Dict[str, object]:
    """Videos -> {"pixel_values_videos": [sum of patches, 1176] float32, "video_grid_thw": [n, 3] int64,
    "video_timestamps": per video, per temporal group seconds}."""
    results = [preprocess_video(v, config) for v in videos]
    row_width = 3 * config.temporal_patch_size * config.patch_size ** 2
    pixel_values = (np.concatenate([r["patches"] for r in results], axis=0) if results
                    else np.zeros((0, row_width), np.float32))
    return {"pixel_values_videos": pixel_values.astype(np.float32, copy=False),
            "video_grid_thw": np.asarray([r["grid_thw"] for r in results], dtype=np.int64).reshape(-1, 3),
            "video_timestamps": [r["timestamps"] for r in results]}
