"""The in-flight batching scheduler (videochat/serving/scheduler.py) without Triton or a model: a fake engine and
list sinks. Checks joins between steps, the max_active limit, exactly one final response per request, add
failures isolated to the culprit, cancellation, recovery after a failing step, stop(), and the stream
coalescing policy (deltas and ids concatenate to the whole answer, completion_tokens right)."""
from __future__ import annotations

import threading
import time

import pytest

from support.fake_engine import Ev, FakeEngine
from support.fakes import ListSink
from videochat.serving.llm import StreamCoalescer
from videochat.serving.scheduler import INTERNAL, INVALID_ARG, UNAVAILABLE, BlockingSink, Job, Scheduler


def jobs(*reqs, cancelled=None):
    return [Job(chat_request=r, sink=ListSink(), is_cancelled=(cancelled or (lambda: False))) for r in reqs]


def drain(s: Scheduler, limit=200):
    for _ in range(limit):
        if not s.num_active and not s.num_queued:
            return
        s.run_once()
    raise AssertionError("did not drain")


def test_newcomers_join_between_steps_and_each_gets_one_final():
    s = Scheduler(FakeEngine, max_active=8)
    first = jobs({"n": 5}, {"n": 3})
    s.submit(first)
    s.run_once()
    s.run_once()                               # two steps with 2 active
    late = jobs({"n": 2})
    s.submit(late)
    s.run_once()                               # joins: 3 active in this step
    drain(s)
    assert s.engine.step_sizes[:3] == [2, 2, 3]
    assert s.stats.joins == 1 and s.stats.peak_active == 3 and s.stats.admitted == 3
    for job, n in zip(first + late, (5, 3, 2)):
        assert len(job.sink.finals) == 1 and job.sink.responses[-1][2] is True
        assert job.sink.text() == "".join(f"w{i} " for i in range(1, n + 1))
        last = job.sink.responses[-1][1]
        assert last["FINISH_REASON"][0, 0] == b"length" and int(last["COMPLETION_TOKENS"][0, 0]) == n
        assert int(last["PROMPT_TOKENS"][0, 0]) == 7


def test_max_active_limits_the_running_batch():
    s = Scheduler(FakeEngine, max_active=2)
    js = jobs(*({"n": 3} for _ in range(5)))
    s.submit(js)
    drain(s)
    assert max(s.engine.step_sizes) == 2 and s.engine.add_calls[0] == 2
    assert all(len(j.sink.finals) == 1 for j in js)


def test_add_failure_fails_only_the_culprit():
    s = Scheduler(FakeEngine, max_active=8)
    js = jobs({"n": 2}, {"n": 2, "bad": True}, {"n": 2, "crash": True}, {"n": 2})
    s.submit(js)
    drain(s)
    assert s.engine.add_calls == [4, 1, 1, 1, 1]
    assert js[1].sink.responses == [("error", "invalid argument: prompt too long", INVALID_ARG)]
    assert js[2].sink.responses[0][0] == "error" and js[2].sink.responses[0][2] == INTERNAL
    assert len(js[2].sink.responses) == 1
    for j in (js[0], js[3]):
        assert j.sink.text() == "w1 w2 " and len(j.sink.finals) == 1


def test_cancel_frees_the_slot_with_a_cancelled_final():
    flag = threading.Event()
    s = Scheduler(FakeEngine, max_active=1)
    long_job = jobs({"n": 100}, cancelled=flag.is_set)[0]
    waiting = jobs({"n": 2})[0]
    s.submit([long_job, waiting])
    s.run_once()
    s.run_once()
    assert s.num_active == 1 and s.num_queued == 1
    flag.set()
    drain(s)
    last = long_job.sink.responses[-1]
    assert last[2] is True and last[1]["FINISH_REASON"][0, 0] == b"cancelled"
    assert int(last[1]["COMPLETION_TOKENS"][0, 0]) == 2 and len(long_job.sink.finals) == 1
    assert waiting.sink.text() == "w1 w2 " and s.stats.cancelled == 1


def test_cancelled_while_queued_is_never_added():
    s = Scheduler(FakeEngine, max_active=4)
    j = jobs({"n": 3}, cancelled=lambda: True)[0]
    s.submit([j])
    s.run_once()
    assert s.engine.add_calls == [] and len(j.sink.finals) == 1
    assert j.sink.responses[0][1]["FINISH_REASON"][0, 0] == b"cancelled"


def test_failing_step_fails_active_resets_engine_and_keeps_serving():
    FakeEngine.instances = 0
    errors = []
    s = Scheduler(FakeEngine, max_active=4, log_error=errors.append)
    js = jobs({"n": 5}, {"n": 5, "boom_at": 3})
    s.submit(js)
    drain(s)
    for j in js:
        assert j.sink.responses[-1][0] == "error" and j.sink.responses[-1][2] == INTERNAL
        assert len(j.sink.finals) == 1 and j.sink.text() == "w1 w2 "
    assert FakeEngine.instances == 2 and s.stats.engine_resets == 1 and errors
    after = jobs({"n": 2})
    s.submit(after)
    drain(s)
    assert after[0].sink.text() == "w1 w2 "


def test_sink_failure_ends_only_that_job():
    class Broken(ListSink):
        def send(self, arrays, *, final):
            raise RuntimeError("client gone")

    s = Scheduler(FakeEngine, max_active=4)
    bad = Job(chat_request={"n": 4}, sink=Broken())
    good = jobs({"n": 4})[0]
    s.submit([bad, good])
    drain(s)
    assert bad.sink.responses == [("error", "sending the response failed", INTERNAL)]
    assert good.sink.text() == "w1 w2 w3 w4 "


def test_thread_serves_and_stop_fails_leftovers():
    s = Scheduler(FakeEngine, max_active=2).start()
    js = jobs({"n": 3}, {"n": 4})
    s.submit(js)
    deadline = time.monotonic() + 5
    while not all(j.sink.finals for j in js) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [j.sink.text() for j in js] == ["w1 w2 w3 ", "w1 w2 w3 w4 "]

    class Slow(FakeEngine):
        def step(self):
            time.sleep(0.01)
            return super().step()

    s2 = Scheduler(Slow, max_active=1).start()
    stuck = jobs({"n": 10**6}, {"n": 1})
    s2.submit(stuck)
    time.sleep(0.05)
    s2.stop(timeout_s=5)
    for j in stuck:
        assert len(j.sink.finals) == 1
    assert stuck[1].sink.responses == [("error", "unavailable: server is shutting down", UNAVAILABLE)]
    late = jobs({"n": 1})[0]
    s2.submit([late])
    assert late.sink.responses[0][2] == UNAVAILABLE
    s.stop()


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_coalescer_first_token_at_once_then_every_interval_and_final():
    clock = Clock()
    c = StreamCoalescer(0.020, clock=clock)
    sent = []
    for i in range(1, 11):
        clock.t = i * 0.007                      # a token every 7 ms
        finished = i == 10
        arrays, final = c.push(Ev(token_id=i, text=f"t{i}", finished=finished,
                                  finish_reason="stop" if finished else None))
        if arrays is not None:
            sent.append((clock.t, arrays, final))
    assert sent[0][0] == pytest.approx(0.007)   # TTFT: the first token is not held back
    assert len(sent) < 10 and sent[-1][2] is True
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:-1])]
    assert all(g >= 0.020 - 1e-9 for g in gaps)
    assert "".join(a["TEXT"][0, 0].decode() for _, a, _ in sent) == "".join(f"t{i}" for i in range(1, 11))
    assert [i for _, a, _ in sent for i in a["TOKEN_IDS"][0].tolist()] == list(range(1, 11))
    assert [int(a["COMPLETION_TOKENS"][0, 0]) for _, a, _ in sent][-1] == 10
    assert [a["FINISH_REASON"][0, 0] for _, a, _ in sent] == [b""] * (len(sent) - 1) + [b"stop"]


def test_coalescer_zero_interval_sends_every_token_and_keeps_empty_deltas():
    c = StreamCoalescer(0.0)
    out = [c.push(Ev(token_id=i, text="" if i == 2 else f"t{i}", finished=i == 3,
                     finish_reason="length" if i == 3 else None)) for i in (1, 2, 3)]
    assert all(a is not None for a, _ in out) and [f for _, f in out] == [False, False, True]
    assert [int(a["COMPLETION_TOKENS"][0, 0]) for a, _ in out] == [1, 2, 3]


def test_scheduler_coalesces_streams():
    clock = Clock()

    class Ticking(FakeEngine):
        def step(self):
            clock.t += 0.005
            return super().step()

    s = Scheduler(Ticking, max_active=4, stream_interval_ms=20, clock=clock)
    js = jobs({"n": 40})
    s.submit(js)
    drain(s)
    sink = js[0].sink
    assert 5 <= len(sink.responses) <= 12
    assert sink.text() == "".join(f"w{i} " for i in range(1, 41)) and sink.ids() == list(range(101, 141))
    assert int(sink.responses[-1][1]["COMPLETION_TOKENS"][0, 0]) == 40


def test_cancel_checks_are_rate_limited():
    clock = Clock()
    asked = []

    def cancelled():
        asked.append(clock.t)
        return False

    s = Scheduler(FakeEngine, max_active=2, clock=clock, cancel_check_interval_ms=20)
    s.submit(jobs({"n": 10}, cancelled=cancelled))
    for _ in range(10):
        clock.t += 0.005
        s.run_once()
    # one check when queued (admission) + one per 20 ms while active, not one per 5 ms step
    assert 2 <= len(asked) <= 4


def test_unary_jobs_hold_the_whole_answer_in_one_final():
    """Unary serving: a final-only coalescer per job and a BlockingSink that execute() waits on."""
    s = Scheduler(FakeEngine, max_active=4).start()
    try:
        sinks = [BlockingSink() for _ in range(3)]
        s.submit([Job(chat_request=r, sink=k, coalescer=StreamCoalescer(None))
                  for r, k in zip(({"n": 2}, {"n": 3}, {"bad": True, "n": 1}), sinks)])
        assert all(k.wait(5) for k in sinks)
    finally:
        s.stop()
    assert [k.arrays["TEXT"][0, 0] for k in sinks[:2]] == [b"w1 w2 ", b"w1 w2 w3 "]
    assert [k.arrays["TOKEN_IDS"].tolist() for k in sinks[:2]] == [[[101, 102]], [[101, 102, 103]]]
    assert sinks[2].arrays is None and sinks[2].error == ("invalid argument: prompt too long", INVALID_ARG)


def test_join_running_false_admits_only_into_an_idle_engine():
    s = Scheduler(FakeEngine, max_active=8, join_running=False)
    s.submit(jobs({"n": 3}))
    s.run_once()
    late = jobs({"n": 1})
    s.submit(late)
    drain(s)
    assert s.engine.step_sizes == [1, 1, 1, 1] and s.stats.joins == 0
    assert len(late[0].sink.finals) == 1
