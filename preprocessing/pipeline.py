"""`preprocess`: file bytes -> the model card's `[1, clips, T, 3, R, R]` tensor plus metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .decode import VideoSource
from .errors import VideoDecodeError
from .hd_transform import HDGeometry, finish_canvas, hd_geometry, resize_frame
from .limits import Limits
from .sampling import card_message, card_timestamps, get_index

_DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PreprocessMetadata:
    """What was decoded and sampled. `to_dict()` is JSON-serialisable."""

    media_type: str  # "video" or "image"
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str
    width: int  # of the decoded frames, display orientation (rotation applied)
    height: int
    fps: float  # average frame rate (decord's get_avg_fps); 0.0 for a still image
    num_frames: int  # frames in the stream, counted as decord counts them
    frame_indices: list[int]  # sampled frames (get_index of the card)
    timestamps: list[float]  # card's seconds: round(index / fps, 1)
    pts_seconds: list[float | None]  # true presentation times of the sampled frames (differs on VFR)
    message: str  # card's "The video contains N frames sampled at ... seconds." ("" for a still image)
    clip_grid: tuple[int, int]  # (rows, cols) of 224x224 tiles; clips = rows * cols + 1 (global view)
    num_clips: int
    canvas_hw: tuple[int, int]  # HD canvas before tiling
    decode_strategy: str  # "selective" (seek + skip) or "sequential"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreprocessResult:
    """pixel_values: float32 [1, clips, T, 3, resolution, resolution]; T = num_segments (1 if image)."""

    pixel_values: torch.Tensor
    metadata: PreprocessMetadata


def preprocess(data: bytes, *, num_segments: int = 8, resolution: int = 224, hd_num: int = 6,
               padding: bool = False, image: bool = False, limits: Limits | None = None) -> PreprocessResult:
    """The model card's `load_video(..., return_msg=True)` on bytes in memory.

    image=True: one frame (T=1) - a still image, or the frame `get_index(n, 1)` picks from a video.
    Raises VideoDecodeError (a ValueError) for inputs that cannot be used; ValueError for bad options.
    Thread-safe: no state is shared between calls.
    """
    limits = limits or _DEFAULT_LIMITS
    _check_options(resolution=resolution, hd_num=hd_num)
    segments = 1 if image else num_segments
    limits.check_segments(num_segments=segments)
    source = VideoSource(bytes(data), limits=limits)
    info = source.info
    if info.is_still_image and not image:
        raise VideoDecodeError("the input is an image, not a video; use image=True")
    indices = get_index(info.num_frames, segments)

    geometry: list[HDGeometry] = []  # fixed by the first decoded frame
    frame_hw: list[tuple[int, int]] = []

    def convert(rgb: np.ndarray) -> torch.Tensor:
        if not geometry:
            frame_hw.append((rgb.shape[0], rgb.shape[1]))
            geometry.append(hd_geometry(height=rgb.shape[0], width=rgb.shape[1], resolution=resolution,
                                        hd_num=hd_num, padding=padding))
        g = geometry[0]
        return resize_frame(rgb, size=(g.resize_h, g.resize_w), turn=g.turned)

    resized = source.read(indices, convert=convert)
    shapes = {tuple(f.shape) for f in resized}
    if len(shapes) != 1:
        raise VideoDecodeError("frame size changes inside the video")
    g = geometry[0]
    pixel_values = finish_canvas(torch.stack(resized), geometry=g, resolution=resolution).unsqueeze(0)
    return PreprocessResult(pixel_values=pixel_values,
                            metadata=_metadata(source, indices=indices, geometry=g, frame_hw=frame_hw[0], image=image))


def _check_options(*, resolution: int, hd_num: int) -> None:
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if hd_num < 1:
        raise ValueError(f"hd_num must be positive, got {hd_num}")


def _metadata(source: VideoSource, *, indices: list[int], geometry: HDGeometry, frame_hw: tuple[int, int],
              image: bool) -> PreprocessMetadata:
    info = source.info
    still = info.is_still_image
    fps = 0.0 if still else info.fps
    timestamps = card_timestamps(indices, fps=fps) if fps > 0 else []
    message = card_message(indices, fps=fps) if fps > 0 else ""
    height, width = frame_hw
    return PreprocessMetadata(
        media_type="image" if image else "video", container=info.container, codec=info.codec,
        width=width, height=height, fps=fps, num_frames=info.num_frames, frame_indices=list(indices),
        timestamps=timestamps, pts_seconds=[source.pts_seconds.get(i) for i in indices], message=message,
        clip_grid=(geometry.rows, geometry.cols), num_clips=geometry.num_clips,
        canvas_hw=geometry.canvas_hw, decode_strategy=source.strategy)

