"""preprocessing model's logic: one request's inputs -> PIXEL_VALUES, MEDIA_INFO and the REQ_* chat fields.

Multi-turn conversations re-send the same video every turn (the API is stateless), so the outputs are cached by
content: `media_key` = sha256 of the bytes + every option that changes the pixels. The key also goes into
MEDIA_INFO, where videochat_llm uses it for the engine's cache of visual tokens (skips ViT + QFormer).

A follow-up may send the `media_key` an earlier answer returned instead of the bytes (docs/serving.md,
"Follow-ups without re-upload"): then nothing is decoded, PIXEL_VALUES is empty ([1, 0, 1, 3, R, R]: every
output of a step must exist) and MEDIA_INFO carries `media_reference`, which videochat_llm resolves in its
visual-token cache (or answers NOT_FOUND "media not cached: ...").
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional

import numpy as np

from videochat.runtime.byte_lru import ByteLRU
from videochat.serving.requests import (MEDIA_INFO, PIXEL_VALUES, RESOLUTION, Getter, MediaOptions, RequestError,
                                        chat_fields_to_arrays, getter_from_mapping, media_info_json,
                                        media_reference, parse_chat_fields, parse_media_options,
                                        video_bytes)
from videochat.serving.settings import PreprocessSettings
from videochat_client.schema import LIMITS


# (bytes, options, media_key, max_bytes) -> (PIXEL_VALUES, MEDIA_INFO); raises RequestError for bad input.
# `decode_media` runs in this process; videochat.serving.decode_worker.DecodePool.decode in a worker process.
Decode = Callable[[bytes, MediaOptions, str, int], tuple[np.ndarray, bytes]]


def media_key(data: bytes, opts: MediaOptions) -> str:
    """Content address of the preprocessed media: same bytes + same options -> same pixels."""
    digest = hashlib.sha256(data).hexdigest()
    return (f"sha256:{digest}:image={int(opts.image)}:num_segments={opts.num_segments}:hd_num={opts.hd_num}"
            f":padding={int(opts.padding)}:resolution={RESOLUTION}")


class MediaCache(ByteLRU[str, tuple[np.ndarray, bytes]]):
    """LRU of (PIXEL_VALUES, MEDIA_INFO) by media_key, bounded by their bytes; `max_bytes == 0` turns it off.
    Cached arrays are read-only (they are shared by the hits)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda item: item[0].nbytes + len(item[1]))

    def put(self, key: str, pixels: np.ndarray, info: bytes) -> None:  # type: ignore[override]
        pixels.setflags(write=False)
        super().put(key, (pixels, info))


# (video bytes received, re-upload: the bytes came with a media_key, i.e. after a miss) -> None; for the metrics
OnUpload = Callable[[int, bool], None]
EMPTY_PIXELS_SHAPE = (1, 0, 1, 3, RESOLUTION, RESOLUTION)


def reference_outputs(ref: str, opts: MediaOptions) -> tuple[np.ndarray, bytes]:
    """A follow-up by reference: no pixels, and the reference for videochat_llm's cache lookup."""
    return (np.zeros(EMPTY_PIXELS_SHAPE, dtype=np.float16),
            media_info_json({"media_reference": ref}, media_type="image" if opts.image else "video"))


def preprocess_request(get: Getter, settings: PreprocessSettings, cache: MediaCache | None = None,
                       decode: Decode | None = None, *, received_unix: float | None = None,
                       on_upload: Optional[OnUpload] = None) -> dict[str, np.ndarray]:
    """Check the chat fields first (cheap), then decode (or take the cached result: a hit never decodes).
    PIXEL_VALUES: fp16 [1, clips, T, 3, 224, 224]; MEDIA_INFO: JSON metadata + media_type + media_key, plus
    `received_unix` when given (the request's arrival at the ensemble, for videochat_llm's TTFT and latency).
    Without bytes but with a media_key: no decoding at all (`reference_outputs`)."""
    chat = parse_chat_fields(get, max_new_tokens_limit=settings.max_new_tokens_limit)
    opts = parse_media_options(get)
    data = video_bytes(get)
    ref = media_reference(get)
    if on_upload is not None:
        on_upload(len(data or b""), bool(data) and ref is not None)
    if data is None and ref is None:
        raise RequestError("no video: send the video's bytes, or the media_key of an earlier answer")
    if data is None:
        pixels, info = reference_outputs(ref, opts)
    else:
        pixels, info = _pixels(data, opts, settings, cache, decode)
    if received_unix is not None:
        info = stamp_received(info, received_unix)
    out = {PIXEL_VALUES: pixels, MEDIA_INFO: np.array([[info]], dtype=np.object_)}
    out.update(chat_fields_to_arrays(chat))
    return out


def _pixels(data: bytes, opts: MediaOptions, settings: PreprocessSettings, cache: MediaCache | None,
            decode: Decode | None) -> tuple[np.ndarray, bytes]:
    """The uploaded bytes' PIXEL_VALUES and MEDIA_INFO, from the media cache or decoded (and then cached)."""
    if not data:
        raise RequestError("video is empty (0 bytes)")
    if len(data) > settings.max_video_bytes:
        raise RequestError(f"video is {len(data)} bytes, the limit is {settings.max_video_bytes}")
    key = media_key(data, opts)
    cached = cache.get(key) if cache is not None and cache.max_bytes > 0 else None
    if cached is not None:
        return cached
    pixels, info = (decode or decode_media)(data, opts, key, settings.max_video_bytes)
    if cache is not None and cache.max_bytes > 0:
        cache.put(key, pixels, info)
    return pixels, info


def stamp_received(info: bytes, received_unix: float) -> bytes:
    """MEDIA_INFO with this request's arrival time (wall clock: both stubs run on the same host). The cached
    MEDIA_INFO is shared by hits, so the stamp goes on a copy."""
    return json.dumps({**json.loads(info), "received_unix": received_unix}).encode("utf-8")


def warm_up(settings: PreprocessSettings, decode: Decode | None = None) -> None:
    """Decode a tiny built-in image once, without the cache, so a freshly loaded instance is warm: decoding in this
    process, the decoder's imports (torch, PyAV) otherwise land on the first request (measured 6-8 s on 2 busy
    cores, at every start and every reload); with the worker pool it checks the worker decodes."""
    from videochat_client.probe import PROBE_IMAGE, PROBE_PROMPT
    preprocess_request(getter_from_mapping({"VIDEO": np.array([[PROBE_IMAGE]], dtype=np.object_),
                                            "PROMPT": np.array([[PROBE_PROMPT.encode()]], dtype=np.object_),
                                            "IMAGE": np.array([[True]])}), settings, decode=decode)


def decode_media(data: bytes, opts: MediaOptions, key: str, max_bytes: int) -> tuple[np.ndarray, bytes]:
    """Decode in this process: bytes -> fp16 PIXEL_VALUES [1, clips, T, 3, R, R] + MEDIA_INFO JSON."""
    from preprocessing import Limits, VideoDecodeError, preprocess

    # The library's limits, with the two the API also bounds set to the API's values (one source each).
    limits = Limits(max_bytes=max_bytes, max_segments=LIMITS.max_num_segments)
    try:
        result = preprocess(data, num_segments=opts.num_segments, resolution=RESOLUTION, hd_num=opts.hd_num,
                            padding=opts.padding, image=opts.image, limits=limits)
    except VideoDecodeError as exc:
        raise RequestError(f"bad video: {exc}") from None
    except ValueError as exc:
        raise RequestError(f"bad media options: {exc}") from None
    pixels = np.ascontiguousarray(result.pixel_values.to(dtype=_float16()).numpy())
    metadata = dict(result.metadata.to_dict(), media_key=key)
    return pixels, media_info_json(metadata, media_type="image" if opts.image else "video")


def _float16():
    import torch
    return torch.float16
