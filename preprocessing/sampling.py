"""Which frames the model sees, and the model card's description of them.

Both functions reproduce the model card's `load_video` exactly (docs/preprocessing.md, "The model card's
load_video", steps 2 and 8; docs/model.md, quirk Q10).
"""

from __future__ import annotations

import numpy as np


def get_index(num_frames: int, num_segments: int) -> list[int]:
    """Frame indices of the model card: the middle of `num_segments` equal segments.

    `np.round` rounds half to even (19.5 -> 20, 2.5 -> 2); that is part of the contract.
    Example: 40 frames, 8 segments -> [2, 7, 12, 17, 22, 26, 31, 36].
    Indices repeat when num_segments > num_frames (3 frames -> [0, 0, 0, 1, 1, 1, 2, 2]).
    """
    if num_frames < 1 or num_segments < 1:
        raise ValueError(f"need num_frames >= 1 and num_segments >= 1, got {num_frames}, {num_segments}")
    seg_size = float(num_frames - 1) / num_segments
    start = int(seg_size / 2)
    return [start + int(np.round(seg_size * idx)) for idx in range(num_segments)]


def card_timestamps(frame_indices: list[int], *, fps: float) -> list[float]:
    """Seconds of each sampled frame as the card computes them: index / average fps, 1 decimal."""
    return [round(idx / fps, 1) for idx in frame_indices]


def card_message(frame_indices: list[int], *, fps: float) -> str:
    """The card's `return_msg` string, e.g. 'The video contains 8 frames sampled at 0.4, 1.4, ... seconds.'"""
    sec = ", ".join(str(t) for t in card_timestamps(frame_indices, fps=fps))
    return f"The video contains {len(frame_indices)} frames sampled at {sec} seconds."
