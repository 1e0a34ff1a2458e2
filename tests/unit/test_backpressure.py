"""Backpressure and deadlines in the scheduler (videochat/serving/scheduler.py), without Triton or a model: a fake
engine, list sinks and a fake clock. Checks: a job that finds the queue full is refused at once with UNAVAILABLE
(and a burst into an idle scheduler is not); a queued job whose deadline passed is never added and frees its
place; a running job past its deadline leaves the batch and its slot goes to the next one; the deadline is the
earlier of the client's timeout_ms and the server's request timeout. Also the parsing of the timeout_ms request
parameter, the settings and flags that carry the limits, and the client's mapping of the errors' messages."""
from __future__ import annotations

import dataclasses

import pytest

from support.fake_engine import FakeEngine
from support.fakes import ListSink
from support.paths import TINY
from videochat.serving.requests import RequestError, parse_timeout_ms
from videochat.serving.scheduler import DEADLINE, UNAVAILABLE, Job, Scheduler, deadline_for


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def job(n=3, timeout_ms=None):
    return Job(chat_request={"n": n}, sink=ListSink(), timeout_ms=timeout_ms)


def test_full_queue_refuses_at_once_with_unavailable():
    s = Scheduler(FakeEngine, max_active=1, max_queue=2)
    running = job(100)
    s.submit([running])
    s.run_once()                                   # admitted: the one slot is taken
    waiting = [job(), job()]
    s.submit(waiting)
    overflow = job()
    s.submit([overflow])                           # refused inside submit: no loop iteration needed
    assert overflow.sink.responses == [(
        "error", "unavailable: server overloaded: 2 requests waiting (max_queue 2); retry later or elsewhere",
        UNAVAILABLE)]
    assert s.num_queued == 2 and s.stats.overloaded == 1
    assert all(not j.sink.responses for j in waiting)
    assert overflow.done and overflow.chat_request not in s.engine.added


def test_a_burst_into_free_slots_is_not_refused():
    s = Scheduler(FakeEngine, max_active=4, max_queue=1)
    burst = [job() for _ in range(6)]              # 4 free slots + 1 queue place: the 6th is one too many
    s.submit(burst)
    assert [bool(j.sink.responses) for j in burst] == [False] * 5 + [True]
    assert burst[5].sink.responses[0][2] == UNAVAILABLE and s.stats.overloaded == 1


def test_queue_has_room_again_once_the_load_drops():
    s = Scheduler(FakeEngine, max_active=1, max_queue=1)
    s.submit([job(2), job(2)])
    late = job(2)
    s.submit([late])
    assert late.sink.responses[0][2] == UNAVAILABLE
    for _ in range(3):                             # the first answer finishes, the queued one is admitted
        s.run_once()
    retry = job(2)
    s.submit([retry])
    for _ in range(10):
        s.run_once()
    assert retry.sink.finals[0][1]["FINISH_REASON"][0, 0] == b"length"


def test_queued_job_past_its_deadline_is_never_added():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=1, max_queue=4, clock=clock)
    running = job(100)
    s.submit([running])
    s.run_once()
    queued = job(3, timeout_ms=500)
    s.submit([queued])
    clock.t += 0.4
    s.run_once()
    assert not queued.sink.responses and s.num_queued == 1
    clock.t += 0.2                                  # 0.6 s > 0.5 s while still waiting for the slot
    s.run_once()
    assert queued.sink.responses == [(
        "error", "deadline exceeded: the client's timeout_ms=500 passed after 0.6 s in the queue; never started",
        DEADLINE)]
    assert s.num_queued == 0 and s.stats.expired_queued == 1
    assert queued.chat_request not in s.engine.added


def test_expired_jobs_free_their_queue_places_for_new_ones():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=1, max_queue=2, clock=clock)
    s.submit([job(100)])
    s.run_once()
    s.submit([job(timeout_ms=100), job(timeout_ms=100)])
    clock.t += 0.2
    s.run_once()                                    # both expire before anyone is refused for them
    fresh = job()
    s.submit([fresh])
    assert not fresh.sink.responses and s.num_queued == 1 and s.stats.overloaded == 0


def test_running_job_past_its_deadline_ends_and_frees_its_slot():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=1, max_queue=4, clock=clock)
    slow = job(1000, timeout_ms=1000)
    nxt = job(2)
    s.submit([slow, nxt])
    for _ in range(5):                              # 5 tokens, 0.1 s each
        s.run_once()
        clock.t += 0.1
    assert s.num_active == 1 and s.num_queued == 1
    clock.t += 0.6                                  # 1.1 s since submit
    s.run_once()
    final = slow.sink.responses[-1]
    assert final == ("error", "deadline exceeded: the client's timeout_ms=1000 passed after 1.1 s; "
                              "generation stopped after 5 tokens", DEADLINE)
    assert len(slow.sink.finals) == 1 and s.stats.expired_running == 1
    assert s.engine.cancelled == [0]                # the engine dropped the sequence (its KV cache rows)
    # the freed slot went to the queued job in the same iteration: it is already generating
    assert s.engine.added[-1] is nxt.chat_request and s.num_active == 1
    s.run_once()
    assert nxt.sink.finals[0][1]["FINISH_REASON"][0, 0] == b"length"


def test_server_request_timeout_applies_without_a_client_budget():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=1, clock=clock, request_timeout_s=2.0)
    j = job(1000)
    s.submit([j])
    s.run_once()
    clock.t += 2.5
    s.run_once()
    assert j.sink.responses[-1][2] == DEADLINE
    assert "the server's request timeout (2 s) passed after 2.5 s" in j.sink.responses[-1][1]


def test_deadline_is_the_earlier_budget():
    assert deadline_for(10.0, timeout_ms=None, request_timeout_s=0.0) is None
    client = deadline_for(10.0, timeout_ms=1500, request_timeout_s=30.0)
    assert client.at == pytest.approx(11.5) and "timeout_ms=1500" in client.what
    server = deadline_for(10.0, timeout_ms=60_000, request_timeout_s=30.0)
    assert server.at == pytest.approx(40.0) and "request timeout (30 s)" in server.what


def test_jobs_without_deadline_run_to_the_end():
    clock = Clock()
    s = Scheduler(FakeEngine, max_active=1, clock=clock)
    j = job(5)
    s.submit([j])
    for _ in range(6):
        clock.t += 3600
        s.run_once()
    assert j.sink.finals[0][1]["FINISH_REASON"][0, 0] == b"length"


@pytest.mark.parametrize("raw, expected", [
    (None, None), ("", None), ("{}", None), ('{"x-session-id": "s"}', None),
    ('{"timeout_ms": 2500}', 2500), ('{"timeout_ms": 1, "other": true}', 1),
])
def test_parse_timeout_ms(raw, expected):
    assert parse_timeout_ms(raw) == expected


@pytest.mark.parametrize("raw", ['{"timeout_ms": 0}', '{"timeout_ms": -5}', '{"timeout_ms": "2500"}',
                                 '{"timeout_ms": 2.5}', '{"timeout_ms": true}', "not json"])
def test_parse_timeout_ms_rejects_bad_values(raw):
    with pytest.raises(RequestError):
        parse_timeout_ms(raw)


def test_limits_flow_from_the_flags_to_the_settings(tmp_path):
    import json

    from videochat.launch.launcher import build_parser, options_from_args
    from videochat.launch.render import RepoOptions, render_repository
    from videochat.serving.settings import DEFAULT_QUEUE_PER_ACTIVE, LLMSettings, SettingsError

    args = build_parser().parse_args(["--device", "cpu", "--max-active", "3", "--max-queue", "5",
                                      "--request-timeout-s", "2.5"])
    opts = options_from_args(args, TINY)
    assert (opts.active_limit, opts.queue_limit, opts.request_timeout_s) == (3, 5, 2.5)
    assert RepoOptions(checkpoint=TINY, max_batch_size=2).queue_limit == DEFAULT_QUEUE_PER_ACTIVE * 2

    def settings(**params):
        config = {"max_batch_size": 2, "parameters": {"checkpoint_path": {"string_value": str(TINY)},
                  **{k: {"string_value": v} for k, v in params.items()}}}
        return LLMSettings.from_args({"model_config": json.dumps(config)})

    assert (settings().max_queue, settings().request_timeout_s) == (DEFAULT_QUEUE_PER_ACTIVE * 2, 0.0)
    assert settings(max_active="3", max_queue="0").max_queue == DEFAULT_QUEUE_PER_ACTIVE * 3
    assert (settings(max_queue="7", request_timeout_s="1.5").max_queue,
            settings(request_timeout_s="1.5").request_timeout_s) == (7, 1.5)
    for bad in ({"max_queue": "-1"}, {"request_timeout_s": "-1"}, {"request_timeout_s": "soon"}):
        with pytest.raises(SettingsError):
            settings(**bad)
    config = (render_repository(opts, tmp_path / "repo") / "videochat_llm" / "config.pbtxt").read_text()
    assert 'key: "max_queue" value: { string_value: "5" }' in config
    assert 'key: "request_timeout_s" value: { string_value: "2.5" }' in config


@pytest.mark.parametrize("message, cls, code", [
    ("in ensemble 'videochat', unavailable: server overloaded: 8 requests waiting (max_queue 8); retry later "
     "or elsewhere", "Unavailable", "UNAVAILABLE"),
    ("in ensemble 'videochat', deadline exceeded: the client's timeout_ms=2000 passed after 2.0 s; generation "
     "stopped after 12 tokens", "DeadlineExceeded", "DEADLINE_EXCEEDED"),
    ("deadline exceeded: the server's request timeout (30 s) passed after 30.1 s in the queue; never started",
     "DeadlineExceeded", "DEADLINE_EXCEEDED"),
])
def test_client_maps_the_stream_messages(message, cls, code):
    """Inside a stream the status is lost: the message prefix brings it back, and UNAVAILABLE is retryable."""
    from tritonclient.utils import InferenceServerException

    from videochat_client import errors

    err = errors.to_error(InferenceServerException(message))               # in-stream: no status
    assert type(err).__name__ == cls and err.code == code
    assert errors.is_retryable(err) == (code == "UNAVAILABLE")
    # unary: Triton has no DEADLINE_EXCEEDED, the server sends CANCELLED; the prefix still says what happened
    status = "StatusCode.UNAVAILABLE" if code == "UNAVAILABLE" else "StatusCode.CANCELLED"
    assert type(errors.to_error(InferenceServerException(message, status=status))).__name__ == cls


def test_client_retries_move_along_the_urls_and_back_off_once_all_were_tried():
    """The retry policy of a client with several replicas: the first attempt goes to the first URL, each retry
    to the next one; no sleep while an untried replica is left, backoff once every replica was tried.
    (_attempt is scripted here; tests/e2e/test_backpressure.py fails over from a closed port for real.)"""
    from videochat_client import Unavailable, VideoChatClient
    from videochat_client.retry import RetryPolicy
    from videochat_client.types import Chunk

    done = Chunk(text="hi", token_ids=(5,), prompt_tokens=3, completion_tokens=1, finish_reason="stop", final=True)

    class Scripted(VideoChatClient):
        def __init__(self, url, outcomes):
            super().__init__(url, timeout=2.5, retry_policy=RetryPolicy(max_retries=4, initial_backoff=0.01))
            self.outcomes, self.urls, self.sleeps = list(outcomes), [], []
            self._sleep = self.sleeps.append

        def _attempt(self, inputs, *, url=None, timeout=None, **kw):
            self.urls.append(url)
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            yield outcome

    c = Scripted("a:1, b:2,c:3", [Unavailable("overloaded"), Unavailable("down"), Unavailable("x"), done])
    assert list(c.generate(video=b"v", prompt="q")) == [dataclasses.replace(done, attempt=4)]   # the 4th try
    assert c.urls == ["a:1", "b:2", "c:3", "a:1"] and len(c.sleeps) == 1
    c = Scripted(["a:1"], [Unavailable("overloaded"), done])
    assert list(c.generate(video=b"v", prompt="q")) == [dataclasses.replace(done, attempt=2)]
    assert c.urls == ["a:1", "a:1"] and len(c.sleeps) == 1
    with pytest.raises(ValueError):
        VideoChatClient(" , ")


def test_client_sends_its_budget_as_timeout_ms():
    from videochat_client.client import timeout_parameters

    assert timeout_parameters(2.5) == {"timeout_ms": 2500}
    assert timeout_parameters(0.0001) == {"timeout_ms": 1}
    assert timeout_parameters(None) is None
