"""Wire format of the `videochat` ensemble (docs/serving.md), shared by the sync and asyncio clients:
request tensors from typed options, responses to `Chunk`s, chunks to one `Answer`.

Every tensor carries the leading batch dimension of 1 (the ensemble has max_batch_size > 0):
BYTES/BOOL/INT/FP scalars are [1, 1]."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import triton_to_np_dtype

from . import schema
from .errors import InvalidArgument, ServerError
from .schema import DEFAULTS, MediaOptions
from .types import Answer, Chunk, Timings, Usage

NOT_GIVEN: Any = object()   # "use the client's default" for per-call options such as timeout
# gRPC's hard ceiling for one message is 2 GiB - 1; keep headroom for the other tensors and framing.
MAX_VIDEO_BYTES = 2**31 - 1 - 16 * 2**20
# tritonclient's default already is the ceiling, but we set it explicitly: large videos must upload.
# Keepalive: while a call runs, ping after 30 s without traffic and drop the connection if no answer comes in
# 10 s (a replica that vanished without closing its sockets, e.g. its machine died), so the call fails and is
# retried instead of hanging until its deadline. At most 2 pings without data in between: Triton's gRPC server
# (min_recv_ping_interval_without_data 5 min, max_ping_strikes 2) would close a connection that pings more.
# No pings on idle connections (a dead idle connection fails its next call fast, and that is retried).
# Own connection per client object (use_local_subchannel_pool): gRPC would otherwise share one TCP connection
# between all channels to the same target, so a whole process would land on one replica behind an L4 balancer
# and a retry on a fresh channel would go back over the very connection that failed.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.use_local_subchannel_pool", 1),
    # A restarted replica behind dns:/// is used again within seconds (gRPC's default backoff grows to 2 min).
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
# gRPC name-resolver schemes: such a target may stand for several replicas (dns:///svc:8001 resolves to every
# address of svc; ipv4:10.0.0.5:8001,10.0.0.6:8001 lists them); calls are spread over them per call.
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
BALANCED_CHANNEL_ARGS = [("grpc.lb_policy_name", "round_robin")]


def is_resolver_target(url: str) -> bool:
    return url.startswith(RESOLVER_SCHEMES)


def channel_args(url: str) -> list:
    """The gRPC channel options for one target: round robin over a resolver target's addresses."""
    return list(CHANNEL_ARGS) + (list(BALANCED_CHANNEL_ARGS) if is_resolver_target(url) else [])


History = Tuple[Tuple[str, str], ...]
VideoLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling knobs; None = server default (docs/serving.md). Greedy unless do_sample."""

    max_new_tokens: int = DEFAULTS.max_new_tokens
    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        # Only type/sanity checks; the server owns the limits and says so with INVALID_ARGUMENT.
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise InvalidArgument(f"{name} must be a finite number, got {v!r}")


def load_media(video: VideoLike) -> bytes:
    """File path or bytes -> bytes. A missing/unreadable/oversized file is InvalidArgument (caller's input)."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    else:
        try:
            with open(os.fspath(video), "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidArgument(f"cannot read video file {os.fspath(video)!r}: {e.strerror}", code="INVALID_ARGUMENT")
    if len(data) > MAX_VIDEO_BYTES:
        raise InvalidArgument(f"video is {len(data)} bytes; one gRPC message holds at most {MAX_VIDEO_BYTES}")
    return data


@dataclass
class MediaSent:
    """What one turn sent, filled in by `generate` (the conversation copies it into the Answer)."""

    video_bytes_sent: int = 0
    reuploaded: bool = False     # the media_key missed (MediaNotCached) and the turn went again with the bytes


def media_attempts(video: Optional[bytes], media_key: Optional[str]
                   ) -> List[Tuple[Optional[bytes], Optional[str]]]:
    """(video, media_key) of each try of one turn: with bytes and a key, first the key alone, then, only if it
    missed, the bytes (with the stale key, so the server counts a re-upload); else just what was given."""
    if video is None and not media_key:
        raise InvalidArgument("give the video (bytes or a file) or a media_key")
    if video is not None and media_key:
        return [(None, media_key), (video, media_key)]
    return [(video, media_key or None)]


def build_inputs(*, video: Optional[bytes], prompt: str, history: Sequence[Tuple[str, str]] = (),
                 media: MediaOptions = MediaOptions(), gen: GenerationOptions = GenerationOptions(),
                 media_key: Optional[str] = None) -> List[InferInput]:
    """The request tensors for one turn, in schema order. Inputs left at None are not sent (server default)."""
    if not isinstance(prompt, str):
        raise InvalidArgument(f"question must be a str, got {type(prompt).__name__}")
    values = {
        "video": video, "media_reference": media_key or None, "prompt": prompt,
        "history": json.dumps([[q, a] for q, a in history], ensure_ascii=False) if history else None,
        "msg": media.msg or None, "instruction": media.instruction, "image": media.image,
        "num_segments": media.num_segments, "hd_num": media.hd_num, "padding": media.padding,
        "max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "temperature": gen.temperature,
        "top_p": gen.top_p, "top_k": gen.top_k, "repetition_penalty": gen.repetition_penalty, "seed": gen.seed,
    }
    inputs = []
    for field in schema.INPUTS:
        value = values[field.name]
        if value is None:
            continue
        if isinstance(value, str):
            value = value.encode("utf-8")
        t = InferInput(field.name, [1, *field.dims], field.triton_type)
        t.set_data_from_numpy(np.array([[value]], dtype=triton_to_np_dtype(field.triton_type)))
        inputs.append(t)
    return inputs


def _first(result: InferResult, name: str):
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return None
    return arr.reshape(-1)[0]


def parse_chunk(result: InferResult) -> Chunk:
    """One stream response -> Chunk; `final` from the `triton_final_response` parameter. (Callers that cannot
    ask for the empty final response, i.e. tritonclient.grpc.aio, end at the end of the stream instead.)"""
    text = _first(result, "text")
    ids = result.as_numpy("token_ids")
    prompt_tokens = _first(result, "prompt_tokens")
    completion_tokens = _first(result, "completion_tokens")
    finish = _first(result, "finish_reason")
    key = _first(result, "media_key")   # absent from servers older than the output
    finish_reason = finish.decode("utf-8") if isinstance(finish, bytes) else (finish or "")
    params = result.get_response().parameters
    final_param = params["triton_final_response"].bool_param if "triton_final_response" in params else None
    # Without the parameter (an old server) the response that carries finish_reason is the last one.
    final = bool(final_param) if final_param is not None else bool(finish_reason)
    return Chunk(
        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else (text or ""),
        token_ids=tuple(int(i) for i in ids.reshape(-1)) if ids is not None else (),
        prompt_tokens=int(prompt_tokens) if prompt_tokens is not None else None,
        completion_tokens=int(completion_tokens) if completion_tokens is not None else None,
        finish_reason=finish_reason,
        final=final,
        media_key=key.decode("utf-8", errors="replace") if isinstance(key, bytes) else "",
    )


class AnswerBuilder:
    """Accumulates the chunks of one call into an Answer, with client-side timings."""

    def __init__(self, *, prompt: str = "", request_id: str = ""):
        self.prompt = prompt
        self.request_id = request_id
        self.t0 = time.perf_counter()
        self.t_first: Optional[float] = None
        self.pieces: List[str] = []
        self.token_ids: List[int] = []
        self.prompt_tokens = 0
        self.completion_tokens: Optional[int] = None
        self.finish_reason = ""
        self.media_key = ""
        self.attempts = 1

    @property
    def started(self) -> bool:
        """True once any response arrived (from then on a retry would duplicate output)."""
        return self.t_first is not None or bool(self.pieces)

    def add(self, chunk: Chunk) -> None:
        if chunk.restarted:   # the answer starts again (another replica): drop the void part, keep t0
            self.t_first, self.pieces, self.token_ids = None, [], []
            self.prompt_tokens, self.completion_tokens, self.finish_reason = 0, None, ""
        self.attempts = max(self.attempts, chunk.attempt)
        if self.t_first is None and (chunk.text or chunk.token_ids):
            self.t_first = time.perf_counter()
        if chunk.text:
            self.pieces.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.media_key:
            self.media_key = chunk.media_key

    def finish(self) -> Answer:
        if not self.finish_reason:
            raise ServerError("stream ended without a finish_reason (incomplete answer)", request_id=self.request_id)
        t_end = time.perf_counter()
        completion = self.completion_tokens if self.completion_tokens is not None else len(self.token_ids)
        latency = (t_end - self.t0) * 1e3
        ttft = (self.t_first - self.t0) * 1e3 if self.t_first is not None else None
        itl = (latency - ttft) / (completion - 1) if ttft is not None and completion > 1 else None
        return Answer(
            text="".join(self.pieces),
            token_ids=tuple(self.token_ids),
            usage=Usage(self.prompt_tokens, completion, self.prompt_tokens + completion),
            timings=Timings(latency_ms=latency, time_to_first_token_ms=ttft, inter_token_latency_ms=itl),
            finish_reason=self.finish_reason,
            request_id=self.request_id,
            prompt=self.prompt,
            media_key=self.media_key,
            attempts=self.attempts,
        )
