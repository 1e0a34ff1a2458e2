"""videochat_llm's request and response side, pure of Triton: its inputs -> a `ChatRequest`, token events ->
response tensors (`StreamCoalescer`), and the CPU thread policy of the engine. The batching itself is
`videochat.serving.scheduler`, the one path for streaming and unary alike.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from videochat.serving.requests import (MEDIA_INFO, PIXEL_VALUES, ChatFields, Getter, MediaNotCached,
                                        RequestError, parse_chat_fields, parse_media_info, scalar)

MEDIA_KEY_PREFIX = "mk1:"   # version of the key format; a server that changes it just misses old keys


class MediaReferences:
    """The public `media_key`s of one videochat_llm instance and their lookup in its visual-token cache.

    media_key = "mk1:" + HMAC-SHA256(secret, content key), where the content key is preprocessing's sha256 of
    the bytes + the options that change the pixels, and `secret` is 32 random bytes drawn when the instance
    starts (never written anywhere). The key is the cache key of the visual tokens, so the server never has to
    map it back: a key is either in this instance's cache or it is not. Without the secret, knowing a video's
    hash does not give its key, so only a client that uploaded the bytes to this instance learns it (and could
    upload them again anyway). docs/serving.md, "Follow-ups without re-upload", says what it does not protect.
    """

    def __init__(self, cache: Any, secret: bytes | None = None) -> None:
        self.cache = cache                        # a VisualCache or None (off)
        self._secret = secret or secrets.token_bytes(32)
        self.hits = 0                             # references answered from the cache
        self.misses = 0                           # references answered NOT_FOUND "media not cached: "

    @property
    def enabled(self) -> bool:
        return self.cache is not None and self.cache.max_bytes > 0

    def key_for(self, content_key: str) -> str:
        return MEDIA_KEY_PREFIX + hmac.new(self._secret, content_key.encode("utf-8"), hashlib.sha256).hexdigest()

    def resolve(self, ref: str, media_type: str, instruction: str | None) -> Any:
        """The cached visual tokens [clips*96, H] of a reference; raises MediaNotCached."""
        from videochat.runtime.visual_cache import VisualKey
        tokens = self.cache.get(VisualKey(ref, media_type, instruction)) if self.enabled else None
        if tokens is None:
            self.misses += 1
            why = "the visual-token cache is off" if not self.enabled else "evicted, restarted, another replica, or never issued here"
            raise MediaNotCached(f"media_key is not cached on this replica ({why}); resend the turn with the video")
        self.hits += 1
        return tokens

    def returned(self, key: str, media_type: str, instruction: str | None) -> Callable[[], str]:
        """The `media_key` output, read when the first response goes out (after engine.add stored the tokens):
        the key while this instance holds the tokens, "" when it does not (cache off, or too small for them)."""
        if not self.enabled:
            return lambda: ""
        from videochat.runtime.visual_cache import VisualKey
        vkey = VisualKey(key, media_type, instruction)
        return lambda: key if vkey in self.cache else ""


@dataclass(frozen=True)
class ParsedRequest:
    chat_request: Any           # videochat.runtime.generation.ChatRequest
    clips: int                  # for the metrics (0 for a reference: nothing to encode)
    media_type: str
    received_unix: float | None = None   # arrival at the ensemble (preprocessing's stamp in MEDIA_INFO)
    media_key: Callable[[], str] = lambda: ""   # the `media_key` output (MediaReferences.returned)
    reference: bool = False     # follow-up by media_key: no pixels, visual tokens from the cache


def build_chat_request(get: Getter, *, max_new_tokens_limit: int,
                       references: MediaReferences | None = None) -> ParsedRequest:
    """videochat_llm inputs -> ChatRequest. PIXEL_VALUES is [1, clips, T, 3, H, W] (batch dim 1); for a
    follow-up by reference it is empty and the visual tokens come from the cache (or MediaNotCached)."""
    import torch
    from videochat.runtime.types import ChatRequest

    references = references or MediaReferences(None)
    fields: ChatFields = parse_chat_fields(get, max_new_tokens_limit=max_new_tokens_limit)
    info = parse_media_info(scalar(get, MEDIA_INFO))
    if "media_reference" in info:
        return _reference_request(fields, info, references)
    pixels = get(PIXEL_VALUES)
    if pixels is None or pixels.ndim != 6 or pixels.shape[0] != 1 or 0 in pixels.shape:
        raise RequestError(f"PIXEL_VALUES must be [1, clips, T, 3, H, W], got {None if pixels is None else list(pixels.shape)}")
    media_type = info["media_type"]
    if media_type == "image" and pixels.shape[2] != 1:
        raise RequestError(f"an image needs T == 1, got T = {pixels.shape[2]}")
    try:  # the native types check again (shapes, ranges); their ValueErrors are the client's too
        params = _params(fields)
        # a copy: the input may live in Triton's shared memory, which is reused once execute() returns (the
        # in-flight scheduler encodes it later, from its own thread)
        content_key = info.get("media_key")
        key = references.key_for(content_key) if isinstance(content_key, str) else None
        request = ChatRequest(media=torch.from_numpy(np.array(pixels[0], copy=True, order="C")), media_type=media_type,
                              prompt=fields.prompt, history=fields.history, msg=fields.msg,
                              instruction=fields.instruction, params=params, media_key=key)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    returned = references.returned(key, media_type, fields.instruction) if key else (lambda: "")
    return ParsedRequest(chat_request=request, clips=int(pixels.shape[1]), media_type=media_type, media_key=returned,
                         received_unix=_received(info))


def _params(fields: ChatFields) -> Any:
    from videochat.runtime.types import GenerationParams
    return GenerationParams(max_new_tokens=fields.max_new_tokens, do_sample=fields.do_sample,
                            temperature=fields.temperature, top_p=fields.top_p, top_k=fields.top_k,
                            repetition_penalty=fields.repetition_penalty, seed=fields.seed)


def _reference_request(fields: ChatFields, info: dict, references: MediaReferences) -> ParsedRequest:
    """A follow-up by media_key: the visual tokens from this instance's cache, held by the request from here on
    (an eviction while it waits in the queue does not matter)."""
    from videochat.runtime.types import ChatRequest

    ref, media_type = str(info["media_reference"]), info["media_type"]
    tokens = references.resolve(ref, media_type, fields.instruction)
    try:
        request = ChatRequest(media=None, visual_tokens=tokens, media_type=media_type, prompt=fields.prompt,
                              history=fields.history, msg=fields.msg, instruction=fields.instruction,
                              params=_params(fields), media_key=ref)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return ParsedRequest(chat_request=request, clips=0, media_type=media_type,
                         media_key=references.returned(ref, media_type, fields.instruction), reference=True,
                         received_unix=_received(info))


def _received(info: dict) -> float | None:
    received = info.get("received_unix")
    return float(received) if isinstance(received, (int, float)) else None


def arrival_on(clock_now: float, received_unix: float | None, *, now_unix: float) -> float | None:
    """The ensemble arrival on the scheduler's (monotonic) clock: now minus the time since the stamp; a stamp
    from the future (clock step) counts as now."""
    return None if received_unix is None else clock_now - max(0.0, now_unix - received_unix)


class CpuThreadsEngine:
    """A GenerationEngine on CPU whose calls run with their own intra-op thread counts: `engine.add` (ViT +
    prefill: large ops) with `add_threads`, `engine.step` (one decode forward: small ops) with `step_threads`.

    Why: from the scheduler's (non-main) thread, torch's OpenMP sync costs more than a decode step's small ops
    gain. Measured on 2 cores with the demo checkpoint: decode at batch 1 1.63 -> 0.84 ms/step with 1 thread
    (0.85 on the main thread with 2), batch 16 3.5 -> 2.8 ms/step; adding one video 169 ms with 1 thread,
    96 ms with 2 (switching per call costs nothing measurable).
    """

    def __init__(self, engine: Any, *, add_threads: int, step_threads: int) -> None:
        self.engine, self.add_threads, self.step_threads = engine, add_threads, step_threads

    def add(self, requests: Sequence[Any]) -> list[int]:
        import torch
        torch.set_num_threads(self.add_threads)
        return self.engine.add(requests)

    def step(self) -> list:
        import torch
        torch.set_num_threads(self.step_threads)
        return self.engine.step()

    def cancel(self, handle: int) -> Any:
        return self.engine.cancel(handle)

    @property
    def num_active(self) -> int:
        return self.engine.num_active

    @property
    def last_add_timings(self) -> tuple[float, float] | None:
        return self.engine.last_add_timings


def output_arrays(*, text: str, token_ids: Sequence[int], prompt_tokens: int, completion_tokens: int,
                  finish_reason: str, media_key: str = "") -> dict[str, np.ndarray]:
    """One response's tensors, each with the leading batch dimension of 1."""
    return {
        "TEXT": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "TOKEN_IDS": np.asarray(list(token_ids), dtype=np.int32).reshape(1, -1),
        "PROMPT_TOKENS": np.array([[prompt_tokens]], dtype=np.int32),
        "COMPLETION_TOKENS": np.array([[completion_tokens]], dtype=np.int32),
        "FINISH_REASON": np.array([[finish_reason.encode("utf-8")]], dtype=np.object_),
        "MEDIA_KEY": np.array([[media_key.encode("utf-8")]], dtype=np.object_),
    }


@dataclass
class StreamCoalescer:
    """Per-request response policy: the first token at once (time to first token), later deltas merged until
    `interval_s` passed since the last send, the final event always. `interval_s == 0` sends every event;
    `None` sends only the final one, holding the whole answer (unary). The sent deltas concatenate to the full
    text and ids; completion_tokens counts all ids so far."""
    interval_s: float | None
    clock: Callable[[], float] = time.monotonic
    media_key: Callable[[], str] = lambda: ""   # read once, at the first send (ParsedRequest.media_key)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sent_responses: int = 0
    events: int = 0
    finished: bool = False
    _text: list[str] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)
    _last_send: float | None = None
    _media_key: str | None = None

    def push(self, event: Any) -> tuple[dict[str, np.ndarray] | None, bool]:
        """A `TokenEvent` in -> (arrays to send now or None, final)."""
        self.events += 1
        self.finished = event.finished
        if event.prompt_tokens:
            self.prompt_tokens = event.prompt_tokens
        self._text.append(event.text)
        if event.token_id is not None:           # None only for a cancellation event
            self._ids.append(int(event.token_id))
            self.completion_tokens += 1
        now = self.clock()
        due = event.finished or (self.interval_s is not None and (
            self._last_send is None or self.interval_s <= 0 or now - self._last_send >= self.interval_s))
        if not due:
            return None, False
        reason = event.finish_reason if event.finished else None
        if self._media_key is None:
            self._media_key = self.media_key()
        arrays = output_arrays(text="".join(self._text), token_ids=self._ids, prompt_tokens=self.prompt_tokens,
                               completion_tokens=self.completion_tokens,
                               finish_reason="" if reason is None else str(getattr(reason, "value", reason)),
                               media_key=self._media_key)
        self._text, self._ids, self._last_send = [], [], now
        self.sent_responses += 1
        return arrays, event.finished


def batch_stats(parsed: Sequence[ParsedRequest]) -> dict[str, int]:
    return {"requests": len(parsed), "clips": sum(p.clips for p in parsed),
            "videos": sum(p.media_type == "video" and not p.reference for p in parsed),
            "images": sum(p.media_type == "image" and not p.reference for p in parsed)}
