"""Configuration of one `videochat loadtest` run: `LoadConfig`, its validation and the hard caps (`MAX_*`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from ..protocol import MediaOptions
from ..schema import MODEL_NAME
from .stats import DEFAULT_PERCENTILES

# Hard caps: a typo must not start an hour-long or unbounded run.
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024
MAX_RATE = 10_000.0
MAX_LEVELS = 32
MAX_TURNS = 64
MAX_INFLIGHT = 1024
MAX_CONNECTIONS = 256
# Connections per address the sessions are spread over: behind an L4 balancer (a Kubernetes Service, a cloud
# NLB), which places whole connections, one connection would put the whole run on one replica.
DEFAULT_CONNECTIONS = 8

DEFAULT_PROMPTS = (
    "Describe the video in detail.",
    "What is happening in the video?",
    "What objects can you see?",
    "Summarize the video in one sentence.",
)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    videos: Sequence[str]
    concurrency: Sequence[int] = ()
    rate: Sequence[float] = ()
    requests: Optional[int] = None            # per level; default 32 unless duration is given
    duration: Optional[float] = None          # seconds per level (issue no new request after it)
    turns: int = 1
    max_new_tokens: int = 64
    stream: bool = False
    warmup: int = 0
    prompts: Sequence[str] = DEFAULT_PROMPTS
    media: MediaOptions = MediaOptions()
    timeout: float = 300.0                    # per request
    retries: int = 0                          # a load tool measures; it does not hide errors
    max_inflight: int = 256
    level_timeout: float = 600.0              # hard cap per level for request-count mode
    metrics_url: Optional[str] = None
    seed: int = 0
    media_reference: bool = True              # turns 2..N send the media_key, not the bytes (--no-media-reference)
    connections: int = DEFAULT_CONNECTIONS    # gRPC connections per address; a session keeps its own
    # -- observability (docs/loadtest.md) --
    urls: Sequence[str] = ()                  # every replica (workers spread round robin); empty: just `url`
    metrics_urls: Sequence[str] = ()          # one per replica (default: `metrics_url`, or none)
    percentiles: Sequence[float] = DEFAULT_PERCENTILES
    goodput: Optional[Dict[str, float]] = None  # SLO name -> ms (stats.SLO_FIELDS)
    model_name: str = MODEL_NAME
    ssl: bool = False
    root_certificates: Optional[str] = None
    private_key: Optional[str] = None
    certificate_chain: Optional[str] = None
    headers: Tuple[Tuple[str, str], ...] = ()

    @property
    def replicas(self) -> Tuple[str, ...]:
        return tuple(self.urls) or (self.url,)

    def validate(self) -> None:
        if bool(self.concurrency) == bool(self.rate):
            raise ValueError("give exactly one of --concurrency or --rate")
        levels = list(self.concurrency) + list(self.rate)
        if len(levels) > MAX_LEVELS:
            raise ValueError(f"at most {MAX_LEVELS} levels, got {len(levels)}")
        if any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}]")
        if any(not (0 < r <= MAX_RATE) or not math.isfinite(r) for r in self.rate):
            raise ValueError(f"rate must be in (0, {MAX_RATE}]")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be in [1, {MAX_REQUESTS}]")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S}] seconds")
        if not 1 <= self.turns <= MAX_TURNS:
            raise ValueError(f"turns must be in [1, {MAX_TURNS}]")
        if not 1 <= self.max_inflight <= MAX_INFLIGHT:
            raise ValueError(f"max_inflight must be in [1, {MAX_INFLIGHT}]")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be in [1, {MAX_CONNECTIONS}]")
        if not 0 <= self.warmup <= 1000:
            raise ValueError("warmup must be in [0, 1000]")
        if not self.videos:
            raise ValueError("give at least one --video")
        if not self.prompts:
            raise ValueError("give at least one prompt")
        if self.goodput and "ttft_ms" in self.goodput and not self.stream:
            raise ValueError("--goodput ttft_ms needs --stream (without it there is no time to first token)")
        if self.goodput and "itl_ms" in self.goodput and not self.stream:
            raise ValueError("--goodput itl_ms needs --stream")
