"""preprocessing model's logic: one request's inputs -> PIXEL_VALUES, MEDIA_INFO and the REQ_* chat fields."""
from __future__ import annotations

import numpy as np

from videochat.serving.requests import (Getter, RequestError, chat_fields_to_arrays, media_info_json,
                                        parse_chat_fields, parse_media_options, video_bytes)
from videochat.serving.settings import PreprocessSettings

RESOLUTION = 224  # the model's input size; PIXEL_VALUES dims in config.pbtxt say the same


def preprocess_request(get: Getter, settings: PreprocessSettings) -> dict[str, np.ndarray]:
    """Check the chat fields first (cheap), then decode. PIXEL_VALUES: fp16 [1, clips, T, 3, 224, 224]."""
    from preprocessing import VideoDecodeError, preprocess

    chat = parse_chat_fields(get, max_new_tokens_limit=settings.max_new_tokens_limit)
    opts = parse_media_options(get)
    data = video_bytes(get)
    if not data:
        raise RequestError("video is empty (0 bytes)")
    if len(data) > settings.max_video_bytes:
        raise RequestError(f"video is {len(data)} bytes, the limit is {settings.max_video_bytes}")
    try:
        result = preprocess(data, num_segments=opts.num_segments, resolution=RESOLUTION, hd_num=opts.hd_num,
                            padding=opts.padding, image=opts.image)
    except VideoDecodeError as exc:
        raise RequestError(f"bad video: {exc}") from None
    except ValueError as exc:
        raise RequestError(f"bad media options: {exc}") from None
    pixels = result.pixel_values.to(dtype=_float16()).numpy()
    out = {
        "PIXEL_VALUES": np.ascontiguousarray(pixels),
        "MEDIA_INFO": np.array([[media_info_json(result.metadata.to_dict(),
                                                 media_type="image" if opts.image else "video")]], dtype=np.object_),
    }
    out.update(chat_fields_to_arrays(chat))
    return out


def _float16():
    import torch
    return torch.float16
