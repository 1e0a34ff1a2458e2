"""A fleet on 127.0.0.1 for the failover test and bench/failover_bench.py: `videochat serve` replicas (demo
checkpoint, CPU) behind the shipped haproxy config, clients running multi-turn conversations through it, and
the faults: SIGKILL of a replica's whole process tree, SIGTERM (drain) of another.

Every conversation follows a fixed script (video, media options, questions) and decodes greedily, so its
answers are known in advance: the reference is what one healthy replica answers before any fault."""
from __future__ import annotations

import glob
import itertools
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from support.paths import VIDEOS
from support.replica import Served, children, cmdline
from videochat_client import AnswerRestarted, RetryPolicy, VideoChatClient, VideoChatError

# Conversation scripts: different videos, options and questions, so that the answers differ between them.
SCRIPTS = (
    ("example1.mp4", 2, ("Describe the action step by step.", "What is she wearing?", "Where is this?")),
    ("example1.mp4", 1, ("What happens in the video?", "And then?", "Summarize it in one sentence.")),
    ("example1.mp4", 2, ("What objects can you see?", "Which colours dominate?", "Is it indoors?")),
    ("example1.mp4", 1, ("Who is in the video?", "What is the person doing?", "How does it end?")),
)
# Retries for the clients of the test: long enough to outlast haproxy's check interval (500 ms) while a
# draining replica still gets its sticky sessions' calls.
FLEET_RETRY = RetryPolicy(max_retries=8, initial_backoff=0.2, max_backoff=2.0)


def start_replicas(work: Path, n: int, *extra: str) -> list[Served]:
    """n `videochat serve` replicas, each on its own free grpc/http/metrics/health ports, started at once."""
    replicas = [Served(work / f"replica{i}", "--preprocess-instances", "1", *extra) for i in range(n)]
    for r in replicas:
        r.wait_ready()
    return replicas


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_replica(replica: Served) -> list[int]:
    """SIGKILL the launcher, its tritonserver (own process group) and the stubs, all at once, as a machine or
    container dying would; then remove the shm regions the dead stubs left. Returns the killed pids."""
    pids = [replica.proc.pid, *descendants(replica.proc.pid)]
    prefixes = {arg.split("shm-region-prefix-name=", 1)[1] for p in pids for arg in cmdline(p)
                if "shm-region-prefix-name=" in arg}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    replica.proc.wait(30)
    for prefix in prefixes:
        for path in glob.glob(f"/dev/shm/{prefix}*"):
            try:
                os.unlink(path)
            except OSError:
                pass
    return pids


@dataclass
class Turn:
    script: int
    turn: int
    text: str
    token_ids: tuple
    attempts: int
    restarts: int
    latency_ms: float
    started: float        # time.monotonic() when sent


@dataclass
class Outcome:
    """What the clients saw: every turn that completed, and every conversation that did not."""
    turns: list[Turn] = field(default_factory=list)
    conversations: int = 0
    lost: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def ask_turn(conv, question: str, *, stream: bool, max_new_tokens: int):
    """One turn: `ask`, or `ask_stream` read the documented way (an AnswerRestarted voids what came so far;
    iterate again for the new answer). Returns (answer, restarts)."""
    if not stream:
        return conv.ask(question, max_new_tokens=max_new_tokens), 0
    st = conv.ask_stream(question, max_new_tokens=max_new_tokens)
    pieces: list[str] = []
    while st.answer is None:
        try:
            for piece in st:
                pieces.append(piece)
        except AnswerRestarted:
            pieces = []
    assert "".join(pieces) == st.answer.text
    return st.answer, st.restarts


def run_script(client: VideoChatClient, index: int, *, stream: bool, max_new_tokens: int) -> list[Turn]:
    video, segments, questions = SCRIPTS[index]
    conv = client.conversation(VIDEOS / video, num_segments=segments)
    turns = []
    for k, q in enumerate(questions):
        t0 = time.monotonic()
        answer, restarts = ask_turn(conv, q, stream=stream, max_new_tokens=max_new_tokens)
        turns.append(Turn(index, k, answer.text, answer.token_ids, answer.attempts, restarts,
                          answer.timings.latency_ms, t0))
    return turns


def reference(url: str, max_new_tokens: int) -> dict[tuple[int, int], tuple[str, tuple]]:
    """(script, turn) -> (text, token_ids) from one healthy replica, one conversation at a time."""
    with VideoChatClient(url, timeout=120, max_retries=0) as client:
        return {(t.script, t.turn): (t.text, t.token_ids) for i in range(len(SCRIPTS))
                for t in run_script(client, i, stream=False, max_new_tokens=max_new_tokens)}


class Load:
    """`workers` threads running scripted conversations through `url` until stopped (each finishes the
    conversation it is in). Odd workers stream (ask_stream), even ones use ask."""

    def __init__(self, url: str, *, workers: int, max_new_tokens: int, timeout_s: float = 60) -> None:
        self.url, self.max_new_tokens, self.timeout_s = url, max_new_tokens, timeout_s
        self.outcome = Outcome()
        self._stop = threading.Event()
        self._next = itertools.count()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(workers)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s * 3)

    def done(self) -> int:
        return len(self.outcome.turns)

    def wait_turns(self, n: int, timeout_s: float) -> None:
        """Until n more turns completed."""
        target = self.done() + n
        deadline = time.monotonic() + timeout_s
        while self.done() < target:
            assert time.monotonic() < deadline, f"only {self.done()} of {target} turns after {timeout_s} s"
            time.sleep(0.05)

    def _work(self, worker: int) -> None:
        with VideoChatClient(self.url, timeout=self.timeout_s, retry_policy=FLEET_RETRY) as client:
            while not self._stop.is_set():
                index = next(self._next) % len(SCRIPTS)
                try:
                    turns = run_script(client, index, stream=worker % 2 == 1, max_new_tokens=self.max_new_tokens)
                except VideoChatError as e:
                    with self.outcome.lock:
                        self.outcome.lost.append(f"script {index}: {e}")
                    continue
                with self.outcome.lock:
                    self.outcome.turns += turns
                    self.outcome.conversations += 1


def figures(outcome: Outcome, ref: dict, **extra) -> dict:
    """The run's numbers: conversations, requests, retried, lost, mismatched, worst added latency."""
    turns = outcome.turns
    calm = [t.latency_ms for t in turns if t.attempts == 1]
    retried = [t for t in turns if t.attempts > 1]
    typical = statistics.median(calm) if calm else 0.0
    mismatched = [f"script {t.script} turn {t.turn}: {t.text!r} != {ref[(t.script, t.turn)][0]!r}"
                  for t in turns if (t.text, t.token_ids) != ref[(t.script, t.turn)]]
    return {
        "conversations": outcome.conversations,
        "requests": len(turns),
        "retried": len(retried),
        "restarted_mid_stream": sum(t.restarts for t in turns),
        "lost": len(outcome.lost),
        "mismatched": len(mismatched),
        "median_latency_ms": round(typical, 1),
        "worst_added_latency_ms": round(max((t.latency_ms - typical for t in retried), default=0.0), 1),
        "max_attempts": max((t.attempts for t in turns), default=0),
        **extra,
        "lost_details": outcome.lost[:10],
        "mismatch_details": mismatched[:10],
    }


def busiest(lb, candidates: list[str], timeout_s: float = 20) -> str:
    """The first of `candidates` seen with a call in flight (haproxy's scur), so a fault hits live calls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        servers = lb.servers()
        for name in candidates:
            if int(servers[name]["scur"] or 0) > 0:
                return name
        time.sleep(0.01)
    return candidates[0]


def run_failover(work: Path, lb_binary: str, *, workers: int = 6, max_new_tokens: int = 8,
                 turns_between: int = 6, log=print) -> dict:
    """3 replicas behind haproxy; conversations under load; SIGKILL one replica (its whole tree) with calls in
    flight, later SIGTERM another; the load runs on until the drained one exited. Returns `figures`."""
    from support.haproxy import Haproxy

    replicas = start_replicas(work, 3)
    names = ["r1", "r2", "r3"]
    lb = Haproxy(lb_binary, [(r.url, r.health_port) for r in replicas])
    try:
        lb.wait_up(set(names))
        t0 = time.monotonic()
        ref = reference(replicas[2].url, max_new_tokens)     # r3 survives: its answers are the reference
        log(f"reference: {len(ref)} turns in {time.monotonic() - t0:.1f} s")
        with Load(lb.url, workers=workers, max_new_tokens=max_new_tokens) as load:
            load.wait_turns(turns_between, 120)
            killed = busiest(lb, names[:2])
            victim = replicas[names.index(killed)]
            in_flight = lb.servers()[killed]["scur"]
            t_kill = time.monotonic()
            kill_replica(victim)
            log(f"SIGKILL {killed} ({in_flight} calls in flight there) after {load.done()} turns")
            load.wait_turns(turns_between, 120)
            drained_name = names[1] if killed == names[0] else names[0]
            drained = replicas[names.index(drained_name)]
            in_flight = lb.servers()[drained_name]["scur"]
            t_term = time.monotonic()
            drained.proc.send_signal(signal.SIGTERM)
            log(f"SIGTERM {drained_name} ({in_flight} calls in flight there) after {load.done()} turns")
            rc = drained.wait_exit(90)
            log(f"{drained_name} exited {rc} {time.monotonic() - t_term:.1f} s after SIGTERM")
            load.wait_turns(turns_between, 120)
        served = {n: int(row["stot"] or 0) for n, row in lb.servers().items()}
        out = figures(load.outcome, ref, replicas=3, workers=workers, max_new_tokens=max_new_tokens,
                      killed=killed, drained=drained_name, drained_exit=rc, calls_per_replica=served,
                      load_s=round(time.monotonic() - t_kill, 1), up_at_end=sorted(lb.up()))
        return out
    finally:
        lb.stop()
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
