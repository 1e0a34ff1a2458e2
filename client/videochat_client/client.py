"""Synchronous client: `VideoChatClient`.

Every call goes over Triton's bidirectional `ModelStreamInfer` RPC (the only RPC a decoupled model answers;
it serves non-decoupled models too), with `enable_empty_final_response=True` so the end of an answer is the
response whose `triton_final_response` parameter is true. tritonclient allows one stream per client object,
so concurrent calls take a tritonclient client from a small pool (gRPC shares the TCP connection between
channels with the same target and arguments).

Every attempt tells the server its time budget (the `timeout_ms` request parameter), so the server stops
generating for a caller that has given up.

A fleet (docs/client.md, "Fleets"): `url` may list several replicas ("a:8001,b:8001" or a list): a call goes to
the first; each retry goes to the next one, at once while there is one not yet tried in this call, with backoff
once all were. `url` may also be one gRPC resolver target ("dns:///videochat:8001", "ipv4:10.0.0.5:8001,..."):
gRPC then spreads the calls round robin over its addresses. Every pooled tritonclient has its own connection,
and one whose call failed because its replica went away is closed, not pooled: a retry never goes back over
it (behind an L4 balancer a new connection may land elsewhere; behind haproxy the balancer moves it).
A retry after part of the answer arrived (its replica was lost mid-answer) happens only when the caller said
it can take it (`generate(restart=True)`): the new try's first chunk has `restarted=True`."""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import grpc
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from .errors import DeadlineExceeded, MediaNotCached, VideoChatError, is_replica_lost, is_retryable, to_error
from .protocol import (NOT_GIVEN, GenerationOptions, MediaOptions, MediaSent, VideoLike, build_inputs, channel_args,
                       is_resolver_target, load_media, media_attempts, parse_chunk)
from .retry import RetryPolicy
from .schema import DEFAULTS, MODEL_NAME, TIMEOUT_MS_PARAMETER
from .types import Chunk

# Extra wait beyond the gRPC deadline before the client gives up on a silent stream itself.
_DEADLINE_GRACE_S = 5.0


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings shared by the sync and asyncio clients."""

    url: str = "localhost:8001"               # the first of `urls`
    timeout: Optional[float] = 600.0          # per attempt, seconds; None = no deadline
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ssl: bool = False
    root_certificates: Optional[str] = None   # PEM file paths, as tritonclient takes them
    private_key: Optional[str] = None
    certificate_chain: Optional[str] = None
    headers: Tuple[Tuple[str, str], ...] = ()
    model_name: str = MODEL_NAME
    urls: Tuple[str, ...] = ()                # every replica; retries move along it (empty: just `url`)

    def url_for(self, attempt: int) -> str:
        urls = self.urls or (self.url,)
        return urls[attempt % len(urls)]

    def backoff_before(self, attempt: int) -> bool:
        """Sleep before `attempt` (1-based retry)? Not while it goes to a replica this call has not tried yet."""
        return attempt >= len(self.urls or (self.url,))

    def tritonclient_kwargs(self, url: Optional[str] = None) -> dict:
        return dict(url=url or self.url, ssl=self.ssl, root_certificates=self.root_certificates,
                    private_key=self.private_key, certificate_chain=self.certificate_chain,
                    channel_args=channel_args(url or self.url))

    def merged_headers(self, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
        h = dict(self.headers)
        h.update(extra or {})
        return h


def parse_urls(url: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """"host:port", "a:8001,b:8001" or a list of them -> the replicas, in order. A gRPC resolver target
    ("dns:///svc:8001", "ipv4:a:8001,b:8001") is one entry, commas included."""
    if isinstance(url, str) and is_resolver_target(url.strip()):
        return (url.strip(),)
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = tuple(u.strip() for u in parts if u.strip())
    if not urls:
        raise ValueError(f"no server address in {url!r}")
    return urls


def timeout_parameters(timeout: Optional[float]) -> Optional[Dict[str, int]]:
    """The request parameters that tell the server this attempt's budget (None: no deadline, none sent)."""
    return None if timeout is None else {TIMEOUT_MS_PARAMETER: max(1, int(timeout * 1000))}


def should_retry(err: VideoChatError, *, attempt: int, retries: int, started: bool, restart: bool) -> bool:
    """Send the call again? Within the retry budget: a retryable error before the first response, or a lost
    replica at any point when the caller can take a restart (the server keeps no state between calls)."""
    if attempt >= retries:
        return False
    if not started:
        return is_retryable(err) or is_replica_lost(err)
    return restart and is_replica_lost(err)


def make_config(url: Union[str, Sequence[str]], *, timeout, max_retries, retry_policy, ssl, root_certificates,
                private_key, certificate_chain, headers, model_name) -> ClientConfig:
    if retry_policy is not None and max_retries is not None:
        raise ValueError("give max_retries or retry_policy, not both")
    policy = retry_policy or RetryPolicy(max_retries=2 if max_retries is None else max_retries)
    urls = parse_urls(url)
    return ClientConfig(url=urls[0], urls=urls, timeout=timeout, retry=policy, ssl=ssl,
                        root_certificates=root_certificates, private_key=private_key,
                        certificate_chain=certificate_chain,
                        headers=tuple((headers or {}).items()), model_name=model_name)


class VideoChatClient:
    """Context-managed sync client for the `videochat` ensemble.

    >>> with VideoChatClient("localhost:8001", timeout=120) as client:
    ...     conv = client.conversation(video="clip.mp4")
    ...     print(conv.ask("What happens?").text)
    """

    def __init__(self, url: Union[str, Sequence[str]] = "localhost:8001", *, timeout: Optional[float] = 600.0,
                 max_retries: Optional[int] = None, retry_policy: Optional[RetryPolicy] = None,
                 ssl: bool = False, root_certificates: Optional[str] = None, private_key: Optional[str] = None,
                 certificate_chain: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 model_name: str = MODEL_NAME):
        self.config = make_config(url, timeout=timeout, max_retries=max_retries,
                                  retry_policy=retry_policy, ssl=ssl, root_certificates=root_certificates,
                                  private_key=private_key, certificate_chain=certificate_chain,
                                  headers=headers, model_name=model_name)
        self._idle: Dict[str, List[tc.InferenceServerClient]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._sleep = time.sleep   # tests replace it

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "VideoChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for pool in idle.values():
            for c in pool:
                c.close()

    def _acquire(self, url: Optional[str] = None) -> tc.InferenceServerClient:
        url = url or self.config.url
        with self._lock:
            if self._closed:
                raise VideoChatError("client is closed", code="CANCELLED")
            if self._idle.get(url):
                return self._idle[url].pop()
        try:
            return tc.InferenceServerClient(**self.config.tritonclient_kwargs(url))
        except (InferenceServerException, grpc.RpcError, OSError) as e:
            raise to_error(e) from e

    def _release(self, c: tc.InferenceServerClient, url: Optional[str] = None) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(url or self.config.url, []).append(c)
                return
        c.close()

    # -- conversations ---------------------------------------------------------------------------------
    def conversation(self, video: VideoLike, *, image: bool = False, num_segments: int = DEFAULTS.num_segments, hd_num: int = DEFAULTS.hd_num,
                     padding: bool = False, msg: str = "", instruction: Optional[str] = None,
                     history: Sequence[Tuple[str, str]] = (), session_id: Optional[str] = None,
                     media_reference: bool = True):
        """A multi-turn conversation about one video (or image). `history` continues an earlier one.
        `media_reference`: follow-ups send the server's `media_key` instead of the bytes (and resend the bytes
        once if it missed); False sends the bytes every turn."""
        from .conversation import Conversation
        media = MediaOptions(image=image, num_segments=num_segments, hd_num=hd_num, padding=padding,
                             msg=msg, instruction=instruction)
        return Conversation(self, video=video, media=media, history=history, session_id=session_id,
                            media_reference=media_reference)

    # -- the one RPC -----------------------------------------------------------------------------------
    def generate(self, *, video: Optional[VideoLike] = None, prompt: str, history: Sequence[Tuple[str, str]] = (),
                 media: MediaOptions = MediaOptions(), gen: GenerationOptions = GenerationOptions(),
                 timeout=NOT_GIVEN, max_retries: Optional[int] = None, request_id: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, media_key: Optional[str] = None,
                 sent: Optional[MediaSent] = None, restart: bool = False) -> Iterator[Chunk]:
        """Low-level: stream the responses of one turn as `Chunk`s (the last has `final=True`).
        Retries retryable errors with backoff until the first response arrived. With `restart=True` it also
        retries after that when the replica was lost mid-answer (`errors.is_replica_lost`): the new try's first
        chunk has `restarted=True`, and the caller drops what it got before.
        With `media_key` (an earlier answer's) and `video`, the key goes first and the bytes only if the server
        answers MediaNotCached, once; with only a `media_key`, MediaNotCached is raised. `sent` records the
        video bytes sent and whether the turn was re-uploaded."""
        data = None if video is None else load_media(video)
        sent = sent if sent is not None else MediaSent()
        rid = request_id or uuid.uuid4().hex
        deadline = self.config.timeout if timeout is NOT_GIVEN else timeout
        retries = self.config.retry.max_retries if max_retries is None else max_retries
        hdrs = self.config.merged_headers(headers)
        tries = media_attempts(data, media_key)
        streamed = [False]   # some try of this call yielded a chunk (shared by the media tries)
        for i, (v, key) in enumerate(tries):
            inputs = build_inputs(video=v, media_key=key, prompt=prompt, history=history, media=media, gen=gen)
            try:
                yield from self._with_retries(inputs, len(v or b""), sent, streamed, request_id=rid,
                                              timeout=deadline, retries=retries, headers=hdrs, restart=restart)
                return
            except MediaNotCached:   # raised before any response of that try: resending cannot duplicate output
                if i + 1 == len(tries):
                    raise
                sent.reuploaded = True

    def _with_retries(self, inputs, nbytes: int, sent: MediaSent, streamed: List[bool], *, request_id: str,
                      timeout: Optional[float], retries: int, headers: Dict[str, str],
                      restart: bool) -> Iterator[Chunk]:
        for attempt in itertools.count():
            started = False
            sent.video_bytes_sent += nbytes
            try:
                for chunk in self._attempt(inputs, request_id=request_id, timeout=timeout, headers=headers,
                                           url=self.config.url_for(attempt)):
                    if attempt or streamed[0]:
                        chunk = dataclasses.replace(chunk, attempt=attempt + 1,
                                                    restarted=streamed[0] and not started)
                    started = streamed[0] = True
                    yield chunk
                return
            except VideoChatError as err:
                if not should_retry(err, attempt=attempt, retries=retries, started=started, restart=restart):
                    raise
                if self.config.backoff_before(attempt + 1):
                    self._sleep(self.config.retry.backoff(attempt))

    def _attempt(self, inputs, *, request_id: str, timeout: Optional[float], headers: Dict[str, str],
                 url: Optional[str] = None) -> Iterator[Chunk]:
        responses: "queue.Queue" = queue.Queue()
        client = self._acquire(url)
        finished = False
        broken = False   # its replica went away or refuses work: do not reuse this connection
        try:
            try:
                client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                    stream_timeout=timeout, headers=headers or None)
                client.async_stream_infer(self.config.model_name, inputs, request_id=request_id,
                                          enable_empty_final_response=True, parameters=timeout_parameters(timeout))
            except (InferenceServerException, grpc.RpcError) as e:
                # A stream that failed at once (e.g. connection refused) makes async_stream_infer say only
                # "the error detail is reported through provided callback": report that detail instead.
                try:
                    _, real = responses.get(timeout=1.0)
                except queue.Empty:
                    real = None
                err = to_error(real or e, request_id=request_id)
                broken = is_retryable(err) or is_replica_lost(err)
                raise err from e
            limit = None if timeout is None else time.monotonic() + timeout + _DEADLINE_GRACE_S
            while True:
                wait = None if limit is None else max(0.0, limit - time.monotonic())
                try:
                    result, error = responses.get(timeout=wait)
                except queue.Empty:
                    raise DeadlineExceeded(f"no response within {timeout} s", request_id=request_id) from None
                if error is not None:
                    # The server ended this request (an in-stream error is its last response) or the RPC is
                    # already gone: close gracefully. Cancelling a stream whose request already failed makes
                    # Triton 2.51 leak the request's state, input bytes included (docs/operations.md, "Memory").
                    finished = True
                    err = to_error(error, request_id=request_id)
                    broken = is_retryable(err) or is_replica_lost(err)
                    raise err
                chunk = parse_chunk(result)
                if chunk.final:
                    finished = True
                yield chunk
                if chunk.final:
                    return
        finally:
            try:
                # Graceful close after the final response or an error from the server; cancel only if the caller
                # stopped early or the client gave up waiting (the server may still be working on it).
                client.stop_stream(cancel_requests=not finished)
            except Exception:  # noqa: BLE001 - closing must not mask the real error
                pass
            if broken:
                client.close()
            else:
                self._release(client, url)

    @contextmanager
    def triton(self) -> Iterator[tc.InferenceServerClient]:
        """Borrow a raw tritonclient client from the pool (Triton's own APIs: model config, load_model)."""
        client = self._acquire()
        try:
            yield client
        finally:
            self._release(client)

    # -- health ----------------------------------------------------------------------------------------
    def health(self, *, timeout: Optional[float] = 10.0) -> Dict[str, bool]:
        """{"live", "ready", "model_ready"} of the first URL; raises Unavailable when it cannot be reached."""
        client = self._acquire()
        try:
            hdrs = self.config.merged_headers(None) or None
            return {
                "live": client.is_server_live(headers=hdrs, client_timeout=timeout),
                "ready": client.is_server_ready(headers=hdrs, client_timeout=timeout),
                "model_ready": client.is_model_ready(self.config.model_name, headers=hdrs, client_timeout=timeout),
            }
        except (InferenceServerException, grpc.RpcError) as e:
            raise to_error(e) from e
        finally:
            self._release(client)
