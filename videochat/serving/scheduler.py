"""In-flight (continuous) batching for the decoupled `videochat_llm` step, without Triton.

    execute(requests) ──submit(jobs)──▶ queue ──admit between steps──▶ engine (running batch)
                                                                          │ step(): one token per active request
    senders ◀── StreamCoalescer (first token at once, then every stream_interval_ms, always the final) ◀─┘

`Scheduler` owns a `GenerationEngine` (videochat.runtime.engine / videochat.runtime.generation) and a background thread:

* admit: queued jobs join the running batch between decode steps, up to `max_active` sequences. A group is
  added with one `engine.add` call; if it raises, each job is retried alone so only the culprit fails
  (ValueError = the client's request: INVALID_ARG; anything else: INTERNAL).
* step: `engine.step()` gives one event per active request; events go through each job's coalescer to its sink.
* cancel: `job.is_cancelled()` is checked before every step; `engine.cancel(handle)` gives the final event.
* backpressure: at most `max_queue` jobs wait beyond the free slots; one more is refused at once with
  UNAVAILABLE ("server overloaded ..."), so a flood costs the replica nothing but the refusals.
* deadlines: a job's deadline is the earlier of the client's `timeout_ms` and the server's `request_timeout_s`,
  counted from `submit`. Checked on the scheduler's clock before every step (no IPC, so it also works where
  Triton does not pass a client's cancel into a running ensemble step): a queued job past it is never
  encoded, a running one leaves the batch; both end with a DEADLINE_EXCEEDED error.
* errors: an exception in a step fails every active job with INTERNAL, replaces the engine (factory) and the
  loop goes on serving the queue.
* exactly one final response per job, whatever happens (`stop()` fails the leftovers with UNAVAILABLE).
* timings: each job's end is queued as a `Finished` (queue time, TTFT, end-to-end, time per output token) and
  each admission's (vision, prefill) seconds in `add_timings`; the adapter drains both into its histograms.
  Every failed job is logged with its request id (`log_request_error`).

A `Sink` is what the adapter wraps a Triton response sender in; tests use a list. Unary (not decoupled)
serving uses the same loop: each job gets a final-only coalescer and a `BlockingSink` that `execute` waits on.
`join_running=False` admits only into an idle engine (a batch runs to its longest answer: the classic static
batching, kept as the benchmarks' baseline).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from videochat.serving.llm import StreamCoalescer, output_arrays
from videochat.serving.requests import client_message

INVALID_ARG, INTERNAL, UNAVAILABLE, DEADLINE = "invalid_arg", "internal", "unavailable", "deadline_exceeded"
NOT_FOUND = "not_found"    # a follow-up's media_key is not cached (the adapter answers it before submit)
IDLE_WAIT_S = 0.5          # the loop sleeps at most this long without work (and re-checks stop)
FINISHED_BACKLOG = 100_000  # Finished records kept for the metrics between two drains


class Sink(Protocol):
    def send(self, arrays: dict[str, np.ndarray], *, final: bool) -> None: ...
    def fail(self, message: str, *, code: str) -> None: ...      # always final


class Engine(Protocol):
    def add(self, requests: Sequence[Any]) -> list[int]: ...
    def step(self) -> list[tuple[int, Any]]: ...
    def cancel(self, handle: int) -> Any: ...
    @property
    def num_active(self) -> int: ...


class BlockingSink:
    """A sink for unary serving: holds the one final response (or error) until `wait` returns it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.arrays: dict[str, np.ndarray] | None = None
        self.error: tuple[str, str] | None = None     # (message, code)

    def send(self, arrays: dict[str, np.ndarray], *, final: bool) -> None:
        if final:
            self.arrays = arrays
            self._done.set()

    def fail(self, message: str, *, code: str) -> None:
        self.error = (message, code)
        self._done.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)


@dataclass(frozen=True)
class Deadline:
    at: float           # on the scheduler's clock
    what: str           # whose budget, for the message


def deadline_for(now: float, *, timeout_ms: int | None, request_timeout_s: float) -> Deadline | None:
    """The earlier of the client's budget and the server's request timeout (0 = none); None if neither."""
    budgets = []
    if timeout_ms is not None:
        budgets.append(Deadline(now + timeout_ms / 1000.0, f"the client's timeout_ms={timeout_ms}"))
    if request_timeout_s > 0:
        budgets.append(Deadline(now + request_timeout_s, f"the server's request timeout ({request_timeout_s:g} s)"))
    return min(budgets, key=lambda d: d.at, default=None)


@dataclass
class Job:
    """One request inside the scheduler. `chat_request` is a videochat ChatRequest (opaque here)."""
    chat_request: Any
    sink: Sink
    is_cancelled: Callable[[], bool] = lambda: False
    coalescer: StreamCoalescer | None = None
    timeout_ms: int | None = None           # the client's budget (request parameter), counted from submit
    media_key: Callable[[], str] = lambda: ""   # the `media_key` output (read at the first send)
    handle: int | None = None
    done: bool = False
    submitted_at: float = 0.0
    deadline: Deadline | None = None        # set by submit
    request_id: str = ""                    # the client's (Triton's request id), for logs
    arrived_at: float | None = None         # on the scheduler's clock, at the ensemble's entry; None = submit
    admitted_at: float | None = None
    first_token_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline.at


@dataclass(frozen=True)
class Finished:
    """How one job ended, for the metrics (queued in `Scheduler.finished`, drained by the adapter)."""
    request_id: str
    finish_reason: str | None       # stop | length | cancelled; None for an error
    error_code: str | None          # INVALID_ARG, ...; None for a final response
    e2e_s: float                    # arrival -> the end
    queue_s: float | None           # submit -> admission; None: never admitted
    ttft_s: float | None            # arrival -> first generated token
    tpot_s: float | None            # (end - first token) / (tokens - 1); None below 2 tokens
    completion_tokens: int


def finished_record(job: Job, now: float, *, finish_reason: str | None = None,
                    error_code: str | None = None) -> Finished:
    arrived = job.submitted_at if job.arrived_at is None else min(job.arrived_at, job.submitted_at)
    tokens = job.coalescer.completion_tokens if job.coalescer is not None else 0
    first = job.first_token_at
    return Finished(
        request_id=job.request_id, finish_reason=finish_reason, error_code=error_code, e2e_s=now - arrived,
        queue_s=None if job.admitted_at is None else job.admitted_at - job.submitted_at,
        ttft_s=None if first is None else first - arrived,
        tpot_s=(now - first) / (tokens - 1) if first is not None and tokens >= 2 else None,
        completion_tokens=tokens)


@dataclass
class SchedulerStats:
    """Read by the adapter for its metrics (plain counters; the scheduler thread is the only writer)."""
    admitted: int = 0
    joins: int = 0              # admitted while other sequences were mid-generation (in-flight joins)
    steps: int = 0
    step_sequences: int = 0     # sum over steps of active sequences (avg active = step_sequences / steps)
    peak_active: int = 0
    cancelled: int = 0
    rejected: int = 0
    overloaded: int = 0         # refused at submit: the queue was full (UNAVAILABLE)
    expired_queued: int = 0     # deadline passed while queued: never started
    expired_running: int = 0    # deadline passed mid-generation: stopped, slot freed
    failed: int = 0
    engine_resets: int = 0
    add_s: float = 0.0          # time in engine.add (vision + prefill of newcomers)
    step_s: float = 0.0         # time in engine.step (one decode forward of the running batch)
    send_s: float = 0.0         # time coalescing and sending responses
    responses: int = 0          # non-error responses sent


class Scheduler:
    def __init__(self, engine_factory: Callable[[], Engine], *, max_active: int, stream_interval_ms: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, log_error: Callable[[str], None] = lambda m: None,
                 on_progress: Callable[["Scheduler"], None] | None = None,
                 cancel_check_interval_ms: float = 0.0, join_running: bool = True,
                 max_queue: int | None = None, request_timeout_s: float = 0.0,
                 log_request_error: Callable[[str, str], None] = lambda request_id, message: None) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (None = unbounded), got {max_queue}")
        if request_timeout_s < 0:
            raise ValueError(f"request_timeout_s must be >= 0, got {request_timeout_s}")
        if stream_interval_ms < 0:
            raise ValueError(f"stream_interval_ms must be >= 0, got {stream_interval_ms}")
        self._factory = engine_factory
        self.engine = engine_factory()
        self.max_active = max_active
        self.max_queue = max_queue              # jobs waiting beyond the free slots; None = unbounded
        self.request_timeout_s = request_timeout_s
        self.join_running = join_running
        self.interval_s = stream_interval_ms / 1000.0
        self.clock = clock
        self.log_error = log_error
        self.log_request_error = log_request_error   # (request id, "code: message") of every failed job
        self.on_progress = on_progress          # called after every admit/step (metrics); must not raise
        # is_cancelled() is an IPC round trip in Triton's python backend: ask at most this often (0 = every step)
        self.cancel_check_interval_s = cancel_check_interval_ms / 1000.0
        self._last_cancel_check = float("-inf")
        self.stats = SchedulerStats()
        # drained by the adapter's metrics (deque append/popleft are thread-safe); bounded if nobody drains
        self.finished: collections.deque[Finished] = collections.deque(maxlen=FINISHED_BACKLOG)
        self.add_timings: collections.deque[tuple[float, float]] = collections.deque(maxlen=FINISHED_BACKLOG)
        self._queue: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from execute() -------------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue the jobs; one that finds the queue full (or the scheduler stopping) is refused at once."""
        now = self.clock()
        refused = []
        with self._cv:
            for job in jobs:
                if job.coalescer is None:
                    job.coalescer = StreamCoalescer(self.interval_s, clock=self.clock, media_key=job.media_key)
                job.submitted_at = now
                job.deadline = deadline_for(now, timeout_ms=job.timeout_ms, request_timeout_s=self.request_timeout_s)
                if self._stopping:
                    refused.append((job, "server is shutting down"))
                elif self._queue_full():
                    self.stats.overloaded += 1
                    refused.append((job, f"server overloaded: {len(self._queue)} requests waiting "
                                         f"(max_queue {self.max_queue}); retry later or elsewhere"))
                else:
                    self._queue.append(job)
            self._cv.notify()
        for job, why in refused:
            self._fail(job, client_message("UNAVAILABLE", why), UNAVAILABLE)

    def _queue_full(self) -> bool:
        """Waiting beyond the free slots: a burst into an idle scheduler is not refused before it is admitted."""
        if self.max_queue is None:
            return False
        free = max(0, self.max_active - len(self._active))
        return len(self._queue) >= self.max_queue + free

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    # -- the loop --------------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="videochat-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop after its current step; every job not finished gets a final UNAVAILABLE."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cv:
            leftovers = list(self._queue) + list(self._active.values())
            self._queue.clear()
            self._active.clear()
        for job in leftovers:
            self._fail(job, client_message("UNAVAILABLE", "server is shutting down"), UNAVAILABLE)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self._active:
                    self._cv.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - run_once handles its own; this is a last line of defence
                self.log_error(f"scheduler loop: {type(exc).__name__}: {exc}")
                self._reset(f"scheduler failed: {type(exc).__name__}")

    def run_once(self) -> None:
        """One iteration: drop expired, admit newcomers, check cancellations, one decode step, dispatch (tests
        drive this)."""
        self._expire_queued()
        self._expire_running()          # before admitting: a freed slot goes to the queue in this iteration
        self._admit()
        self._check_cancelled()
        if self._active:
            self._step()
        if self.on_progress is not None:
            self.on_progress(self)

    def _take_newcomers(self) -> list[Job]:
        if self._active and not self.join_running:
            return []
        with self._cv:
            room = self.max_active - len(self._active)
            jobs = []
            while room > 0 and self._queue:
                job = self._queue.popleft()
                if job.is_cancelled():          # cancelled while queued: never encoded
                    self._finish_cancelled_unstarted(job)
                    continue
                jobs.append(job)
                room -= 1
            return jobs

    def _expire_queued(self) -> None:
        """Queued jobs whose deadline passed are never started (and no longer hold a place in the queue)."""
        now = self.clock()
        with self._cv:
            if not any(job.expired(now) for job in self._queue):
                return
            expired = [job for job in self._queue if job.expired(now)]
            kept = [job for job in self._queue if not job.expired(now)]
            self._queue.clear()
            self._queue.extend(kept)
        self.stats.expired_queued += len(expired)
        for job in expired:
            self._fail(job, client_message("DEADLINE_EXCEEDED", f"{job.deadline.what} passed after "
                                      f"{now - job.submitted_at:.1f} s in the queue; never started"), DEADLINE)

    def _expire_running(self) -> None:
        """Running jobs past their deadline leave the batch: nobody reads the rest, the slot goes to the queue."""
        now = self.clock()
        for handle, job in list(self._active.items()):
            if not job.expired(now):
                continue
            self._active.pop(handle, None)
            try:
                self.engine.cancel(handle)
            except Exception as exc:  # noqa: BLE001 - the job ends either way
                self.log_error(f"engine.cancel failed: {type(exc).__name__}: {exc}")
            self.stats.expired_running += 1
            tokens = job.coalescer.completion_tokens if job.coalescer is not None else 0
            self._fail(job, client_message("DEADLINE_EXCEEDED", f"{job.deadline.what} passed after "
                                      f"{now - job.submitted_at:.1f} s; generation stopped after {tokens} tokens"),
                  DEADLINE)

    def _admit(self) -> None:
        jobs = self._take_newcomers()
        if not jobs:
            return
        running = len(self._active)
        t0 = time.perf_counter()
        try:
            handles = self.engine.add([j.chat_request for j in jobs])
        except Exception as exc:  # noqa: BLE001 - nothing was added: find the culprit(s) one by one
            if len(jobs) == 1:
                self.stats.add_s += time.perf_counter() - t0
                self._reject(jobs[0], exc)
                return
            handles = []
            ok = []
            for job in jobs:
                try:
                    handles.extend(self.engine.add([job.chat_request]))
                    ok.append(job)
                except Exception as one_exc:  # noqa: BLE001
                    self._reject(job, one_exc)
            jobs = ok
        self.stats.add_s += time.perf_counter() - t0
        timings = getattr(self.engine, "last_add_timings", None)   # (vision_s, prefill_s) of the last add
        if timings is not None and jobs:
            self.add_timings.append(timings)
        admitted = self.clock()
        for job, handle in zip(jobs, handles):
            job.handle = handle
            job.admitted_at = admitted
            self._active[handle] = job
        self.stats.admitted += len(jobs)
        if running:
            self.stats.joins += len(jobs)
        self.stats.peak_active = max(self.stats.peak_active, len(self._active))

    def _reject(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, ValueError):
            self.stats.rejected += 1
            self._fail(job, client_message("INVALID_ARGUMENT", exc)[:500], INVALID_ARG)
        else:
            self.stats.failed += 1
            self.log_error(f"engine.add failed: {type(exc).__name__}: {exc}")
            self._fail(job, f"generation failed: {type(exc).__name__}: {exc}"[:500], INTERNAL)

    def _check_cancelled(self) -> None:
        now = self.clock()
        if now - self._last_cancel_check < self.cancel_check_interval_s:
            return
        self._last_cancel_check = now
        for handle, job in list(self._active.items()):
            try:
                cancelled = job.is_cancelled()
            except Exception:  # noqa: BLE001 - a broken request handle: treat as gone
                cancelled = True
            if cancelled:
                try:
                    event = self.engine.cancel(handle)
                except Exception as exc:  # noqa: BLE001
                    self.log_error(f"engine.cancel failed: {type(exc).__name__}: {exc}")
                    event = None
                self.stats.cancelled += 1
                self._active.pop(handle, None)
                if event is None:
                    self._fail(job, "cancelled", INTERNAL)
                else:
                    self._dispatch(job, event)

    def _step(self) -> None:
        n = len(self._active)
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - the batch is lost, the server is not
            self.log_error(f"engine.step failed with {n} active: {type(exc).__name__}: {exc}")
            self._reset(f"generation failed: {type(exc).__name__}: {exc}"[:500])
            return
        t1 = time.perf_counter()
        self.stats.steps += 1
        self.stats.step_sequences += n
        for handle, event in events:
            job = self._active.get(handle)
            if job is None:
                continue
            self._dispatch(job, event)
            if job.done:
                self._active.pop(handle, None)
        self.stats.step_s += t1 - t0
        self.stats.send_s += time.perf_counter() - t1

    def _dispatch(self, job: Job, event: Any) -> None:
        if job.done:
            return
        try:
            arrays, final = job.coalescer.push(event)
            if job.first_token_at is None and job.coalescer.completion_tokens:
                job.first_token_at = self.clock()
            if arrays is not None:
                job.sink.send(arrays, final=final)
                self.stats.responses += 1
            if final:
                job.done = True
                reason = getattr(event.finish_reason, "value", event.finish_reason)
                self.finished.append(finished_record(job, self.clock(), finish_reason=str(reason)))
        except Exception as exc:  # noqa: BLE001 - a send failed (client gone?): end this job only
            self.log_error(f"sending a response failed: {type(exc).__name__}: {exc}")
            self._fail(job, "sending the response failed", INTERNAL)
            if job.handle is not None and job.handle in self._active:
                self._active.pop(job.handle, None)
                try:
                    self.engine.cancel(job.handle)
                except Exception:  # noqa: BLE001
                    pass

    def _finish_cancelled_unstarted(self, job: Job) -> None:
        self.stats.cancelled += 1
        try:
            job.sink.send(output_arrays(text="", token_ids=[], prompt_tokens=0, completion_tokens=0,
                                        finish_reason="cancelled"), final=True)
            job.done = True
            self.finished.append(finished_record(job, self.clock(), finish_reason="cancelled"))
        except Exception:  # noqa: BLE001
            self._fail(job, "cancelled", INTERNAL)

    def _fail(self, job: Job, message: str, code: str) -> None:
        """`_fail` plus the record for the metrics and one log line with the request id (the caller's error,
        findable in the server's log)."""
        if _fail(job, message, code):
            self.finished.append(finished_record(job, self.clock(), error_code=code))
            self.log_request_error(job.request_id, f"{code}: {message}")

    def _reset(self, message: str) -> None:
        failed = list(self._active.values())
        self._active.clear()
        for job in failed:
            self._fail(job, message, INTERNAL)
        self.stats.failed += len(failed)
        self.stats.engine_resets += 1
        try:
            self.engine = self._factory()
        except Exception as exc:  # noqa: BLE001 - keep the old one; the next step tells
            self.log_error(f"engine reset failed: {type(exc).__name__}: {exc}")


def _fail(job: Job, message: str, code: str) -> bool:
    """The job's one final response, as an error. Never raises; False if the job had ended already."""
    if job.done:
        return False
    job.done = True
    try:
        job.sink.fail(message, code=code)
    except Exception:  # noqa: BLE001 - nothing more we can do for this client
        pass
    return True
