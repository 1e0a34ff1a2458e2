"""Follow-ups by media_key across a fleet, for tests/e2e/test_media_reference_fleet.py and
bench/followup_fleet_bench.py: 2 `videochat serve` replicas behind the shipped haproxy config, scripted
conversations whose follow-ups send the first answer's `media_key`, once with session hashing on (the default
`x-session-id`, with and without bounded load) and once off (VIDEOCHAT_LB_HASH_HEADER naming a header no client
sends: round robin).

A key is only valid on the replica that issued it: a follow-up that lands elsewhere gets NOT_FOUND "media not
cached: " and the client re-uploads the bytes once. Per mode: the share of follow-ups answered by reference
(hit rate), re-uploads, bytes uploaded per conversation, follow-up TTFT and latency, the replicas' counters, and
whether every answer equals what one replica answered alone (greedy decoding)."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from support.haproxy import NO_AFFINITY
from support.paths import VIDEOS
from support.replica import Served
from videochat_client import VideoChatClient
from videochat_client.metrics import scrape

# (video, num_segments): different media, so conversations differ; small clips keep first turns cheap on CPU.
MEDIA = (("example1.mp4", 2), ("faststart_h264_640x360_6s.mp4", 1), ("fragmented_h264_640x360_5s.mp4", 2),
         ("bt709_tagged_h264_1280x720_30fps_3s.mp4", 1))
QUESTIONS = ("Describe the video.", "What colours are there?", "Is there any text?", "What moves?",
             "Summarize it in one sentence.")
COUNTERS = ("videochat_media_reference_hits_total", "videochat_media_reference_misses_total",
            "videochat_media_reuploads_total")
# mode -> (VIDEOCHAT_LB_HASH_HEADER, VIDEOCHAT_LB_HASH_BALANCE_FACTOR); None: the file's default (x-session-id,
# 150). "hashing_on_unbounded": bounded load off, so a busy replica never hands a session's call to the other.
MODES = {"hashing_on": (None, None), "hashing_on_unbounded": (None, 0), "hashing_off": (NO_AFFINITY, None)}


@dataclass
class Conv:
    """One conversation's outcome: per turn what was answered and what went over the wire."""
    script: int
    texts: list
    token_ids: list
    reuploaded: list          # per turn: the key missed and the bytes went again
    bytes_sent: list          # per turn: video bytes uploaded (retries and re-uploads included)
    ttft_ms: list
    latency_ms: list

    @property
    def reuploads(self) -> int:
        return sum(self.reuploaded)


def converse(url: str, script: int, *, turns: int, max_new_tokens: int) -> Conv:
    """One conversation (its own client and session id) about MEDIA[script % len(MEDIA)]."""
    video, segments = MEDIA[script % len(MEDIA)]
    with VideoChatClient(url, timeout=120) as client:
        conv = client.conversation(VIDEOS / video, num_segments=segments)
        answers = [conv.ask(QUESTIONS[k % len(QUESTIONS)], max_new_tokens=max_new_tokens) for k in range(turns)]
    assert conv.reuploads == sum(a.reuploaded for a in answers)
    assert conv.video_bytes_sent == sum(a.video_bytes_sent for a in answers)
    return Conv(script % len(MEDIA), [a.text for a in answers], [a.token_ids for a in answers],
                [a.reuploaded for a in answers], [a.video_bytes_sent for a in answers],
                [a.timings.time_to_first_token_ms for a in answers], [a.timings.latency_ms for a in answers])


def run_conversations(url: str, n: int, *, concurrency: int, turns: int, max_new_tokens: int) -> list[Conv]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda i: converse(url, i, turns=turns, max_new_tokens=max_new_tokens), range(n)))


def counters(replicas: Sequence[Served]) -> dict[str, float]:
    """COUNTERS summed over the replicas' Prometheus endpoints."""
    scrapes = [scrape(f"http://127.0.0.1:{r.metrics_port}/metrics") for r in replicas]
    return {c: sum(s.get(c) for s in scrapes) for c in COUNTERS}


def settled_counters(replicas: Sequence[Served], before: dict[str, float], followups: int,
                     timeout_s: float = 10) -> dict[str, float]:
    """The counters' growth since `before`, once every follow-up's key was counted as a hit or a miss (the models
    mirror their counters to Triton a moment after the event)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = counters(replicas)
        grown = {c: now[c] - before[c] for c in COUNTERS}
        counted = grown[COUNTERS[0]] + grown[COUNTERS[1]]
        if counted >= followups or time.monotonic() > deadline:
            return grown
        time.sleep(0.1)


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return round(statistics.median(v), 1) if v else None


def summarize(convs: Sequence[Conv], reference: dict[int, Conv], server: dict[str, float],
              calls: dict[str, int]) -> dict:
    """One mode's figures; `reference`: script -> the same conversation on one replica alone."""
    followups = [(c, k) for c in convs for k in range(1, len(c.texts))]
    reuploads = sum(c.reuploads for c in convs)
    mismatched = [f"script {c.script} turn {k}: {c.texts[k]!r} != {reference[c.script].texts[k]!r}"
                  for c in convs for k in range(len(c.texts))
                  if (c.texts[k], c.token_ids[k]) != (reference[c.script].texts[k], reference[c.script].token_ids[k])]
    return {
        "conversations": len(convs),
        "followups": len(followups),
        "hit_rate": round(1 - reuploads / len(followups), 3) if followups else None,
        "reuploads": reuploads,
        "conversations_with_reupload": sum(1 for c in convs if c.reuploads),
        "bytes_per_conversation": round(statistics.mean(sum(c.bytes_sent) for c in convs)),
        # video bytes uploaded / the bytes of one upload per conversation: 1.0 = each video went once
        "upload_factor": round(sum(sum(c.bytes_sent) for c in convs) / sum(c.bytes_sent[0] for c in convs), 3),
        "followup_ttft_ms": median([c.ttft_ms[k] for c, k in followups]),
        "followup_latency_ms": median([c.latency_ms[k] for c, k in followups]),
        "followup_latency_ms_hit": median([c.latency_ms[k] for c, k in followups if not c.reuploaded[k]]),
        "followup_latency_ms_reupload": median([c.latency_ms[k] for c, k in followups if c.reuploaded[k]]),
        "server": {name.removeprefix("videochat_"): int(v) for name, v in server.items()},
        "calls_per_replica": calls,
        "mismatched": len(mismatched),
        "mismatch_details": mismatched[:10],
    }


def single_replica_reference(replica: Served, scripts: int, *, turns: int, max_new_tokens: int) -> dict[int, Conv]:
    """script -> its conversation on one replica directly (no balancer): the answers every mode must give."""
    return {i: converse(replica.url, i, turns=turns, max_new_tokens=max_new_tokens)
            for i in range(min(scripts, len(MEDIA)))}


def run_mode(lb_binary: str, replicas: Sequence[Served], mode: str, *, conversations: int, concurrency: int,
             turns: int, max_new_tokens: int) -> tuple[list[Conv], dict[str, float], dict[str, int], float]:
    """A fresh haproxy (the shipped file, the mode's variables) and `conversations` conversations through it.
    Returns (conversations, the replicas' counter growth, calls per replica, wall seconds)."""
    from support.haproxy import Haproxy

    header, factor = MODES[mode]
    lb = Haproxy(lb_binary, [(r.url, r.health_port) for r in replicas], hash_header=header, balance_factor=factor)
    try:
        lb.wait_up({"r1", "r2"})
        before = counters(replicas)
        t0 = time.monotonic()
        convs = run_conversations(lb.url, conversations, concurrency=concurrency, turns=turns,
                                  max_new_tokens=max_new_tokens)
        wall = time.monotonic() - t0
        server = settled_counters(replicas, before, followups=conversations * (turns - 1))
        calls = {name: int(row["stot"] or 0) for name, row in sorted(lb.servers().items())}
        return convs, server, calls, wall
    finally:
        lb.stop()


def run_affinity(work: Path, lb_binary: str, *, conversations: int = 24, concurrency: int = 3, turns: int = 5,
                 max_new_tokens: int = 8, runs: int = 1, modes: Sequence[str] = tuple(MODES),
                 log: Callable[[str], None] = print) -> dict:
    """2 replicas; the single-replica reference; then `runs` rounds of every mode in turn (each a fresh
    haproxy and `conversations` conversations, `concurrency` at a time). Returns {"modes": {mode:
    summarize(...) over all its rounds}, ...}."""
    from support.fleet import start_replicas

    replicas = start_replicas(work, 2)
    try:
        t0 = time.monotonic()
        ref = single_replica_reference(replicas[0], conversations, turns=turns, max_new_tokens=max_new_tokens)
        log(f"reference: {len(ref)} conversations on one replica in {time.monotonic() - t0:.1f} s")
        done = {m: ([], dict.fromkeys(COUNTERS, 0.0), {}, 0.0) for m in modes}
        for run in range(runs):
            for mode in modes:
                convs, server, calls, wall = run_mode(lb_binary, replicas, mode, conversations=conversations,
                                                      concurrency=concurrency, turns=turns,
                                                      max_new_tokens=max_new_tokens)
                log(f"run {run + 1} {mode}: {sum(c.reuploads for c in convs)} re-uploads of "
                    f"{conversations * (turns - 1)} follow-ups, calls {calls}, {wall:.1f} s")
                all_convs, total, all_calls, all_wall = done[mode]
                done[mode] = (all_convs + convs, {c: total[c] + server[c] for c in COUNTERS},
                              {n: all_calls.get(n, 0) + v for n, v in calls.items()}, all_wall + wall)
        out: dict = {"replicas": 2, "conversations": conversations, "runs": runs, "concurrency": concurrency,
                     "turns": turns, "max_new_tokens": max_new_tokens, "modes": {}}
        for mode, (convs, server, calls, wall) in done.items():
            header, factor = MODES[mode]
            out["modes"][mode] = {"hash_header": header or "x-session-id (default)",
                                  "hash_balance_factor": 150 if factor is None else factor,
                                  **summarize(convs, ref, server, calls), "wall_s": round(wall, 1)}
        return out
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
