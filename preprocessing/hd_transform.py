"""The model card's HD transform: frames -> a canvas of 224x224 tiles plus one global view.

How it works (docs/preprocessing.md, "The model card's load_video"; docs/model.md, quirks Q7-Q9), with the
model card's call (`resolution=224, hd_num=6`):

* padding=False (the card's default): every frame is bicubic-resized to a fixed 224x448 canvas,
  whatever its aspect ratio (`fix_ratio=(2, 1)` makes the aspect-ratio search dead code, Q7).
  A 640x480 clip, 8 frames: [8, 3, 480, 640] -> canvas [8, 3, 224, 448] -> 1x2 tiles.
* padding=True: the long side becomes the width (a portrait frame is turned 180 degrees, not
  transposed, so it is squashed into a landscape canvas - Q8). `scale` is the largest s with
  s * ceil(s / ratio) <= hd_num; the frame is resized to (int(224*s / ratio), 224*s) and padded
  top/bottom with 255 (white) to a multiple of 224; a turned frame is turned back.
  640x480, hd_num=6: ratio 1.33 -> scale 2 -> resize 336x448 -> pad 56+56 -> 448x448 -> 2x2 tiles.
  360x640 portrait: ratio 1.78 -> scale 3 -> resize 378x672 -> pad 35+35 -> 448x672 -> 2x3 tiles.
* Then: /255, ImageNet mean/std; the canvas is cut into row-major tiles (row 0 left to right,
  then row 1 ...), and the global view - a bicubic resize of the *normalised* canvas to 224x224 -
  goes last. 224x448 gives 2 tiles + 1 global = 3 clips, i.e. 3 x 96 visual tokens in the LLM.

Bicubic everywhere is float, align_corners=False, no antialias and no clamping (overshoot past
0..255 survives, Q9). We run the same `F.interpolate` calls as the card, one frame at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_VALUE = 255.0  # white, applied before normalisation (docs/model.md, quirk Q8)


@dataclass(frozen=True)
class HDGeometry:
    """Where one frame of (height, width) goes: resize target, padding, tile grid."""

    resize_h: int
    resize_w: int
    pad_top: int
    pad_bottom: int
    rows: int
    cols: int
    turned: bool  # padding=True on a portrait frame: turned 180 degrees around resize + pad

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return self.resize_h + self.pad_top + self.pad_bottom, self.resize_w

    @property
    def num_clips(self) -> int:
        return self.rows * self.cols + 1  # tiles + global view


def hd_geometry(*, height: int, width: int, resolution: int = 224, hd_num: int = 6,
                padding: bool = False) -> HDGeometry:
    """The canvas the model card builds for a (height, width) frame."""
    if not padding:  # HD_transform_no_padding with fix_ratio=(2, 1): rows=1, cols=2 always
        return HDGeometry(resize_h=resolution, resize_w=2 * resolution, pad_top=0, pad_bottom=0,
                          rows=1, cols=2, turned=False)
    turned = width < height
    long_side, short_side = (height, width) if turned else (width, height)
    ratio = long_side / short_side
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    if scale < 1:
        raise ValueError(f"hd_num={hd_num} is too small for aspect ratio {ratio:.2f}")
    new_w = int(scale * resolution)
    new_h = int(new_w / ratio)
    # The card pads to a multiple of a hard-coded 224; we use `resolution` (equal for the card).
    target_h = int(math.ceil(new_h / resolution) * resolution)
    top = int((target_h - new_h) / 2)
    bottom = target_h - new_h - top
    if turned:  # padding happens while turned, so the larger half ends up on top
        top, bottom = bottom, top
    return HDGeometry(resize_h=new_h, resize_w=new_w, pad_top=top, pad_bottom=bottom,
                      rows=target_h // resolution, cols=new_w // resolution, turned=turned)


def resize_frame(rgb: np.ndarray, *, size: tuple[int, int], turn: bool = False) -> torch.Tensor:
    """Bicubic resize of one uint8 [H, W, 3] frame to float [3, h, w] (0..255, unclamped).

    Frame by frame, so only one full-resolution float frame exists at a time (the card converts
    all T frames at once: 200 MB at 1080p, 800 MB at 4K). The float copy keeps the decoder's
    channels-last layout, as the card's `permute(0, 3, 1, 2).float()` does.
    `turn` rotates the frame 180 degrees first (the padding=True portrait path).
    """
    frame = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    if turn:
        frame = frame.flip(-2, -1)
    out = F.interpolate(frame.float(), size=size, mode="bicubic", align_corners=False)
    return out[0]


def finish_canvas(resized: torch.Tensor, *, geometry: HDGeometry, resolution: int = 224) -> torch.Tensor:
    """Resized frames [T, 3, h, w] (0..255) -> model input [clips, T, 3, R, R], normalised.

    Pads (255) and turns back per `geometry`, normalises, cuts row-major tiles, appends the
    global view (bicubic of the normalised canvas).
    """
    canvas = resized
    # A turned frame is still upside down here: its top padding is the final canvas's bottom.
    top, bottom = geometry.pad_top, geometry.pad_bottom
    if geometry.turned:
        top, bottom = bottom, top
    if top or bottom:
        canvas = F.pad(canvas, [0, 0, top, bottom], mode="constant", value=PAD_VALUE)
    if geometry.turned:
        canvas = canvas.flip(-2, -1)
    canvas = normalise(canvas)
    n_t = canvas.shape[0]
    tiles = canvas.reshape(1, n_t, 3, geometry.rows, resolution, geometry.cols, resolution)
    tiles = tiles.permute(0, 3, 5, 1, 2, 4, 6).reshape(-1, n_t, 3, resolution, resolution)
    glb = F.interpolate(canvas, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return torch.cat([tiles, glb.unsqueeze(0)])


def normalise(canvas: torch.Tensor) -> torch.Tensor:
    """0..255 -> ImageNet-normalised, in the card's op order (/255, -mean, /std)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=canvas.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=canvas.dtype).view(-1, 1, 1)
    return canvas.div(255.0).sub_(mean).div_(std)
