"""Memory fixes against a real tritonserver (docs/operations.md, "Memory and the soak test"):

* the python stubs' /dev/shm regions grow in `MemoryOptions.shm_growth_mb` steps, so tritonserver maps each
  region only a few times (Triton's 1 MiB default left one mapping per MiB, each counted again in RSS);
* a request that fails inside a stream is closed gracefully by both clients, never cancelled: Triton 2.51
  leaks the request's state (input bytes included) when a client cancels a stream whose request already
  ended. Triton logs "Cancellation notification received" (at --log-verbose 1) for every cancelled stream,
  so the test reads its log; a request the caller abandons mid-answer is the control that the line appears.

The leak and RSS figures themselves come from bench/soak_bench.py, not from a timed test.
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.paths import ROOT, TINY
from support.server import TritonHandle, free_port
from videochat_client import AsyncVideoChatClient, InvalidArgument, VideoChatClient

from videochat.launch.render import RepoOptions, render_repository
from videochat.launch.tritonserver import Endpoints, MemoryOptions, TritonServer, find_triton

VIDEO = (ROOT / "tests" / "data" / "videos" / "example1.mp4").read_bytes()
BAD = (ROOT / "tests" / "data" / "videos" / "random_bytes_64k.mp4").read_bytes()
CANCEL_LINE = "Cancellation notification received"
CONCURRENCY = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("memory")
    repo = render_repository(RepoOptions(checkpoint=TINY, device="cpu", preprocess_instances=1,
                                         stream_interval_ms=0), work / "model_repository")
    endpoints = Endpoints("127.0.0.1", free_port(), free_port(), free_port())
    triton = TritonServer(find_triton(work), repo, endpoints, log_path=work / "tritonserver.log", exit_timeout_s=10,
                          log_verbose=1)
    triton.start()
    try:
        triton.wait_ready(timeout_s=240)
        yield TritonHandle(triton, endpoints.grpc_url)
    finally:
        triton.stop()


def log_text(server: TritonHandle) -> str:
    return Path(server.server.log_path).read_text(errors="replace")


def wait_for_count(server: TritonHandle, text: str, more_than: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_text(server).count(text) > more_than:
            return True
        time.sleep(0.2)
    return False


def region_mappings(pid: int, prefix: str) -> dict[str, int]:
    """Mappings of each of this server's /dev/shm regions in process `pid`."""
    counts: dict[str, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split()[-1]
            if path.startswith(f"/dev/shm/{prefix}"):
                counts[path] = counts.get(path, 0) + 1
    return counts


def test_stub_regions_grow_in_large_steps(server):
    """Concurrent requests make videochat_llm's region grow past Triton's 1 MiB start; in 64 MiB steps, so
    tritonserver holds at most 1 + ceil(growth / step) mappings of each region (1 MiB steps: ~1 per MiB)."""
    with VideoChatClient(server.url, max_retries=0, timeout=120) as client:
        def ask(_):
            return client.conversation(VIDEO).ask("Describe the video.", max_new_tokens=4)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(ask, range(2 * CONCURRENCY)))
    assert all(a.finish_reason in ("stop", "length") for a in answers)
    triton = server.server
    counts = region_mappings(triton.proc.pid, triton.shm_prefix)
    assert counts, "no /dev/shm region of this server is mapped"
    step = MemoryOptions().shm_growth_mb * 1024 * 1024
    sizes = {path: os.stat(path).st_size for path in counts}
    assert max(sizes.values()) > 1024 * 1024, f"no region grew ({sizes}): the test did not exercise growth"
    for path, n in counts.items():
        most = 1 + -(-(sizes[path] - 1024 * 1024) // step)
        assert n <= most, f"{path}: {n} mappings for {sizes[path]} bytes (1 MiB steps would give ~1 per MiB)"


def test_failed_requests_are_not_cancelled(server):
    """Bad media fails with INVALID_ARGUMENT through both clients, and neither cancels the stream afterwards."""
    before = log_text(server).count(CANCEL_LINE)
    with VideoChatClient(server.url, max_retries=0, timeout=60) as client:
        for _ in range(3):
            with pytest.raises(InvalidArgument):
                client.conversation(BAD).ask("What is this?", max_new_tokens=4)

    async def ask_async() -> None:
        async with AsyncVideoChatClient(server.url, max_retries=0, timeout=60) as client:
            for _ in range(3):
                with pytest.raises(InvalidArgument):
                    await client.conversation(BAD).ask("What is this?", max_new_tokens=4)
    asyncio.run(ask_async())
    time.sleep(1.0)   # a cancellation would be logged by the server's completion-queue thread right away
    after = log_text(server).count(CANCEL_LINE)
    assert after == before, "a failed request's stream was cancelled"

    # Control: a caller that stops reading mid-answer cancels, and the server logs it.
    with VideoChatClient(server.url, max_retries=0, timeout=60) as client:
        stream = client.conversation(VIDEO).ask_stream("Describe the video.", max_new_tokens=64)
        next(iter(stream))
        stream.close()
    assert wait_for_count(server, CANCEL_LINE, after), "an abandoned stream was not cancelled (or the log changed)"
