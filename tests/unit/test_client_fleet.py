"""The client's fleet behaviour without a server: which errors mean "the replica went away", the restart of a
turn cut mid-answer (the `restarted` chunk flag, AnswerStream's AnswerRestarted, ask's transparent redo, the
same in asyncio), address parsing (lists, gRPC resolver targets), channel options, load-tool connections."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from support.grpc_errors import FakeRpcError
from videochat_client import (AnswerRestarted, AsyncVideoChatClient, InvalidArgument, RetryPolicy, ServerError,
                              Unavailable, VideoChatClient)
from videochat_client.client import parse_urls
from videochat_client.errors import is_replica_lost, is_retryable, to_error
from videochat_client.loadtest import LoadConfig
from videochat_client.protocol import channel_args
from videochat_client.types import Chunk


PIECES = [Chunk(text="a", token_ids=(1,)), Chunk(text="b", token_ids=(2,))]
DONE = Chunk(text="c", token_ids=(3,), prompt_tokens=3, completion_tokens=3, finish_reason="length", final=True)
CUT = ServerError("Stream removed (Data frame with END_STREAM flag received)", code="UNKNOWN")


@pytest.mark.parametrize("err", [
    CUT,
    ServerError("Stream removed (RST_STREAM with error code 2)", code="INTERNAL"),
    to_error(FakeRpcError(grpc.StatusCode.CANCELLED, "Stream removed (Data frame with END_STREAM flag received) "
                                                     "(RST_STREAM (Received RST_STREAM with error code 8))")),
    to_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 502")),
    to_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")),
    Unavailable("in ensemble 'videochat', Server is stopping"),
])
def test_a_cut_or_refused_connection_is_replica_lost(err):
    assert is_replica_lost(err), err


@pytest.mark.parametrize("err", [
    InvalidArgument("bad video"), ServerError("in ensemble 'videochat', Stub process 'x' is not healthy."),
    ServerError("something odd", code="UNKNOWN"), ServerError("deadline exceeded", code="DEADLINE_EXCEEDED"),
    to_error(FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")),
])
def test_request_and_model_errors_are_not_replica_lost(err):
    assert not is_replica_lost(err), err


class ScriptedClient(VideoChatClient):
    """_attempt replaced by a script: one list of chunks/exceptions per attempt; records the URL of each."""

    def __init__(self, script, url="127.0.0.1:1", **kw):
        super().__init__(url, retry_policy=RetryPolicy(max_retries=3, initial_backoff=0.0), **kw)
        self.script, self.urls = list(script), []
        self._sleep = lambda s: None

    def _attempt(self, inputs, *, url=None, **kw):
        self.urls.append(url)
        for item in self.script.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def test_generate_restarts_a_cut_answer_only_when_asked():
    c = ScriptedClient([[*PIECES, CUT], [*PIECES, DONE]], url="a:1,b:1")
    chunks = list(c.generate(video=b"v", prompt="q", restart=True))
    assert [ch.restarted for ch in chunks] == [False, False, True, False, False]
    assert [ch.attempt for ch in chunks] == [1, 1, 2, 2, 2]
    assert c.urls == ["a:1", "b:1"]                     # the new try goes to the next replica
    c = ScriptedClient([[*PIECES, CUT], [*PIECES, DONE]])
    with pytest.raises(ServerError):
        list(c.generate(video=b"v", prompt="q"))       # default: a half-streamed answer is never restarted


def test_a_cut_before_any_response_is_retried_even_without_restart():
    c = ScriptedClient([[CUT], [DONE]])
    assert [ch.attempt for ch in c.generate(video=b"v", prompt="q")] == [2]


def test_ask_redoes_the_turn_and_counts_attempts():
    c = ScriptedClient([[*PIECES, CUT], [Unavailable("refused")], [*PIECES, DONE]])
    conv = c.conversation(b"v")
    answer = conv.ask("q")
    assert answer.text == "abc" and answer.token_ids == (1, 2, 3) and answer.attempts == 3
    assert conv.history == (("q", "abc"),)


def test_ask_stream_raises_answer_restarted_once_then_streams_the_new_answer():
    c = ScriptedClient([[*PIECES, CUT], [*PIECES, DONE]])
    conv = c.conversation(b"v")
    stream = conv.ask_stream("q")
    got = []
    with pytest.raises(AnswerRestarted) as e:
        for piece in stream:
            got.append(piece)
    assert got == ["a", "b"] and e.value.partial_text == "ab" and e.value.attempt == 2 and e.value.code == "ABORTED"
    assert conv.history == ()
    assert list(stream) == ["a", "b", "c"]                # the same stream goes on with the new answer
    assert stream.answer.text == "abc" and stream.restarts == 1 and conv.history == (("q", "abc"),)


def test_a_restart_gives_up_after_max_retries():
    c = ScriptedClient([[PIECES[0], CUT]] * 4)
    with pytest.raises(ServerError):
        c.conversation(b"v").ask("q")


class ScriptedAsync(AsyncVideoChatClient):
    def __init__(self, script, **kw):
        super().__init__("127.0.0.1:1", retry_policy=RetryPolicy(max_retries=3, initial_backoff=0.0), **kw)
        self.script = list(script)

        async def no_sleep(s):
            return None
        self._sleep = no_sleep

    async def _attempt(self, inputs, **kw):
        for item in self.script.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


def test_async_ask_and_ask_stream_restart_the_same_way():
    async def run():
        c = ScriptedAsync([[*PIECES, CUT], [*PIECES, DONE], [*PIECES, CUT], [*PIECES, DONE]])
        conv = c.conversation(b"v")
        answer = await conv.ask("q")
        stream = conv.ask_stream("q2")
        got, restarts = [], 0
        while stream.answer is None:
            try:
                async for piece in stream:
                    got.append(piece)
            except AnswerRestarted:
                restarts, got = restarts + 1, []
        return answer, stream.answer, got, restarts
    answer, second, got, restarts = asyncio.run(run())
    assert answer.text == second.text == "abc" and answer.attempts == 2 and got == ["a", "b", "c"] and restarts == 1


def test_addresses_lists_and_resolver_targets():
    assert parse_urls("a:1, b:2") == ("a:1", "b:2")
    assert parse_urls(["a:1", "b:2"]) == ("a:1", "b:2")
    assert parse_urls("dns:///videochat:8001") == ("dns:///videochat:8001",)
    assert parse_urls("ipv4:10.0.0.5:8001,10.0.0.6:8001") == ("ipv4:10.0.0.5:8001,10.0.0.6:8001",)
    opts = dict(channel_args("dns:///videochat:8001"))
    assert opts["grpc.lb_policy_name"] == "round_robin" and opts["grpc.use_local_subchannel_pool"] == 1
    plain = dict(channel_args("a:1"))
    assert "grpc.lb_policy_name" not in plain and plain["grpc.keepalive_time_ms"] == 30_000
    # at most 2 pings without data: Triton's server closes a connection after more (max_ping_strikes 2)
    assert plain["grpc.http2.max_pings_without_data"] <= 2 and plain["grpc.keepalive_permit_without_calls"] == 0


def test_async_connections_keep_a_session_on_one_and_spread_the_rest():
    c = AsyncVideoChatClient("127.0.0.1:1", connections=4)
    assert len({c._slot({"x-session-id": "s1"}) for _ in range(10)}) == 1
    assert {c._slot(None) for _ in range(8)} == {0, 1, 2, 3}
    assert len({c._slot({"x-session-id": f"s{i}"}) for i in range(64)}) == 4
    with pytest.raises(ValueError):
        AsyncVideoChatClient("127.0.0.1:1", connections=0)
    with pytest.raises(ValueError):
        LoadConfig(url="a:1", videos=["v"], concurrency=[1], connections=0).validate()


def test_retryable_is_unchanged_by_replica_lost():
    assert not is_retryable(CUT) and is_replica_lost(CUT)
