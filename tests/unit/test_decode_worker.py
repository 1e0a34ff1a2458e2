"""Decode isolation without Triton: videochat/serving/decode_worker.py's pool of real worker processes, with
the test-only fault switch (VIDEOCHAT_TEST_DECODE_FAULT) making a worker really segfault, hang or allocate
without bound. Each fault fails its job alone, in bounded time, with its documented message; the worker is
replaced; good jobs (also concurrent ones) get the same pixels as an in-process decode. ~2 min on 2 cores,
most of it the zygotes importing torch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from videochat.serving.decode_worker import (DECODER_FAILED, FAULT_ENV, FAULT_MARKER, DecodeFailure, DecodePool,
                                             WorkerError, WorkerUnavailable, armed_faults, out_of_memory,
                                             requested_fault, zygote_env)
from videochat.serving.preprocess import MediaCache, decode_media, media_key, preprocess_request
from videochat.serving.requests import RequestError, getter_from_mapping
from videochat.serving.settings import PreprocessSettings, SettingsError
from videochat_client.errors import classify_message
from videochat_client.schema import MediaOptions

ROOT = Path(__file__).resolve().parents[2]
VIDEOS = ROOT / "tests" / "data" / "videos"
VIDEO = (VIDEOS / "faststart_h264_640x360_6s.mp4").read_bytes()
IMAGE = (VIDEOS / "image.png").read_bytes()
MAX_BYTES = 1 << 29
TIMEOUT_S, MEMORY_MB = 3.0, 256
# a replaced worker is forked by the zygote (no torch import): its start + one decode fit in this on 2 cores
RECOVERY_S = 30.0


def faulty(name: str) -> bytes:
    """A real video carrying the marker: only a worker with the fault armed misbehaves on it."""
    return VIDEO + FAULT_MARKER + name.encode()


@pytest.fixture(scope="module")
def pool():
    p = DecodePool(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, workers=2,
                   env={**os.environ, FAULT_ENV: "segfault,hang,alloc"})
    reports = p.wait_ready()
    assert [r["faults"] for r in reports] == [["alloc", "hang", "segfault"]] * 2
    yield p
    p.close()


def alive(pid: int) -> bool:
    """Running (a zombie or a vanished pid is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_good_inputs_give_the_in_process_pixels(pool):
    for data, opts in ((VIDEO, MediaOptions()), (IMAGE, MediaOptions(image=True, hd_num=4, padding=True))):
        key = media_key(data, opts)
        pixels, info = pool.decode(data, opts, key, MAX_BYTES)
        ref_pixels, ref_info = decode_media(data, opts, key, MAX_BYTES)
        assert pixels.dtype == np.float16 and pixels.shape == ref_pixels.shape
        assert np.array_equal(pixels, ref_pixels)
        assert info == ref_info and json.loads(info)["media_key"] == key


def test_bad_input_keeps_its_message_and_its_worker(pool):
    pids, restarts = pool.pids(), pool.stats.restarts
    with pytest.raises(RequestError) as err:
        pool.decode((VIDEOS / "random_bytes_64k.mp4").read_bytes(), MediaOptions(), "k", MAX_BYTES)
    assert not isinstance(err.value, DecodeFailure)
    assert str(err.value).startswith("bad video: ")
    with pytest.raises(RequestError, match="^bad video: the input is an image"):
        pool.decode(IMAGE, MediaOptions(), "k", MAX_BYTES)
    assert pool.pids() == pids and pool.stats.restarts == restarts


def test_a_bug_in_the_worker_is_a_server_error_and_keeps_the_worker(pool):
    """An exception that is neither bad input nor memory (here Limits(max_bytes=0) raising ValueError, as it
    would in the stub) comes back as WorkerError (INTERNAL in the adapter); the worker is not replaced."""
    pids, restarts = pool.pids(), pool.stats.restarts
    with pytest.raises(WorkerError, match="^ValueError: Limits.max_bytes must be positive"):
        pool.decode(VIDEO, MediaOptions(), "k", 0)
    assert pool.pids() == pids and pool.stats.restarts == restarts


@pytest.mark.parametrize("fault, message, max_s", [
    ("segfault", "the decoder crashed on this input (SIGSEGV)", 10.0),
    ("hang", f"the decoder ran past its time limit on this input (limit {TIMEOUT_S:g} s)", TIMEOUT_S + 5),
    ("alloc", f"the decoder ran out of memory (limit {MEMORY_MB} MB)", 30.0),
])
def test_fault_fails_its_job_alone_and_the_worker_is_replaced(pool, fault, message, max_s):
    before, stats = pool.pids(), dict(vars(pool.stats))
    t0 = time.monotonic()
    with pytest.raises(DecodeFailure) as err:
        pool.decode(faulty(fault), MediaOptions(), "k", MAX_BYTES)
    elapsed = time.monotonic() - t0
    assert str(err.value) == DECODER_FAILED + message
    assert elapsed < max_s, elapsed
    if fault == "hang":
        assert elapsed >= TIMEOUT_S
    counter = {"segfault": "crashes", "hang": "timeouts", "alloc": "out_of_memory"}[fault]
    assert pool.stats.restarts == stats["restarts"] + 1 and getattr(pool.stats, counter) == stats[counter] + 1
    after = pool.pids()
    gone = set(before) - set(after)
    assert len(gone) == 1 and len(after) == 2 and not any(map(alive, gone))
    t0 = time.monotonic()
    for _ in range(2):               # both workers (FIFO: the new one second) decode good input again
        pixels, _ = pool.decode(VIDEO, MediaOptions(num_segments=2), "k", MAX_BYTES)
        assert pixels.shape[2] == 2
    assert time.monotonic() - t0 < RECOVERY_S


def test_a_concurrent_good_job_is_not_affected_by_a_hang(pool):
    errors: list[BaseException] = []
    done = threading.Event()

    def hang():
        try:
            pool.decode(faulty("hang"), MediaOptions(), "k", MAX_BYTES)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=hang)
    thread.start()
    time.sleep(0.3)                  # the hang holds one worker
    t0 = time.monotonic()
    pixels, _ = pool.decode(VIDEO, MediaOptions(num_segments=3), "k", MAX_BYTES)
    assert pixels.shape[2] == 3 and not done.is_set(), "the good job waited for the hang"
    assert time.monotonic() - t0 < TIMEOUT_S
    thread.join(TIMEOUT_S + 10)
    assert len(errors) == 1 and isinstance(errors[0], DecodeFailure) and "time limit" in str(errors[0])


def test_a_killed_zygote_costs_no_request(pool):
    """kill -9 of the zygote (it never decodes, but the OOM killer could pick it): its workers exit by
    themselves, and the next jobs get a new zygote and new workers instead of a 'decoder crashed' error."""
    old_zygote, old_workers = pool.zygote_pid, pool.pids()
    os.kill(old_zygote, signal.SIGKILL)
    assert wait_gone([old_zygote, *old_workers]) == []
    for _ in range(2):
        pixels, _ = pool.decode(VIDEO, MediaOptions(num_segments=4), "k", MAX_BYTES)
        assert pixels.shape[2] == 4
    assert pool.zygote_pid != old_zygote and not set(pool.pids()) & set(old_workers)


def test_a_worker_that_cannot_start_is_a_server_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailable, match="exit code 1"):
        DecodePool(timeout_s=1, memory_mb=64, python="/bin/false")
    assert time.monotonic() - t0 < 10


HELPER = textwrap.dedent("""
    import sys
    from videochat.serving.decode_worker import DecodePool
    pool = DecodePool(timeout_s=5, memory_mb=64, workers=2)
    pool.wait_ready()
    print(" ".join(map(str, [pool.zygote_pid, *pool.pids()])), flush=True)
    if sys.stdin.readline().strip() == "close":
        pool.close()
        print("closed", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("how", ["close", "kill -9 of the parent"])
def test_no_process_outlives_the_pool(how):
    """pool.close() ends the zygote and the workers; so does the death of the process that owns the pool
    (the Triton stub), without any cleanup code running in it."""
    proc = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3 and all(map(alive, pids))
        if how == "close":
            proc.stdin.write("close\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "closed"
            assert [p for p in pids if alive(p)] == []
        else:
            os.kill(proc.pid, signal.SIGKILL)
            assert wait_gone(pids) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_cache_hit_needs_no_decoder():
    tensors = {"VIDEO": np.array([[VIDEO]], dtype=object), "PROMPT": np.array([[b"hi"]], dtype=object)}
    cache, calls = MediaCache(64 << 20), []

    def decode(*args):
        calls.append(args)
        return decode_media(*args)

    first = preprocess_request(getter_from_mapping(tensors), PreprocessSettings(), cache, decode)

    def no_decoder(*args):
        raise AssertionError("a cache hit reached the decoder")

    second = preprocess_request(getter_from_mapping(tensors), PreprocessSettings(), cache, no_decoder)
    assert len(calls) == 1 and np.array_equal(first["PIXEL_VALUES"], second["PIXEL_VALUES"])


def test_the_zygote_imports_the_code_the_stub_imports():
    parts = zygote_env({"PYTHONPATH": "/elsewhere"})["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(ROOT) and parts[-1] == "/elsewhere"


def test_fault_switch_needs_both_the_env_and_the_marker():
    assert armed_faults("") == frozenset() and armed_faults("hang, bogus,alloc") == {"hang", "alloc"}
    armed = armed_faults("segfault,hang")
    assert requested_fault(faulty("hang"), armed) == "hang"
    assert requested_fault(faulty("alloc"), armed) is None          # marked but not armed
    assert requested_fault(VIDEO, armed) is None                    # armed but not marked
    assert requested_fault(faulty("hang"), frozenset()) is None


def test_out_of_memory_is_found_in_the_exception_chain():
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise ValueError("bad video: corrupt video data: Cannot allocate memory")
    except ValueError as exc:
        wrapped = exc
    assert out_of_memory(wrapped)
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not out_of_memory(ValueError("bad video: not a recognizable video or image format"))


def test_messages_stay_invalid_argument_inside_a_stream():
    """In a gRPC stream Triton drops the status; the client library classifies the message. None of the three
    may read as DEADLINE_EXCEEDED or INTERNAL (hence no "timeout" in the time-limit message)."""
    for message in ("the decoder crashed on this input (SIGSEGV)",
                    "the decoder ran past its time limit on this input (limit 120 s)",
                    "the decoder ran out of memory (limit 4096 MB)"):
        full = f"in ensemble 'videochat', invalid argument: {DECODER_FAILED}{message}"
        assert classify_message(full) == "INVALID_ARGUMENT", full


def _settings(**params: str) -> PreprocessSettings:
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    return PreprocessSettings.from_args({"model_config": json.dumps(config)})


def test_settings_defaults_and_parsing():
    default = _settings()
    assert (default.decode_isolation, default.decode_timeout_s, default.decode_memory_mb) == \
        (PreprocessSettings.decode_isolation, PreprocessSettings.decode_timeout_s,
         PreprocessSettings.decode_memory_mb)
    s = _settings(decode_isolation="false", decode_timeout_s="2.5", decode_memory_mb="300")
    assert (s.decode_isolation, s.decode_timeout_s, s.decode_memory_mb) == (False, 2.5, 300)
    for bad in (dict(decode_isolation="yes"), dict(decode_timeout_s="0"), dict(decode_memory_mb="0"),
                dict(decode_timeout_s="soon")):
        with pytest.raises(SettingsError):
            _settings(**bad)


def test_serve_flags_reach_the_preprocessing_config(tmp_path):
    from videochat.launch import launcher
    from videochat.launch.render import RepoOptions, render_repository

    tiny = ROOT / "tests" / "data" / "tiny-videochat"
    args = launcher.build_parser().parse_args(["--device", "cpu"])
    opts = launcher.options_from_args(args, tiny)
    assert (opts.decode_isolation, opts.decode_timeout_s, opts.decode_memory_mb) == \
        (RepoOptions.decode_isolation, RepoOptions.decode_timeout_s, RepoOptions.decode_memory_mb) == \
        (PreprocessSettings.decode_isolation, PreprocessSettings.decode_timeout_s,
         PreprocessSettings.decode_memory_mb)
    args = launcher.build_parser().parse_args(["--device", "cpu", "--decode-isolation", "false",
                                               "--decode-timeout-s", "7.5", "--decode-memory-mb", "640"])
    opts = launcher.options_from_args(args, tiny)
    text = (render_repository(opts, tmp_path / "repo") / "preprocessing" / "config.pbtxt").read_text()
    for key, value in (("decode_isolation", "false"), ("decode_timeout_s", "7.5"), ("decode_memory_mb", "640")):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in text
    with pytest.raises(ValueError, match="decode_timeout_s"):
        RepoOptions(checkpoint=tiny, decode_timeout_s=0)
