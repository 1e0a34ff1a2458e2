"""videochat_client without a server: error mapping, retry policy and retry loop, request tensors, response
parsing, conversation JSON, Prometheus parsing, load-report summary, CLI exit codes for local/unreachable
failures. Fast and hermetic (an unreachable port on loopback is the only network use)."""
from __future__ import annotations

import dataclasses
import json
import random
import socket
import struct

import grpc
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException

from support.grpc_errors import FakeRpcError
from videochat_client import (Cancelled, DeadlineExceeded, InvalidArgument, RetryPolicy, ServerError, Unavailable,
                              VideoChatClient, VideoChatError)
from videochat_client import cli
from videochat_client.conversation import Conversation
from videochat_client.errors import classify_message, is_retryable, to_error
from videochat_client.loadtest import Record, csv_rows, default_metrics_url, summarize
from videochat_client.metrics import parse_prometheus, server_view
from videochat_client.protocol import GenerationOptions, MediaOptions, build_inputs, parse_chunk
from videochat_client.types import Chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, cls, code", [
    (FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad video: x"), InvalidArgument, "INVALID_ARGUMENT"),
    (FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"), Unavailable, "UNAVAILABLE"),
    (FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled"), Cancelled, "CANCELLED"),
    (FakeRpcError(grpc.StatusCode.INTERNAL, "boom"), ServerError, "INTERNAL"),
    (FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "ModelInfer RPC doesn't support"), ServerError, "UNIMPLEMENTED"),
    (FakeRpcError(grpc.StatusCode.NOT_FOUND,
                  "Request for unknown model: 'videochat' has no available versions"), Unavailable, "NOT_FOUND"),
    (InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"), InvalidArgument, "INVALID_ARGUMENT"),
    # in-stream errors carry no status (Triton drops it): recovered from the message
    (InferenceServerException("in ensemble 'videochat', bad video: not a recognizable video or image format"),
     InvalidArgument, "INVALID_ARGUMENT"),
    (InferenceServerException("Request for unknown model: 'videochat' is not found"), Unavailable, "NOT_FOUND"),
    (InferenceServerException("in ensemble 'videochat', Stub process 'videochat_llm_0_0' is not healthy."),
     ServerError, "INTERNAL"),
    (InferenceServerException("something odd"), ServerError, "UNKNOWN"),
])
def test_to_error_keeps_status_and_message(exc, cls, code):
    err = to_error(exc, request_id="r1")
    assert type(err) is cls and err.code == code and err.request_id == "r1"
    assert err.message and err.message in str(err) and str(err).startswith(code)


def test_classify_raise_in_model_is_internal_even_with_user_words():
    msg = ("Failed to process the request(s) for model 'x', message: ValueError: invalid literal\n\nAt:\n  model.py(3)")
    assert classify_message(msg) == "INTERNAL"


def test_only_unavailable_and_draining_not_found_are_retryable():
    assert is_retryable(Unavailable("x"))
    assert is_retryable(to_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'v' has no "
                                                                          "available versions")))
    assert not is_retryable(to_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "session unknown")))
    for e in (InvalidArgument("x"), ServerError("x"), DeadlineExceeded("x"), Cancelled("x")):
        assert not is_retryable(e)


# -- retry policy -----------------------------------------------------------------------------------------
def test_backoff_grows_exponentially_with_bounded_jitter():
    p = RetryPolicy(max_retries=5, initial_backoff=0.5, max_backoff=3.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    for k, base in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        for _ in range(20):
            assert base * 0.5 <= p.backoff(k, rng=rng) <= base
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2)


class ScriptedClient(VideoChatClient):
    """_attempt replaced by a script: a list of outcomes, one per attempt (an exception, or chunks then maybe an
    exception)."""

    def __init__(self, script, **kw):
        super().__init__("127.0.0.1:1", retry_policy=RetryPolicy(max_retries=3, initial_backoff=0.01), **kw)
        self.script, self.attempts, self.sleeps = list(script), 0, []
        self._sleep = self.sleeps.append

    def _attempt(self, inputs, **kw):
        self.attempts += 1
        for item in self.script.pop(0):
            if isinstance(item, Exception):
                raise item
            yield item


DONE = Chunk(text="hi", token_ids=(5,), prompt_tokens=3, completion_tokens=1, finish_reason="stop", final=True)


def test_retries_unavailable_before_first_token_then_succeeds():
    c = ScriptedClient([[Unavailable("down")], [Unavailable("down")], [DONE]])
    assert list(c.generate(video=b"v", prompt="q")) == [dataclasses.replace(DONE, attempt=3)]
    assert c.attempts == 3 and len(c.sleeps) == 2 and c.sleeps[0] <= 0.01 and c.sleeps[1] <= 0.02


def test_gives_up_after_max_retries():
    c = ScriptedClient([[Unavailable("down")]] * 4)
    with pytest.raises(Unavailable):
        list(c.generate(video=b"v", prompt="q"))
    assert c.attempts == 4


def test_no_retry_after_a_token_or_for_invalid_argument():
    partial = Chunk(text="h", token_ids=(1,))
    c = ScriptedClient([[partial, Unavailable("replica died")], [DONE]])
    with pytest.raises(Unavailable):
        list(c.generate(video=b"v", prompt="q"))
    assert c.attempts == 1
    c = ScriptedClient([[InvalidArgument("bad video")], [DONE]])
    with pytest.raises(InvalidArgument):
        list(c.generate(video=b"v", prompt="q"))
    assert c.attempts == 1


def test_unreachable_server_is_unavailable_after_retries():
    client = VideoChatClient(f"127.0.0.1:{free_port()}", timeout=10,
                             retry_policy=RetryPolicy(max_retries=2, initial_backoff=0.01))
    calls = []
    client._sleep = calls.append
    with client, pytest.raises(Unavailable) as ei:
        client.conversation(b"not a video").ask("hi")
    assert ei.value.code == "UNAVAILABLE" and len(calls) == 2


# -- protocol -----------------------------------------------------------------------------------------------
def test_build_inputs_shapes_types_and_optional_omission():
    ins = build_inputs(video=b"\x00\x01", prompt="héllo", history=(("q", "a"),),
                       media=MediaOptions(padding=True, instruction="watch"), gen=GenerationOptions(max_new_tokens=7))
    by = {i.name(): i for i in ins}
    assert set(by) == {"video", "prompt", "history", "instruction", "image", "num_segments", "hd_num", "padding",
                       "max_new_tokens", "do_sample"}
    assert all(i.shape() == [1, 1] for i in ins)
    assert by["padding"].datatype() == "BOOL" and by["num_segments"].datatype() == "INT32"
    assert by["video"].datatype() == "BYTES"
    ins2 = build_inputs(video=b"v", prompt="q", gen=GenerationOptions(temperature=0.5, seed=3, do_sample=True))
    names = {i.name() for i in ins2}
    assert {"temperature", "seed"} <= names and "history" not in names and "msg" not in names
    assert next(i for i in ins2 if i.name() == "seed").datatype() == "INT64"
    with pytest.raises(InvalidArgument):
        GenerationOptions(max_new_tokens=0)


def _bytes_tensor(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b   # Triton's BYTES wire format: length-prefixed elements


def _result(text: bytes, ids, final: bool, finish: bytes = b"", with_param=True) -> InferResult:
    r = service_pb2.ModelInferResponse(model_name="videochat", id="rid")
    tensors = [("text", "BYTES", [1, 1], _bytes_tensor(text)),
               ("token_ids", "INT32", [1, len(ids)], np.array(ids, dtype=np.int32).tobytes()),
               ("prompt_tokens", "INT32", [1, 1], np.array([352], dtype=np.int32).tobytes()),
               ("completion_tokens", "INT32", [1, 1], np.array([len(ids)], dtype=np.int32).tobytes()),
               ("finish_reason", "BYTES", [1, 1], _bytes_tensor(finish))]
    for name, dt, shape, raw in tensors:
        out = r.outputs.add()
        out.name, out.datatype = name, dt
        out.shape.extend(shape)
        r.raw_output_contents.append(raw)
    if with_param:
        r.parameters["triton_final_response"].bool_param = final
    return InferResult(r)


def test_parse_chunk_and_final_flag():
    c = parse_chunk(_result("hé".encode(), [4, 5], final=False))
    assert c == Chunk(text="hé", token_ids=(4, 5), prompt_tokens=352, completion_tokens=2, finish_reason="",
                      final=False)
    assert parse_chunk(_result(b"", [], final=True, finish=b"stop")).final
    # content response marked finished but not final (an empty final response follows)
    assert not parse_chunk(_result(b"x", [1], final=False, finish=b"stop")).final
    # no parameter at all (old server): the response with finish_reason is the last
    assert parse_chunk(_result(b"x", [1], final=False, finish=b"length", with_param=False)).final


# -- conversation JSON ----------------------------------------------------------------------------------------
def test_history_round_trips_through_json(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"fake")
    conv = Conversation(None, video=str(video), media=MediaOptions(padding=True, msg="m"),
                        history=[("q1", "a1"), ("q2", "a2")])
    again = Conversation.from_json(conv.to_json(), client=None)
    assert again.history == (("q1", "a1"), ("q2", "a2")) and again.media == conv.media
    assert again.session_id == conv.session_id and again._video == b"fake"
    with pytest.raises(InvalidArgument):
        Conversation(None, video=b"x", history=[("only question",)])
    with pytest.raises(InvalidArgument):
        Conversation.from_json(Conversation(None, video=b"x").to_json(), client=None)   # no path saved


# -- metrics -------------------------------------------------------------------------------------------------
PROM_BEFORE = """# TYPE nv_inference_count counter
nv_inference_count{model="videochat_llm",version="1"} 10
nv_inference_exec_count{model="videochat_llm",version="1"} 10
nv_inference_request_success{model="videochat_llm",version="1"} 10
nv_inference_queue_duration_us{model="videochat_llm",version="1"} 1000
# TYPE videochat_tokens_generated_total counter
videochat_tokens_generated_total 100
# TYPE videochat_batch_size histogram
videochat_batch_size_bucket{le="1"} 10
videochat_batch_size_sum 10
videochat_batch_size_count 10
# TYPE videochat_active_requests gauge
videochat_active_requests 0
"""
PROM_AFTER = PROM_BEFORE.replace(" 10\nnv_inference_exec_count{model=\"videochat_llm\",version=\"1\"} 10",
                                 " 30\nnv_inference_exec_count{model=\"videochat_llm\",version=\"1\"} 15") \
    .replace("request_success{model=\"videochat_llm\",version=\"1\"} 10",
             "request_success{model=\"videochat_llm\",version=\"1\"} 30") \
    .replace("queue_duration_us{model=\"videochat_llm\",version=\"1\"} 1000",
             "queue_duration_us{model=\"videochat_llm\",version=\"1\"} 41000") \
    .replace("videochat_tokens_generated_total 100", "videochat_tokens_generated_total 180") \
    .replace("videochat_batch_size_sum 10", "videochat_batch_size_sum 50") \
    .replace("videochat_batch_size_count 10", "videochat_batch_size_count 20") \
    .replace("videochat_active_requests 0", "videochat_active_requests 2")


def test_server_view_from_two_scrapes():
    view = server_view(parse_prometheus(PROM_BEFORE), parse_prometheus(PROM_AFTER))
    m = view["models"]["videochat_llm"]
    assert m["inference_count"] == 20 and m["exec_count"] == 5 and m["avg_batch_size"] == 4
    assert m["avg_queue_ms"] == pytest.approx(40000 / 20 / 1e3)
    cu = view["custom"]
    assert cu["videochat_tokens_generated_total"] == 80 and cu["videochat_active_requests"] == 2
    assert cu["videochat_batch_size_mean"] == pytest.approx(40 / 10)


# -- load report --------------------------------------------------------------------------------------------------
def test_summarize_counts_errors_and_percentiles():
    recs = [Record(start=0.0, end=1.0, turn=0, latency_ms=100.0, ttft_ms=10.0, itl_ms=5.0, output_tokens=10),
            Record(start=0.5, end=2.0, turn=0, latency_ms=300.0, ttft_ms=30.0, itl_ms=7.0, output_tokens=20),
            Record(start=1.0, end=1.1, turn=0, error="INVALID_ARGUMENT", error_message="bad video")]
    s = summarize(recs)
    assert s["requests"] == 3 and s["successful_requests"] == 2 and s["errors"] == {"INVALID_ARGUMENT": 1}
    assert s["duration_s"] == 2.0 and s["requests_per_second"] == 1.0 and s["output_tokens_per_second"] == 15.0
    assert s["latency_ms"]["p50"] == 200.0 and s["time_to_first_token_ms"]["p50"] == 20.0
    row = csv_rows({"levels": [{"concurrency": 2, "mode": "closed", **s}]})[0]
    assert row["errors"] == "INVALID_ARGUMENT=1" and row["latency_ms_p50"] == 200.0
    assert default_metrics_url("10.0.0.5:8001") == "http://10.0.0.5:8002/metrics"


# -- CLI exit codes without a server ------------------------------------------------------------------------------------
def test_cli_exit_codes_without_server(tmp_path, capsys):
    url = f"127.0.0.1:{free_port()}"
    assert cli.main(["health", "--url", url]) == 3
    assert cli.main(["ask", "--url", url, "--retries", "0", str(tmp_path / "missing.mp4"), "q"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    assert cli.main(["ask", "--url", url, "--retries", "0", str(video), "q"]) == 3
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["ask", "--url", url])
    assert e.value.code == 2


def test_error_str_is_status_then_message():
    assert str(VideoChatError("m", code="X")) == "X: m"
