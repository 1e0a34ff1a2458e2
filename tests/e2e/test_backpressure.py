"""Backpressure and deadlines through a real server: `python -m videochat serve --max-active 1 --max-queue 2
--request-timeout-s 8` (the launcher's parser and rendering, tiny checkpoint, CPU, free loopback ports), plus the
unary variant of the ensemble for the unary error path.

* a flood while the one slot is busy: 2 requests wait, the other 8 get UNAVAILABLE "server overloaded" at once
  (each refusal timed), a client that retries with backoff gets its answer once the load drops, and the
  overloaded counter equals the refusals the clients saw;
* a retry fails over from a dead address to the live one without sleeping;
* a client deadline stops a running generation (no decode steps after it, the timeout counter says "running")
  and the next request starts at once; a queued request whose deadline passed is never started;
* the server's own request timeout (0.5 s, on a second server) ends a request whose client sent no budget,
  mid-stream, with an error the client maps to DeadlineExceeded; in the unary model the same error arrives as
  CANCELLED with its message;
* a malformed timeout_ms parameter is INVALID_ARGUMENT.
About 90 s on 2 shared cores, most of it the two server starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from support.paths import TINY
from support.server import TritonHandle, free_port, running_server, wait_for
from videochat_client import (DeadlineExceeded, GenerationOptions, InvalidArgument, MediaOptions, RetryPolicy,
                              Unavailable, VideoChatClient)
from videochat_client.errors import to_error

IMAGE = (TINY / "videos" / "example1.mp4").read_bytes()      # as an image: 3 clips, cheap to preprocess
LONG = 60_000      # tokens asked for: more than any deadline here lets run (the answer ends by EOS after ~3,000)
SERVE_FLAGS = ["--device", "cpu", "--max-active", "1", "--max-queue", "2", "--request-timeout-s", "8",
               "--max-new-tokens-limit", str(60_000), "--preprocess-instances", "1"]
LLM = {"model": "videochat_llm"}


class Server(TritonHandle):
    def lib(self, **kw) -> VideoChatClient:                # the library client, no retries unless asked
        if "retry_policy" not in kw:
            kw.setdefault("max_retries", 0)
        return VideoChatClient(self.url, **kw)


@contextlib.contextmanager
def _serving(work: Path, flags: list[str]):
    from videochat.launch import launcher

    opts = launcher.options_from_args(launcher.build_parser().parse_args(flags), TINY)   # the flags' path
    overrides = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
                 if f.name not in ("checkpoint", "device")}
    with running_server(work, **{**overrides, "extra_unary_variant": True}) as h:
        s = Server(h.server, h.url, h.metrics_url)
        ask(s.lib(timeout=120), 4)            # warm up (the first call pays lazy initialisation)
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serving(tmp_path_factory.mktemp("backpressure"), SERVE_FLAGS) as s:
        yield s


# The server-timeout test's own server: its timeout must cut the answer long before the tiny model's greedy
# answer ends by itself (it emits EOS after ~3,000 tokens, which an idle core decodes in ~6 s), on any machine.
SHORT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def short_timeout_server(tmp_path_factory):
    flags = [*SERVE_FLAGS, "--request-timeout-s", str(SHORT_TIMEOUT_S)]   # the later flag wins
    with _serving(tmp_path_factory.mktemp("backpressure-timeout"), flags) as s:
        yield s


def ask(client: VideoChatClient, max_new_tokens: int, **kw):
    with client:
        return client.conversation(IMAGE, image=True).ask("Tell a long story.", max_new_tokens=max_new_tokens, **kw)


def timed(fn):
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
        return exc, time.perf_counter() - t0


def occupy_slot(server: Server, timeout_s: float) -> threading.Thread:
    """A long request in the one slot, ended by its own deadline after `timeout_s`."""
    out = []
    t = threading.Thread(target=lambda: out.append(timed(lambda: ask(server.lib(timeout=timeout_s), LONG))))
    t.out = out
    t.start()
    wait_for(lambda: server.metric("videochat_num_requests_running", **LLM) >= 1, what="the slot to be taken")
    return t


def test_flood_gets_unavailable_at_once_and_a_retry_succeeds_once_load_drops(server):
    overloaded0 = server.metric("videochat_requests_overloaded_total", **LLM)
    assert server.metric("videochat_queue_limit", **LLM) == 2
    blocker = occupy_slot(server, timeout_s=4.0)
    with ThreadPoolExecutor(11) as pool:
        futures = [pool.submit(timed, lambda: ask(server.lib(timeout=60), 20)) for _ in range(10)]
        wait_for(lambda: sum(f.done() for f in futures) >= 8, what="the overflow to be refused")
        # the queue is still full (2 waiting behind the blocker): this client is refused, backs off, retries
        retrier = server.lib(timeout=60, retry_policy=RetryPolicy(max_retries=8, initial_backoff=0.5,
                                                                     max_backoff=2.0))
        sleeps = []
        retrier._sleep = lambda s: (sleeps.append(s), time.sleep(s))
        retried = pool.submit(timed, lambda: ask(retrier, 20))
        assert wait_for(lambda: server.metric("videochat_num_requests_waiting", **LLM) == 2, what="2 queued")
        retried_answer, retried_s = retried.result(timeout=60)
        flood = [f.result(timeout=60) for f in futures]
    blocker.join(60)

    refused = [(r, s) for r, s in flood if isinstance(r, Unavailable)]
    served = [(r, s) for r, s in flood if not isinstance(r, Exception)]
    latencies = sorted(s for _, s in refused)
    print(f"flood of 10 with 1 slot busy and max_queue 2: {len(refused)} refused in "
          f"median {statistics.median(latencies) * 1e3:.0f} ms (max {latencies[-1] * 1e3:.0f} ms); "
          f"{len(served)} served after {min(s for _, s in served):.2f}-{max(s for _, s in served):.2f} s; "
          f"the retrying client: {len(sleeps)} refusals, answer after {retried_s:.2f} s")
    assert len(refused) == 8 and len(served) == 2, [type(r).__name__ for r, _ in flood]
    for err, _ in refused:
        assert err.code == "UNAVAILABLE" and "server overloaded: 2 requests waiting (max_queue 2)" in err.message
    # "at once": every refusal came back before the first waiting request was even started
    assert latencies[-1] < min(s for _, s in served) and latencies[-1] < 2.0
    assert all(r.finish_reason == "length" for r, _ in served)
    assert not isinstance(retried_answer, Exception) and retried_answer.usage.completion_tokens == 20
    assert len(sleeps) >= 1
    assert wait_for(lambda: server.metric("videochat_requests_overloaded_total", **LLM) - overloaded0
                    == 8 + len(sleeps), what="the overloaded counter to count every refusal")


def test_a_retry_fails_over_to_the_next_url_without_sleeping(server):
    client = VideoChatClient([f"127.0.0.1:{free_port()}", server.url], timeout=60, max_retries=1)
    sleeps = []
    client._sleep = sleeps.append
    answer = ask(client, 5)
    assert answer.usage.completion_tokens == 5 and sleeps == []


def test_client_deadline_stops_the_running_generation_and_frees_the_slot(server):
    running0 = server.metric("videochat_requests_deadline_exceeded_total", stage="running", **LLM)
    err, elapsed = timed(lambda: ask(server.lib(timeout=1.5), LONG))
    assert isinstance(err, DeadlineExceeded), err
    wait_for(lambda: server.metric("videochat_requests_deadline_exceeded_total", stage="running", **LLM)
             == running0 + 1, what="the running-deadline counter")
    wait_for(lambda: server.metric("videochat_num_requests_running", **LLM) == 0, what="the slot to be freed")
    steps = server.metric("videochat_decode_steps_total", **LLM)
    time.sleep(1.0)
    assert server.metric("videochat_decode_steps_total", **LLM) == steps     # nothing generates any more
    answer, _ = timed(lambda: ask(server.lib(timeout=60), 5))
    ttft = answer.timings.time_to_first_token_ms
    print(f"deadline 1.5 s: the client gave up after {elapsed:.2f} s; the next request's first token after "
          f"{ttft:.0f} ms")
    assert answer.usage.completion_tokens == 5 and ttft < 1000      # not behind the remaining ~{LONG} tokens


def test_queued_request_past_its_deadline_is_never_started(server):
    queued0 = server.metric("videochat_requests_deadline_exceeded_total", stage="queued", **LLM)
    blocker = occupy_slot(server, timeout_s=3.0)
    err, _ = timed(lambda: ask(server.lib(timeout=1.0), 20))
    assert isinstance(err, DeadlineExceeded), err
    wait_for(lambda: server.metric("videochat_requests_deadline_exceeded_total", stage="queued", **LLM)
             == queued0 + 1, what="the queued-deadline counter")
    assert server.metric("videochat_num_requests_waiting", **LLM) == 0
    blocker.join(30)


def test_server_request_timeout_ends_a_request_without_client_budget(short_timeout_server):
    server = short_timeout_server
    chunks = []
    with server.lib(timeout=None) as client:          # no deadline: no timeout_ms is sent either
        t0 = time.perf_counter()
        with pytest.raises(DeadlineExceeded) as ei:
            for chunk in client.generate(video=IMAGE, prompt="Tell a long story.", media=MediaOptions(image=True),
                                         gen=GenerationOptions(max_new_tokens=LONG)):
                chunks.append(chunk)
        elapsed = time.perf_counter() - t0
    message = ei.value.message
    print(f"server timeout {SHORT_TIMEOUT_S} s: error after {elapsed:.2f} s and {len(chunks)} streamed responses: "
          f"{message}")
    assert re.search(r"deadline exceeded: the server's request timeout \(0\.5 s\) passed after \d+\.\d s; "
                     r"generation stopped after \d+ tokens", message)
    assert chunks and SHORT_TIMEOUT_S <= elapsed < 15.0
    assert not any(c.final for c in chunks)   # cut by the timeout, not finished


def _unary(server: Server, parameters: dict, max_new_tokens: int):
    from videochat_client.protocol import build_inputs

    inputs = build_inputs(video=IMAGE, prompt="Tell a long story.", media=MediaOptions(image=True),
                          gen=GenerationOptions(max_new_tokens=max_new_tokens))
    client = server.client()                    # raw tritonclient: request parameters of our choosing
    try:
        return client.infer("videochat_unary", inputs, parameters=parameters, client_timeout=60)
    finally:
        client.close()


def test_unary_deadline_is_cancelled_with_its_message(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        _unary(server, {"timeout_ms": 1000}, LONG)
    assert ei.value.status() == "StatusCode.CANCELLED"
    assert "deadline exceeded: the client's timeout_ms=1000 passed after 1." in ei.value.message()
    assert isinstance(to_error(ei.value), DeadlineExceeded)
    result = _unary(server, {"timeout_ms": 60_000}, 3)                       # within budget: a normal answer
    assert int(np.asarray(result.as_numpy("completion_tokens")).reshape(-1)[0]) == 3


def test_malformed_timeout_ms_is_invalid_argument(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        _unary(server, {"timeout_ms": "soon"}, 3)
    err = to_error(ei.value)
    assert isinstance(err, InvalidArgument) and "timeout_ms must be a positive integer" in err.message
