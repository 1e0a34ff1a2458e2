"""Follow-ups by media_key behind a real haproxy (deploy/haproxy/haproxy.cfg, the shipped file) in front of 2
`videochat serve` replicas (demo checkpoint, CPU): with session hashing on, every follow-up of a conversation
reaches the replica that issued its key (all hit, 0 re-uploads, no bytes after the first turn); with hashing
off (VIDEOCHAT_LB_HASH_HEADER naming a header no client sends: round robin) follow-ups land on the other
replica, miss, and are re-uploaded once by the client, transparently: every answer equals the same conversation
on one replica alone, and the client's re-uploads equal the replicas' miss and re-upload counters
(docs/client.md, "Follow-ups without re-upload"). Conversations run one at a time here, so haproxy's bounded load
never moves a call (bench/followup_fleet_bench.py measures it under concurrency)."""
from __future__ import annotations

import pytest

from support.affinity import MEDIA, run_mode, single_replica_reference
from support.fleet import start_replicas
from support.haproxy import find_haproxy
from support.paths import VIDEOS

HAPROXY = find_haproxy()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (scripts/setup.sh installs "
                                                         "Debian's package when run as root: apt-get install haproxy)")
CONVERSATIONS, TURNS, MAX_NEW = 4, 5, 8


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    replicas = start_replicas(tmp_path_factory.mktemp("media-fleet"), 2)
    try:
        yield replicas, single_replica_reference(replicas[0], CONVERSATIONS, turns=TURNS, max_new_tokens=MAX_NEW)
    finally:
        for r in replicas:
            r.stop()


def size(script: int) -> int:
    return (VIDEOS / MEDIA[script][0]).stat().st_size


def same_answers(convs, reference) -> None:
    for c in convs:
        ref = reference[c.script]
        assert (c.texts, c.token_ids) == (ref.texts, ref.token_ids), f"script {c.script}"


def test_with_hashing_every_followup_hits_the_replica_that_issued_its_key(fleet):
    replicas, reference = fleet
    convs, server, calls, _ = run_mode(HAPROXY, replicas, "hashing_on", conversations=CONVERSATIONS,
                                       concurrency=1, turns=TURNS, max_new_tokens=MAX_NEW)
    for c in convs:
        assert c.reuploaded == [False] * TURNS, f"script {c.script}: {c.reuploaded}"
        assert c.bytes_sent == [size(c.script)] + [0] * (TURNS - 1)
    assert server == {"videochat_media_reference_hits_total": CONVERSATIONS * (TURNS - 1),
                      "videochat_media_reference_misses_total": 0, "videochat_media_reuploads_total": 0}, server
    assert sum(calls.values()) == CONVERSATIONS * TURNS
    same_answers(convs, reference)


def test_without_hashing_a_miss_is_reuploaded_once_and_answers_the_same(fleet):
    replicas, reference = fleet
    convs, server, calls, _ = run_mode(HAPROXY, replicas, "hashing_off", conversations=CONVERSATIONS,
                                       concurrency=1, turns=TURNS, max_new_tokens=MAX_NEW)
    reuploads = sum(c.reuploads for c in convs)
    print(f"\nhashing off: {reuploads} of {CONVERSATIONS * (TURNS - 1)} follow-ups re-uploaded, calls {calls}")
    assert reuploads >= 1 and min(calls.values()) > 0, calls      # round robin: both replicas, some misses
    for c in convs:
        assert not c.reuploaded[0]                                 # the first turn sends the bytes anyway
        # a follow-up either hit (0 bytes) or missed and went once more with the bytes, never twice
        assert c.bytes_sent[1:] == [size(c.script) if r else 0 for r in c.reuploaded[1:]]
    assert server["videochat_media_reuploads_total"] == reuploads, server
    assert server["videochat_media_reference_misses_total"] == reuploads, server
    assert server["videochat_media_reference_hits_total"] == CONVERSATIONS * (TURNS - 1) - reuploads, server
    assert sum(calls.values()) == CONVERSATIONS * TURNS + reuploads
    same_answers(convs, reference)
