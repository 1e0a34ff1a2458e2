"""Typed values returned by the client (all frozen; JSON-friendly through `to_dict`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Timings:
    """Client-side clock, milliseconds. `time_to_first_token_ms`: send -> first response carrying tokens;
    `inter_token_latency_ms`: (latency - TTFT) / (completion_tokens - 1) as genai-perf defines it
    (None with fewer than 2 tokens)."""

    latency_ms: float
    time_to_first_token_ms: Optional[float]
    inter_token_latency_ms: Optional[float] = None


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: Tuple[int, ...]
    usage: Usage
    timings: Timings
    finish_reason: str          # "stop" | "length" | "cancelled"
    request_id: str = ""
    prompt: str = ""            # the question this answers
    media_key: str = ""         # the server's reference to this media for the next turns ("" = none)
    video_bytes_sent: int = 0   # video bytes this turn uploaded (0: a follow-up by media_key that hit)
    reuploaded: bool = False    # the media_key missed and the turn was resent with the bytes
    attempts: int = 1           # tries this turn took (1: no retry; more: retried or restarted on another replica)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_ids"] = list(self.token_ids)
        return d


@dataclass(frozen=True)
class Chunk:
    """One response of the stream. While streaming `text`/`token_ids` are the new piece; for a non-decoupled
    (unary) model the single response carries the whole answer. `final` marks the last response."""

    text: str = ""
    token_ids: Tuple[int, ...] = field(default_factory=tuple)
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish_reason: str = ""
    final: bool = False
    media_key: str = ""         # the server's reference to this media (the same in every response of a call)
    attempt: int = 1            # which try of the call produced it (1 = the first)
    restarted: bool = False     # first chunk of a try after a try that had streamed: drop what came before
