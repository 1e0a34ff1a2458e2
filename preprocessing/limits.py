"""Resource limits checked from the container header, before any frame is decoded.

A 0.75 MB H.264 file can declare 16000x16000 frames; decoding eight of them needs ~6 GB, so the
check must happen on the header (milliseconds), not after decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import VideoDecodeError

_MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one input. Defaults admit 4K UHD (3840x2160) and two hours of video.

    max_bytes:      size of the uploaded file.
    max_pixels:     width * height of one frame (4096 * 4096 = 16.8 M; 4K UHD is 8.3 M).
    max_side:       longest frame side in pixels.
    max_frames:     frames in the stream (2 h at 60 fps).
    max_duration_s: stream duration in seconds.
    max_segments:   frames sampled per request (bounds the decoded-frame memory).
    """

    max_bytes: int = 512 * _MIB
    max_pixels: int = 4096 * 4096
    max_side: int = 8192
    max_frames: int = 2 * 3600 * 60
    max_duration_s: float = 2 * 3600.0
    max_segments: int = 256

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "max_frames", "max_duration_s", "max_segments"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")

    def check_bytes(self, *, size: int) -> None:
        if size > self.max_bytes:
            raise VideoDecodeError(f"input too large: {size} bytes > limit {self.max_bytes} bytes")

    def check_frame_size(self, *, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise VideoDecodeError(f"video stream has no valid frame size ({width}x{height})")
        if max(width, height) > self.max_side or width * height > self.max_pixels:
            raise VideoDecodeError(
                f"frame size {width}x{height} too large: limit {self.max_pixels} pixels "
                f"and {self.max_side} px per side")

    def check_length(self, *, num_frames: int | None = None, duration_s: float | None = None) -> None:
        if num_frames is not None and num_frames > self.max_frames:
            raise VideoDecodeError(f"video too long: {num_frames} frames > limit {self.max_frames}")
        if duration_s is not None and duration_s > self.max_duration_s:
            raise VideoDecodeError(
                f"video too long: {duration_s:.1f} s > limit {self.max_duration_s:.0f} s")

    def check_segments(self, *, num_segments: int) -> None:
        if not 1 <= num_segments <= self.max_segments:
            raise VideoDecodeError(f"num_segments must be in 1..{self.max_segments}, got {num_segments}")
