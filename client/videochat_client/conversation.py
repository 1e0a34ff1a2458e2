"""Conversations: one video, many turns. The server is stateless, so every turn sends the question and the
history (docs/serving.md); the history is a value (tuple of (question, answer)) that only grows when a turn
completed, and it round-trips through JSON so a conversation can continue elsewhere.

The video's bytes go with the first turn; later turns send the `media_key` the server returned instead
(`media_reference=True`, the default), and if that replica no longer holds it (MediaNotCached) the same turn goes
again with the bytes, once (docs/client.md, "Follow-ups without re-upload")."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

from .errors import AnswerRestarted, InvalidArgument
from .protocol import (NOT_GIVEN, AnswerBuilder, GenerationOptions, History, MediaOptions, MediaSent, VideoLike,
                       load_media)
from .schema import DEFAULTS
from .types import Answer, Chunk

JSON_VERSION = 1
SESSION_HEADER = "x-session-id"   # lets a load balancer keep a conversation on one replica (sticky hashing)


def _as_history(history: Sequence[Sequence[str]]) -> History:
    out = []
    for turn in history:
        if len(turn) != 2 or not all(isinstance(x, str) for x in turn):
            raise InvalidArgument(f"history entries must be (question, answer) strings, got {turn!r}")
        out.append((turn[0], turn[1]))
    return tuple(out)


class ConversationBase:
    """State shared by `Conversation` (sync) and `AsyncConversation`: media, history, session id, JSON."""

    def __init__(self, client, *, video: VideoLike, media: MediaOptions = MediaOptions(),
                 history: Sequence[Sequence[str]] = (), session_id: Optional[str] = None,
                 media_reference: bool = True, media_key: Optional[str] = None):
        self._client = client
        self.video_path: Optional[str] = None if isinstance(video, (bytes, bytearray, memoryview)) \
            else os.fspath(video)
        self._video = load_media(video)
        self.media = media
        self._history: History = _as_history(history)
        self.session_id = session_id or uuid.uuid4().hex
        self.last_answer: Optional[Answer] = None
        self.media_reference = media_reference
        self.media_key: Optional[str] = media_key if media_reference else None   # the server's, once it gave one
        self.video_bytes_sent = 0     # over all turns
        self.reuploads = 0            # turns whose media_key missed and went again with the bytes

    @property
    def history(self) -> History:
        return self._history

    def _record(self, answer: Answer, sent: MediaSent) -> Answer:
        answer = replace(answer, video_bytes_sent=sent.video_bytes_sent, reuploaded=sent.reuploaded)
        self._history = self._history + ((answer.prompt, answer.text),)
        self.last_answer = answer
        self.video_bytes_sent += sent.video_bytes_sent
        self.reuploads += int(sent.reuploaded)
        if self.media_reference:
            self.media_key = answer.media_key or None   # "": this replica keeps nothing, send bytes next time
        return answer

    def _request(self, question: str, gen_kwargs: Dict[str, Any], timeout) -> Dict[str, Any]:
        kw: Dict[str, Any] = dict(video=self._video, prompt=question, history=self._history, media=self.media,
                                  gen=GenerationOptions(**gen_kwargs), headers={SESSION_HEADER: self.session_id},
                                  request_id=uuid.uuid4().hex, media_key=self.media_key, sent=MediaSent(),
                                  restart=True)
        if timeout is not NOT_GIVEN:
            kw["timeout"] = timeout
        return kw

    def _on_done(self, kw: Dict[str, Any]) -> Callable[[Answer], Answer]:
        return lambda answer: self._record(answer, kw["sent"])

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Everything but the video bytes (the file path is kept when the conversation was made from one)."""
        return {"version": JSON_VERSION, "session_id": self.session_id, "video": self.video_path,
                "media": asdict(self.media), "history": [list(t) for t in self._history],
                "media_key": self.media_key}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: Union[str, bytes, Dict[str, Any]], client, *, video: Optional[VideoLike] = None,
                  media_reference: bool = True):
        """Continue a saved conversation with `client`; `video` overrides the saved path. A saved media_key is
        tried first (it misses on another or a restarted server, and the bytes go instead)."""
        d = json.loads(data) if isinstance(data, (str, bytes)) else dict(data)
        if d.get("version") != JSON_VERSION:
            raise InvalidArgument(f"unsupported conversation JSON version {d.get('version')!r}")
        src = video if video is not None else d.get("video")
        if src is None:
            raise InvalidArgument("the saved conversation has no video path; pass video=...")
        return cls(client, video=src, media=MediaOptions(**d.get("media", {})), history=d.get("history", ()),
                   session_id=d.get("session_id"), media_reference=media_reference, media_key=d.get("media_key"))


def _gen_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed) -> Dict[str, Any]:
    return dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)


class _Restart:
    """Marker in a stream's pieces: the answer starts again (its replica was lost mid-answer)."""

    def __init__(self, partial_text: str, attempt: int):
        self.partial_text, self.attempt = partial_text, attempt


def restart_error(marker: _Restart, request_id: str) -> AnswerRestarted:
    return AnswerRestarted(f"the replica was lost mid-answer; the answer restarts from the beginning "
                           f"(try {marker.attempt}); {len(marker.partial_text)} characters already streamed are void",
                           partial_text=marker.partial_text, attempt=marker.attempt, request_id=request_id)


def stream_pieces(builder: AnswerBuilder, chunk: Chunk) -> Iterator[Union[str, _Restart]]:
    """What one chunk adds to a stream of pieces: a restart marker first if the answer starts again."""
    if chunk.restarted:
        yield _Restart("".join(builder.pieces), chunk.attempt)
    builder.add(chunk)
    if chunk.text:
        yield chunk.text


class AnswerStream:
    """Iterator over the text pieces of one answer. When exhausted, `.answer` holds the typed Answer and the
    turn is in the conversation's history. `close()` (or leaving a `with` block early) cancels the call.

    If the replica answering is lost mid-answer, the turn is sent again (to another replica) and the iteration
    raises `AnswerRestarted` once: what was streamed so far is void. Iterating the same stream again yields the
    new answer from its first piece; not catching it ends the turn (nothing is added to the history)."""

    def __init__(self, chunks: Callable[[], Iterator[Chunk]], *, prompt: str, request_id: str,
                 on_done: Callable[[Answer], Answer]):
        self._make_chunks = chunks
        self._prompt = prompt
        self.request_id = request_id
        self._on_done = on_done
        self._chunks: Optional[Iterator[Chunk]] = None
        self._pieces = self._run()
        self.answer: Optional[Answer] = None
        self.restarts = 0

    def _run(self) -> Iterator[Union[str, _Restart]]:
        builder = AnswerBuilder(prompt=self._prompt, request_id=self.request_id)
        self._chunks = self._make_chunks()
        for chunk in self._chunks:
            yield from stream_pieces(builder, chunk)
        self.answer = self._on_done(builder.finish())

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        if isinstance(piece, _Restart):
            self.restarts += 1
            raise restart_error(piece, self.request_id)
        return piece

    def close(self) -> None:
        self._pieces.close()
        if self._chunks is not None and hasattr(self._chunks, "close"):
            self._chunks.close()

    def __enter__(self) -> "AnswerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Conversation(ConversationBase):
    """Sync conversation; made by `VideoChatClient.conversation(...)` or `Conversation.from_json(...)`."""

    def ask(self, question: str, *, max_new_tokens: int = DEFAULTS.max_new_tokens, do_sample: bool = False,
            temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
            repetition_penalty: Optional[float] = None, seed: Optional[int] = None, timeout=NOT_GIVEN) -> Answer:
        """One turn; returns the whole Answer and appends (question, answer.text) to the history. If the replica
        is lost mid-answer, the whole turn is redone on another one (`answer.attempts` counts the tries)."""
        stream = self.ask_stream(question, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty, seed=seed, timeout=timeout)
        while stream.answer is None:
            try:
                for _ in stream:
                    pass
            except AnswerRestarted:
                continue
        return stream.answer

    def ask_stream(self, question: str, *, max_new_tokens: int = DEFAULTS.max_new_tokens, do_sample: bool = False,
                   temperature: Optional[float] = None, top_p: Optional[float] = None,
                   top_k: Optional[int] = None, repetition_penalty: Optional[float] = None,
                   seed: Optional[int] = None, timeout=NOT_GIVEN) -> AnswerStream:
        """One turn, streamed: iterate for text pieces; the history is updated once the stream is exhausted."""
        kw = self._request(question, _gen_kwargs(max_new_tokens, do_sample, temperature, top_p, top_k,
                                                 repetition_penalty, seed), timeout)
        return AnswerStream(lambda: self._client.generate(**kw), prompt=question, request_id=kw["request_id"],
                            on_done=self._on_done(kw))
