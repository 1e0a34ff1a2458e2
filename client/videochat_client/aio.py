"""asyncio twin of the client (tritonclient.grpc.aio): `AsyncVideoChatClient`, `AsyncConversation`.

Same wire format (protocol.py), same errors (errors.to_error), same retry rule. One difference forced by
tritonclient.grpc.aio: its `stream_infer` cannot ask for the empty final response, so a call ends at the
end of its stream (we send one request and half-close; Triton closes the RPC after the last response)."""
from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any, AsyncIterator, Callable, Dict, Optional, Sequence, Tuple, Union

import grpc
import tritonclient.grpc.aio as tca
from tritonclient.utils import InferenceServerException

from .client import make_config, timeout_parameters
from .conversation import ConversationBase, _gen_kwargs
from .errors import MediaNotCached, VideoChatError, is_retryable, to_error
from .protocol import (NOT_GIVEN, AnswerBuilder, GenerationOptions, MediaOptions, MediaSent, VideoLike,
                       build_inputs, load_media, media_attempts, parse_chunk)
from .retry import RetryPolicy
from .schema import DEFAULTS, MODEL_NAME
from .types import Answer, Chunk


# How long to wait for Triton to close a stream after the request's last response (it closes it at once: we
# half-close after sending the one request) before cancelling it.
_STREAM_END_GRACE_S = 5.0


async def _read_to_end(it, grace_s: float = _STREAM_END_GRACE_S) -> bool:
    """Drain a stream until the server closes it; False if that did not happen within grace_s."""
    async def rest() -> None:
        async for _ in it:
            pass
    try:
        await asyncio.wait_for(rest(), grace_s)
    except asyncio.TimeoutError:
        return False
    except (InferenceServerException, grpc.RpcError):
        pass   # it ended with a status: nothing left to cancel
    return True


class AsyncVideoChatClient:
    """`async with AsyncVideoChatClient(url) as client: conv = client.conversation(video=...)`.
    One channel per URL serves any number of concurrent calls; retries move along the URLs as in the sync
    client."""

    def __init__(self, url: Union[str, Sequence[str]] = "localhost:8001", *, timeout: Optional[float] = 600.0,
                 max_retries: Optional[int] = None, retry_policy: Optional[RetryPolicy] = None,
                 ssl: bool = False, root_certificates: Optional[str] = None, private_key: Optional[str] = None,
                 certificate_chain: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 model_name: str = MODEL_NAME):
        self.config = make_config(url, timeout=timeout, max_retries=max_retries, retry_policy=retry_policy,
                                  ssl=ssl, root_certificates=root_certificates, private_key=private_key,
                                  certificate_chain=certificate_chain, headers=headers, model_name=model_name)
        self._tcs: Dict[str, tca.InferenceServerClient] = {}
        self._sleep = asyncio.sleep   # tests replace it

    async def __aenter__(self) -> "AsyncVideoChatClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        tcs, self._tcs = self._tcs, {}
        for tc in tcs.values():
            await tc.close()

    def _client(self, url: Optional[str] = None) -> tca.InferenceServerClient:
        # Created lazily: a grpc.aio channel belongs to the running event loop.
        url = url or self.config.url
        if url not in self._tcs:
            try:
                self._tcs[url] = tca.InferenceServerClient(**self.config.tritonclient_kwargs(url))
            except (InferenceServerException, grpc.RpcError, OSError) as e:
                raise to_error(e) from e
        return self._tcs[url]

    def conversation(self, video: VideoLike, *, image: bool = False, num_segments: int = DEFAULTS.num_segments, hd_num: int = DEFAULTS.hd_num,
                     padding: bool = False, msg: str = "", instruction: Optional[str] = None,
                     history: Sequence[Tuple[str, str]] = (), session_id: Optional[str] = None,
                     media_reference: bool = True) -> "AsyncConversation":
        media = MediaOptions(image=image, num_segments=num_segments, hd_num=hd_num, padding=padding,
                             msg=msg, instruction=instruction)
        return AsyncConversation(self, video=video, media=media, history=history, session_id=session_id,
                                 media_reference=media_reference)

    async def generate(self, *, video: Optional[VideoLike] = None, prompt: str,
                       history: Sequence[Tuple[str, str]] = (), media: MediaOptions = MediaOptions(),
                       gen: GenerationOptions = GenerationOptions(), timeout=NOT_GIVEN,
                       max_retries: Optional[int] = None, request_id: Optional[str] = None,
                       headers: Optional[Dict[str, str]] = None, media_key: Optional[str] = None,
                       sent: Optional[MediaSent] = None) -> AsyncIterator[Chunk]:
        """Async generator of the responses of one turn (see VideoChatClient.generate: media_key first, the
        bytes once if it missed)."""
        data = None if video is None else load_media(video)
        sent = sent if sent is not None else MediaSent()
        rid = request_id or uuid.uuid4().hex
        deadline = self.config.timeout if timeout is NOT_GIVEN else timeout
        retries = self.config.retry.max_retries if max_retries is None else max_retries
        hdrs = self.config.merged_headers(headers)
        tries = media_attempts(data, media_key)
        for i, (v, key) in enumerate(tries):
            inputs = build_inputs(video=v, media_key=key, prompt=prompt, history=history, media=media, gen=gen)
            try:
                async for chunk in self._with_retries(inputs, len(v or b""), sent, request_id=rid,
                                                      timeout=deadline, retries=retries, headers=hdrs):
                    yield chunk
                return
            except MediaNotCached:   # raised before any response: resending cannot duplicate output
                if i + 1 == len(tries):
                    raise
                sent.reuploaded = True

    async def _with_retries(self, inputs, nbytes: int, sent: MediaSent, *, request_id: str,
                            timeout: Optional[float], retries: int, headers: Dict[str, str]
                            ) -> AsyncIterator[Chunk]:
        for attempt in itertools.count():
            started = False
            sent.video_bytes_sent += nbytes
            try:
                async for chunk in self._attempt(inputs, request_id=request_id, timeout=timeout, headers=headers,
                                                 url=self.config.url_for(attempt)):
                    started = True
                    yield chunk
                return
            except VideoChatError as err:
                if started or attempt >= retries or not is_retryable(err):
                    raise
                if self.config.backoff_before(attempt + 1):
                    await self._sleep(self.config.retry.backoff(attempt))

    async def _attempt(self, inputs, *, request_id: str, timeout: Optional[float], headers: Dict[str, str],
                       url: Optional[str] = None) -> AsyncIterator[Chunk]:
        async def requests():
            yield {"model_name": self.config.model_name, "inputs": inputs, "request_id": request_id,
                   "parameters": timeout_parameters(timeout)}

        ended = False   # the server ended the request (final response or error): no cancel needed
        it = None
        try:
            it = self._client(url).stream_infer(requests(), stream_timeout=timeout, headers=headers or None)
            async for result, error in it:
                if error is not None:   # an in-stream error is the server's last response for this request
                    ended = True
                    raise to_error(error, request_id=request_id)
                chunk = parse_chunk(result)
                yield chunk
                if chunk.final:
                    ended = True
                    break
            ended = True
        except (InferenceServerException, grpc.RpcError) as e:
            raise to_error(e, request_id=request_id) from e
        finally:
            # Cancel only a request the server may still be working on. Cancelling (or dropping) a stream whose
            # request already ended makes Triton 2.51 leak the request's state, input bytes included
            # (docs/operations.md, "Memory and the soak test"), so read such a stream to its end instead.
            if it is not None and not (ended and await _read_to_end(it)):
                it.cancel()

    async def health(self, *, timeout: Optional[float] = 10.0) -> Dict[str, bool]:
        c = self._client()
        hdrs = self.config.merged_headers(None) or None
        try:
            return {
                "live": await c.is_server_live(headers=hdrs, client_timeout=timeout),
                "ready": await c.is_server_ready(headers=hdrs, client_timeout=timeout),
                "model_ready": await c.is_model_ready(self.config.model_name, headers=hdrs,
                                                      client_timeout=timeout),
            }
        except (InferenceServerException, grpc.RpcError) as e:
            raise to_error(e) from e


class AsyncAnswerStream:
    """Async iterator over text pieces; `.answer` once exhausted (then the turn is in the history)."""

    def __init__(self, chunks: Callable[[], AsyncIterator[Chunk]], *, prompt: str, request_id: str,
                 on_done: Callable[[Answer], Answer]):
        self._make_chunks = chunks
        self._prompt = prompt
        self.request_id = request_id
        self._on_done = on_done
        self._pieces = self._run()
        self.answer: Optional[Answer] = None

    async def _run(self) -> AsyncIterator[str]:
        builder = AnswerBuilder(prompt=self._prompt, request_id=self.request_id)
        chunks = self._make_chunks()
        try:
            async for chunk in chunks:
                builder.add(chunk)
                if chunk.text:
                    yield chunk.text
        finally:
            await chunks.aclose()
        self.answer = self._on_done(builder.finish())

    def __aiter__(self) -> "AsyncAnswerStream":
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def __aenter__(self) -> "AsyncAnswerStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncConversation(ConversationBase):
    async def ask(self, question: str, *, max_new_tokens: int = DEFAULTS.max_new_tokens, do_sample: bool = False,
                  temperature: Optional[float] = None, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, repetition_penalty: Optional[float] = None,
                  seed: Optional[int] = None, timeout: Any = NOT_GIVEN) -> Answer:
        stream = self.ask_stream(question, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, seed=seed, timeout=timeout)
        async for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, question: str, *, max_new_tokens: int = DEFAULTS.max_new_tokens, do_sample: bool = False,
                   temperature: Optional[float] = None, top_p: Optional[float] = None,
                   top_k: Optional[int] = None, repetition_penalty: Optional[float] = None,
                   seed: Optional[int] = None, timeout: Any = NOT_GIVEN) -> AsyncAnswerStream:
        kw = self._request(question, _gen_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k,
                                                 repetition_penalty, seed), timeout)
        return AsyncAnswerStream(lambda: self._client.generate(**kw), prompt=question,
                                 request_id=kw["request_id"], on_done=self._on_done(kw))
