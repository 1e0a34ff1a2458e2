"""Request tensors -> validated plain values (the one place that knows the public request fields).

Flow through the ensemble (see docs/serving.md for the public table):

    client inputs (lower case, most optional)
      -> preprocessing: `parse_media_options` + `normalize_chat_fields` (defaults filled, values checked)
         emits PIXEL_VALUES, MEDIA_INFO and one REQ_<FIELD> tensor per chat field, always present
      -> videochat_llm: `build_chat_request` (all inputs required)

Why preprocessing fills the defaults: Triton's dynamic batcher only groups requests that carry the same set of
inputs when a model has optional inputs. Making every `videochat_llm` input required (filled upstream) lets a
request with history batch with one without, a request with a seed with one without, and so on.

Every function takes `get(name) -> np.ndarray | None` (a Triton request or a plain dict in tests) and raises
`RequestError` with a short client-facing message; the adapters turn it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from tritonclient.utils import triton_to_np_dtype
from videochat_client import schema
from videochat_client.schema import LIMITS, NO_SEED, MediaOptions

Getter = Callable[[str], "np.ndarray | None"]

# Tensors between the ensemble's steps (not public; the public ones are videochat_client.schema).
PIXEL_VALUES, MEDIA_INFO, REQ_PREFIX = "PIXEL_VALUES", "MEDIA_INFO", "REQ_"
RESOLUTION = 224   # the vision encoder's input side (VisionConfig.img_size; a test ties the two)
PIXEL_DIMS = (-1, -1, 3, RESOLUTION, RESOLUTION)   # [clips, T, 3, R, R], fp16


class RequestError(ValueError):
    """A client error: the message goes back as INVALID_ARGUMENT."""


class MediaNotCached(Exception):
    """A follow-up's media_key is not in this replica's cache: NOT_FOUND "media not cached: ...", and the client
    resends the turn with the bytes."""


def client_message(code: str, text: object) -> str:
    """A client-facing error message, prefixed with its code's name (schema.ERROR_PREFIXES) for streaming
    callers: an error inside a gRPC stream reaches them as a message without a status code."""
    return schema.ERROR_PREFIXES[code] + str(text)


def invalid_argument(exc: Exception) -> str:
    """Client-facing message of a RequestError."""
    return client_message("INVALID_ARGUMENT", exc)


def not_cached(exc: MediaNotCached) -> str:
    """Client-facing message of a MediaNotCached (its prefix is what the client matches, schema.ERROR_PREFIXES)."""
    return client_message(schema.MEDIA_NOT_CACHED, exc)


def parse_timeout_ms(raw_parameters: str | None) -> int | None:
    """The client's time budget from the request `parameters` (the python backend gives them as one JSON
    object), None when absent. Triton keeps the type the client sent: it must be a positive integer."""
    try:
        params = json.loads(raw_parameters) if raw_parameters else {}
    except json.JSONDecodeError:
        raise RequestError("request parameters are not JSON") from None
    value = params.get(schema.TIMEOUT_MS_PARAMETER) if isinstance(params, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"parameter {schema.TIMEOUT_MS_PARAMETER} must be a positive integer (milliseconds), "
                           f"got {value!r}")
    return value


@dataclass(frozen=True)
class ChatField:
    name: str          # public (lower-case) name; REQ_<NAME> between steps, <NAME> at videochat_llm
    dtype: type        # numpy dtype of the tensor (np.object_ for BYTES)
    default: Any       # value when omitted (None: required)


# Order = the order of the REQ_* outputs in preprocessing and the inputs of videochat_llm.
CHAT_FIELDS: tuple[ChatField, ...] = tuple(
    ChatField(f.name, np.dtype(triton_to_np_dtype(f.triton_type)).type, f.default) for f in schema.CHAT_INPUTS)


def scalar(get: Getter, name: str, default: Any = None) -> Any:
    """The single element of a [1] or [1, 1] tensor, `default` when the input is absent."""
    arr = get(name)
    if arr is None:
        if default is None:
            raise RequestError(f"missing input '{name.lower()}'")
        return default
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name.lower()}' must hold exactly one element, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value


def text(get: Getter, name: str, default: str | None = None) -> str:
    value = scalar(get, name, default)
    if isinstance(value, bytes):
        if len(value) > LIMITS.max_text_bytes:
            raise RequestError(f"input '{name.lower()}' is longer than {LIMITS.max_text_bytes} bytes")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name.lower()}' is not valid UTF-8") from None
    return str(value)


def video_bytes(get: Getter, name: str = schema.INPUT_BY_NAME["video"].internal) -> bytes | None:
    """The uploaded bytes, None when the input is absent (a follow-up that sends a media_key instead)."""
    if get(name) is None:
        return None
    value = scalar(get, name)
    if not isinstance(value, bytes):
        raise RequestError(f"input '{name.lower()}' must be BYTES")
    return value


def media_reference(get: Getter, name: str = schema.INPUT_BY_NAME["media_reference"].internal) -> str | None:
    """The `media_key` a client sent back (None when absent or empty). Only its length is checked here: any
    other value simply is not in the cache, which is the same answer as for an evicted key."""
    if get(name) is None:
        return None
    value = scalar(get, name)
    if not isinstance(value, bytes):
        raise RequestError(f"input '{name.lower()}' must be BYTES")
    if len(value) > schema.MAX_MEDIA_KEY_BYTES:
        raise RequestError(f"media_reference is longer than {schema.MAX_MEDIA_KEY_BYTES} bytes")
    return value.decode("utf-8", errors="replace") or None


# the media inputs that are not sampling options
_NOT_OPTIONS = ("video", "media_reference")


def parse_media_options(get: Getter) -> MediaOptions:
    values = {f.name: scalar(get, f.internal, f.default) for f in schema.MEDIA_INPUTS if f.name not in _NOT_OPTIONS}
    for f in schema.MEDIA_INPUTS:
        if f.bounds is not None and not f.bounds[0] <= values[f.name] <= f.bounds[1]:
            raise RequestError(f"{f.name} must be in [{f.bounds[0]}, {f.bounds[1]}], got {values[f.name]}")
    return MediaOptions(image=bool(values["image"]), num_segments=int(values["num_segments"]),
                        hd_num=int(values["hd_num"]), padding=bool(values["padding"]))


def parse_history(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        turns = json.loads(raw) if raw.strip() else []
    except json.JSONDecodeError:
        raise RequestError("history must be JSON [[question, answer], ...]") from None
    if not isinstance(turns, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in turns):
        raise RequestError("history must be JSON [[question, answer], ...] of strings")
    if len(turns) > LIMITS.max_history_turns:
        raise RequestError(f"history has {len(turns)} turns, at most {LIMITS.max_history_turns} are accepted")
    return tuple((q, a) for q, a in turns)


@dataclass(frozen=True)
class ChatFields:
    """The chat part of a request, defaults filled and checked."""
    prompt: str
    history: tuple[tuple[str, str], ...]
    msg: str
    instruction: str | None
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None


def parse_chat_fields(get: Getter, *, prefix: str = "", max_new_tokens_limit: int) -> ChatFields:
    """Read the CHAT_FIELDS (named `prefix + NAME`), fill defaults, check ranges."""
    def raw(field: ChatField) -> Any:
        if field.dtype is np.object_:
            return text(get, prefix + field.name.upper(), field.default)
        return scalar(get, prefix + field.name.upper(), field.default)

    v = {f.name: raw(f) for f in CHAT_FIELDS}
    if get(prefix + "MAX_NEW_TOKENS") is None:   # omitted: the model card's 200, capped by the server's limit
        v["max_new_tokens"] = min(int(v["max_new_tokens"]), max_new_tokens_limit)
    if not v["prompt"].strip():
        raise RequestError("prompt is empty")
    fields = ChatFields(
        prompt=v["prompt"], history=parse_history(v["history"]), msg=v["msg"],
        instruction=v["instruction"] or None, max_new_tokens=int(v["max_new_tokens"]),
        do_sample=bool(v["do_sample"]), temperature=float(v["temperature"]), top_p=float(v["top_p"]),
        top_k=int(v["top_k"]), repetition_penalty=float(v["repetition_penalty"]),
        seed=None if int(v["seed"]) < 0 else int(v["seed"]),
    )
    check_generation(fields, max_new_tokens_limit=max_new_tokens_limit)
    return fields


def check_generation(f: ChatFields, *, max_new_tokens_limit: int) -> None:
    if not 1 <= f.max_new_tokens <= max_new_tokens_limit:
        raise RequestError(f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {f.max_new_tokens}")
    if not (np.isfinite(f.temperature) and f.temperature > 0.0):
        raise RequestError(f"temperature must be > 0, got {f.temperature}")
    if not (np.isfinite(f.top_p) and 0.0 < f.top_p <= 1.0):
        raise RequestError(f"top_p must be in (0, 1], got {f.top_p}")
    if f.top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {f.top_k}")
    if not (np.isfinite(f.repetition_penalty) and f.repetition_penalty > 0.0):
        raise RequestError(f"repetition_penalty must be > 0, got {f.repetition_penalty}")


def chat_fields_to_arrays(f: ChatFields, *, prefix: str = REQ_PREFIX) -> dict[str, np.ndarray]:
    """ChatFields -> one [1, 1] array per CHAT_FIELDS entry (the normalised tensors between the steps)."""
    values = {
        "prompt": f.prompt, "history": json.dumps([list(t) for t in f.history]), "msg": f.msg,
        "instruction": f.instruction or "", "max_new_tokens": f.max_new_tokens, "do_sample": f.do_sample,
        "temperature": f.temperature, "top_p": f.top_p, "top_k": f.top_k,
        "repetition_penalty": f.repetition_penalty, "seed": NO_SEED if f.seed is None else f.seed,
    }
    out = {}
    for field in CHAT_FIELDS:
        value = values[field.name]
        if field.dtype is np.object_:
            value = value.encode("utf-8")
        out[prefix + field.name.upper()] = np.array([[value]], dtype=field.dtype)
    return out


def media_info_json(metadata: Mapping[str, Any], *, media_type: str) -> bytes:
    info = dict(metadata)
    info["media_type"] = media_type
    return json.dumps(info, default=_jsonable).encode("utf-8")


def parse_media_info(raw: bytes | str) -> dict:
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("MEDIA_INFO is not JSON") from None
    if not isinstance(info, dict) or info.get("media_type") not in ("video", "image"):
        raise RequestError("MEDIA_INFO must be a JSON object with media_type 'video' or 'image'")
    return info


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def getter_from_mapping(tensors: Mapping[str, Any]) -> Getter:
    """A `get` over a plain dict (tests, or an adapter that already read its inputs)."""
    return lambda name: tensors.get(name)
