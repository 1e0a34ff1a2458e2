"""Failover behind a real haproxy (deploy/haproxy/haproxy.cfg, the shipped file): 3 `videochat serve` replicas
(demo checkpoint, CPU), 6 clients running 3-turn conversations through haproxy (half stream with ask_stream,
half use ask), one replica SIGKILLed with calls in flight (launcher, tritonserver and stubs at once), later
another drained with SIGTERM. Every conversation completes and every answer equals what one healthy replica
answered before the faults (greedy decoding): the client library redoes a turn cut mid-answer on another
replica, and a streaming caller learns of it through AnswerRestarted (docs/client.md, "Fleets")."""
from __future__ import annotations

import json

import pytest

from support.fleet import run_failover
from support.haproxy import find_haproxy

HAPROXY = find_haproxy()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (scripts/setup.sh installs "
                                                         "Debian's package when run as root: apt-get install haproxy)")


def test_failover_sigkill_and_sigterm_lose_no_conversation(tmp_path):
    out = run_failover(tmp_path, HAPROXY, workers=6, max_new_tokens=8)
    print("\nfailover: " + json.dumps(out))
    print(f"failover: {out['conversations']} conversations, {out['requests']} requests, {out['retried']} retried "
          f"({out['restarted_mid_stream']} streams restarted), {out['lost']} lost, worst added latency "
          f"{out['worst_added_latency_ms']} ms")
    assert out["lost"] == 0, out["lost_details"]
    assert out["mismatched"] == 0, out["mismatch_details"]
    assert out["drained_exit"] == 0
    assert out["up_at_end"] == ["r3"] or set(out["up_at_end"]) == {"r3"}, out["up_at_end"]
    assert out["requests"] >= 18 and out["conversations"] >= 6
