"""Decode isolation: user bytes are decoded in worker processes, never in the Triton stub itself.

Why: Triton never restarts a python stub that died; the model still reports READY and fails every later
request (docs/operations.md, "Operational notes": dead stubs stay READY). FFmpeg decoders have crashed, looped and allocated
without bound on crafted files. In a worker such a file costs its own request only:

    the worker died (segfault, abort, ...)  -> "decoder failed: the decoder crashed on this input (SIGSEGV)"
    no answer within timeout_s              -> "decoder failed: the decoder ran past its time limit on this
                                                input (limit 120 s)"
    allocation beyond memory_mb             -> "decoder failed: the decoder ran out of memory (limit 4096 MB)"

All three raise `DecodeFailure`, a RequestError (INVALID_ARGUMENT: it is still the client's input; the prefix
"decoder failed: " tells it apart from "bad video: "; the words avoid "timeout"/"deadline", which the client
library reads as DEADLINE_EXCEEDED in a stream, where Triton drops the status code). The worker is killed and
replaced before the next job. Errors the decoder reports itself ("bad video: ...", "bad media options: ...")
pass through unchanged and the worker keeps serving.

Processes. Importing torch and PyAV takes seconds, so a pool starts one **zygote** process that imports them
once and then only forks workers on request (a fork + a warm-up decode: ~0.1-0.2 s, so a replaced worker is
usually back before the next request). The zygote never decodes, runs no threads, and reaps its children; the pool asks
it how a worker died (signal or exit code). Each worker runs one job at a time over two pipes; a message is
`<header bytes, payload bytes>` + a JSON header + the raw payload (the file one way, the fp16 pixels the
other, read straight into the result array: one copy each side). Pipes, not shared memory: a killed worker
leaves nothing behind (no /dev/shm file), and the copy is small next to decoding
(bench/decode_isolation_bench.py). The memory cap is RLIMIT_DATA (private writable memory: heap, anonymous
mappings, thread stacks; not shared libraries or reserved-only address space), set after the warm-up to the
worker's size then + memory_mb. Nothing outlives the stub: the zygote exits when its socket closes; a worker
exits when its job pipe closes, when its parent is gone (checked every second) and, as a backstop, by SIGALRM
`timeout_s + 30` s into a job.

Test only: VIDEOCHAT_TEST_DECODE_FAULT=segfault,hang,alloc (read by the workers alone) arms faults; an armed
fault fires only for an input that contains b"videochat-test-fault:<name>", so a server started with the
switch serves every other input normally. Never set it in production.
"""
from __future__ import annotations

import faulthandler
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from videochat.serving.preprocess import decode_media
from videochat.serving.requests import MediaOptions, RequestError
from videochat.serving.settings import PreprocessSettings

FAULT_ENV = "VIDEOCHAT_TEST_DECODE_FAULT"
FAULT_MARKER = b"videochat-test-fault:"
FAULTS = ("segfault", "hang", "alloc")
DECODER_FAILED = "decoder failed: "
START_TIMEOUT_S = 300.0         # zygote imports / worker warm-up; seconds, much more on a loaded 2-core machine
OOM_EXIT_CODE = 75              # a worker that cannot even report its MemoryError exits with this code
MB = 1024 * 1024
_FRAME = struct.Struct("<QQ")   # header length, payload length
_ALARM_MARGIN_S = 30
_EXIT_WAIT_S = 5.0
_CONTROL_BYTES = 1 << 16


class DecodeFailure(RequestError):
    """The decoder crashed, hung or ran out of memory on this input; its worker was replaced."""


class WorkerUnavailable(RuntimeError):
    """No decode worker could be started: a server problem, not the input's (INTERNAL)."""


class WorkerError(RuntimeError):
    """An unexpected exception in the worker (a bug of ours, INTERNAL); the worker keeps serving."""


class _Fault(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind, self.detail = kind, detail     # kind: "crash" | "timeout" | "oom"


@dataclass
class PoolStats:
    """Cumulative counts (mirrored to Prometheus by PreprocessMetrics)."""
    decoded: int = 0                # jobs answered with pixels
    crashes: int = 0
    timeouts: int = 0
    out_of_memory: int = 0
    restarts: int = 0               # workers replaced (after any of the three, or a failed start)


def worker_python() -> str:
    """The interpreter for the zygote. In the Triton stub sys.executable may be the stub binary; its sys.prefix
    is the environment of the first python3 on PATH (the venv)."""
    exe = Path(sys.executable) if sys.executable else None
    if exe is not None and exe.name.startswith("python") and exe.is_file():
        return str(exe)
    for name in ("python3", "python"):
        candidate = Path(sys.prefix) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    raise WorkerUnavailable(f"no python interpreter for the decode worker (sys.executable={sys.executable!r}, "
                            f"sys.prefix={sys.prefix!r})")


def zygote_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """`env` (default: ours) with the directories our packages were imported from first on PYTHONPATH, so the
    zygote imports the same code as the stub even where the project is not pip-installed."""
    import importlib.util

    out = dict(os.environ if env is None else env)
    specs = [importlib.util.find_spec(name) for name in ("videochat", "preprocessing", "videochat_client")]
    roots = [str(Path(spec.origin).parent.parent) for spec in specs if spec and spec.origin]   # no import: torch
    parts = [*dict.fromkeys(roots), *(p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p)]
    out["PYTHONPATH"] = os.pathsep.join(parts)
    return out


def _dumps(message: dict) -> bytes:
    # JSON, not pickle: a worker that decodes hostile bytes must not be able to make the stub run code
    return json.dumps(message).encode()


def exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


# -- parent side ---------------------------------------------------------------------------------------------
class _Zygote:
    """The process that forks workers. Request/response over a SOCK_SEQPACKET pair (one message each way,
    file descriptors passed with SCM_RIGHTS); a lock makes concurrent callers take turns."""

    def __init__(self, python: str, env: Mapping[str, str] | None, start_timeout_s: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([python, "-m", "videochat.serving.decode_worker", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         env=zygote_env(env))
        except OSError as exc:
            ours.close()
            raise WorkerUnavailable(f"cannot start the decode zygote: {exc}") from None
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.broken = False                         # a reply went missing: request and reply no longer pair
        self.sock.settimeout(start_timeout_s)
        try:
            self._reply()                           # "ready": torch and PyAV are imported
        except WorkerUnavailable:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def fork(self, memory_mb: int, timeout_s: float) -> tuple[int, int, int]:
        """A new worker: (pid, job pipe write end, result pipe read end)."""
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            reply = self._call({"cmd": "fork", "memory_mb": memory_mb}, timeout_s, fds=[job_r, res_w])
        except BaseException:
            for fd in (job_w, res_r):
                os.close(fd)
            raise
        finally:
            os.close(job_r)                         # the worker's ends: only the worker holds them now
            os.close(res_w)
        return reply["pid"], job_w, res_r

    def wait(self, pid: int, timeout_s: float = _EXIT_WAIT_S) -> int | None:
        """The worker's returncode (negative: killed by that signal) once it exited; None if it did not."""
        return self._call({"cmd": "wait", "pid": pid, "timeout_s": timeout_s}, timeout_s + 10)["returncode"]

    def close(self) -> None:
        """The zygote exits when its socket closes (its workers when their pipes close)."""
        self.sock.close()
        if self.broken:
            self.proc.kill()
        try:
            self.proc.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _call(self, request: dict, timeout_s: float, fds: Sequence[int] = ()) -> dict:
        with self.lock:
            self.sock.settimeout(timeout_s)
            try:
                socket.send_fds(self.sock, [_dumps(request)], list(fds))
            except OSError as exc:
                raise WorkerUnavailable(f"the decode zygote is gone ({exit_status(self.proc.poll())}): "
                                        f"{exc}") from None
            return self._reply()

    def _reply(self) -> dict:
        try:
            raw = self.sock.recv(_CONTROL_BYTES)
        except socket.timeout:
            self.broken = True
            raise WorkerUnavailable("the decode zygote did not answer in time") from None
        except OSError as exc:
            raise WorkerUnavailable(f"the decode zygote is gone: {exc}") from None
        if not raw:
            try:
                rc = self.proc.wait(_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                rc = None
            raise WorkerUnavailable(f"the decode zygote exited ({exit_status(rc)})")
        reply = json.loads(raw)
        if "error" in reply:
            raise WorkerUnavailable(f"the decode zygote failed: {reply['error']}")
        return reply


class _Worker:
    """One forked worker and its two pipes (non-blocking on our side, so every wait has a deadline)."""

    def __init__(self, zygote: _Zygote, memory_mb: int, start_timeout_s: float) -> None:
        self.zygote = zygote
        self.pid, self.job_w, self.res_r = zygote.fork(memory_mb, start_timeout_s)
        os.set_blocking(self.job_w, False)
        os.set_blocking(self.res_r, False)
        self.ready: dict | None = None
        self.returncode: int | None = None

    def wait_ready(self, timeout_s: float) -> dict:
        if self.ready is None:
            try:
                header, _ = self._recv(time.monotonic() + timeout_s, payload=None)
            except _Fault as fault:
                detail = exit_status(self.wait_exit()) if fault.kind == "crash" else f"no answer in {timeout_s:g} s"
                raise WorkerUnavailable(f"the decode worker did not start ({detail})") from None
            self.ready = header
        return self.ready

    def run(self, header: dict, data: bytes, timeout_s: float) -> tuple[np.ndarray, bytes, dict]:
        deadline = time.monotonic() + timeout_s
        self._send(_dumps(dict(header, timeout_s=timeout_s)), data, deadline)
        reply, pixels = self._recv(deadline, payload=_pixel_buffer)
        status = reply["status"]
        if status == "ok":
            return pixels, reply["info"].encode(), reply
        if status == "rejected":
            raise RequestError(reply["message"])
        if status == "oom":
            raise _Fault("oom")
        raise WorkerError(reply["message"])

    def death(self, fault: _Fault) -> _Fault:
        """A broken pipe -> what happened to the worker (it is gone or going): its signal or exit code."""
        if fault.kind != "crash" or fault.detail:       # a detail: it is alive but talks nonsense
            return fault
        rc = self.wait_exit()
        return _Fault("oom") if rc == OOM_EXIT_CODE else _Fault("crash", exit_status(rc))

    def wait_exit(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.zygote.wait(self.pid)
            except WorkerUnavailable:       # zygote gone: it took the status with it
                pass
        return self.returncode

    def is_alive(self) -> bool:
        """Running: not exited (a zombie waiting for the zygote to reap it is dead)."""
        if self.returncode is not None:
            return False
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def kill(self) -> None:
        # Only while the zygote lives: until it reaps the pid, the pid is ours. An orphan (zygote gone) exits
        # by itself within a second, and its pid may already belong to someone else.
        if self.returncode is None and self.zygote.alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_exit()
        self._close_pipes()

    def close(self) -> None:
        """Graceful: the worker exits on EOF of its job pipe; killed if it does not within a few seconds."""
        self._close_pipes()
        if self.zygote.alive:
            self.wait_exit()
            if self.returncode is None:
                self.kill()

    def _close_pipes(self) -> None:
        for fd in (self.job_w, self.res_r):
            if fd >= 0:
                os.close(fd)
        self.job_w = self.res_r = -1

    def _send(self, header: bytes, payload: bytes, deadline: float) -> None:
        for chunk in (_FRAME.pack(len(header), len(payload)), header, payload):
            view, sent = memoryview(chunk), 0
            while sent < len(view):
                _wait(self.job_w, select.POLLOUT, deadline)
                try:
                    sent += os.write(self.job_w, view[sent:])
                except BlockingIOError:
                    continue
                except OSError:             # EPIPE: the worker is gone
                    raise _Fault("crash") from None

    def _recv(self, deadline: float, payload: Callable[[dict, int], np.ndarray] | None) -> tuple[dict, Any]:
        sizes = bytearray(_FRAME.size)
        self._read_into(memoryview(sizes), deadline)
        header_len, payload_len = _FRAME.unpack(sizes)
        raw = bytearray(header_len)
        self._read_into(memoryview(raw), deadline)
        try:
            header = json.loads(raw)
        except ValueError:
            raise _Fault("crash", "it sent a malformed reply") from None
        out = payload(header, payload_len) if payload is not None and payload_len else None
        if out is not None:
            self._read_into(memoryview(out).cast("B"), deadline)
        elif payload_len:
            self._read_into(memoryview(bytearray(payload_len)), deadline)
        return header, out

    def _read_into(self, view: memoryview, deadline: float) -> None:
        got = 0
        while got < len(view):
            _wait(self.res_r, select.POLLIN, deadline)
            try:
                n = os.readv(self.res_r, [view[got:]])
            except BlockingIOError:
                continue
            if n == 0:
                raise _Fault("crash")
            got += n


def _pixel_buffer(header: dict, payload_len: int) -> np.ndarray:
    """The result array the pixels are read into; its size is checked before anything is allocated."""
    shape = [int(d) for d in header.get("shape", ())]
    if not shape or any(d < 0 for d in shape) or int(np.prod(shape)) * 2 != payload_len:
        raise _Fault("crash", f"it sent {payload_len} bytes for shape {shape}")   # the pipe is out of step now
    return np.empty(shape, np.float16)


def _wait(fd: int, event: int, deadline: float) -> None:
    """Until fd is ready for `event` (or hung up: the read/write then says so); _Fault("timeout") at deadline."""
    poller = select.poll()
    poller.register(fd, event)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Fault("timeout")
        if poller.poll(max(1, int(remaining * 1000))):
            return


class DecodePool:
    """`workers` worker processes forked by one zygote, one job at a time each; `decode` is a preprocess.Decode.

    A job waits for an idle worker; its time limit starts once it has one that is ready (a worker's start is
    not charged to the input). A crash, time-out or OOM kills the worker and forks its replacement at once."""

    def __init__(self, *, timeout_s: float, memory_mb: int, workers: int = 1, python: str | None = None,
                 env: Mapping[str, str] | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 log: Callable[[str], None] | None = None) -> None:
        if workers < 1 or not timeout_s > 0 or memory_mb < 1:
            raise ValueError(f"bad pool settings: workers={workers} timeout_s={timeout_s} memory_mb={memory_mb}")
        self.timeout_s, self.memory_mb, self.start_timeout_s = timeout_s, memory_mb, start_timeout_s
        self._python = python or worker_python()
        self._env = env
        self._log = log or (lambda message: None)
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._zygote = _Zygote(self._python, env, start_timeout_s)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._closed = False
        try:
            for _ in range(workers):
                self._idle.put(self._spawn())
        except WorkerUnavailable:
            self.close()
            raise

    def wait_ready(self) -> list[dict]:
        """Block until every worker is ready (raises WorkerUnavailable); their ready reports. Only while no
        job runs (it reads the workers' pipes): before the pool is used, or between jobs."""
        with self._lock:
            workers = list(self._all)
        return [w.wait_ready(self.start_timeout_s) for w in workers]

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._all)

    @property
    def zygote_pid(self) -> int:
        return self._zygote.proc.pid

    def decode(self, data: bytes, opts: MediaOptions, key: str, max_bytes: int) -> tuple[np.ndarray, bytes]:
        if self._closed:
            raise WorkerUnavailable("the decode pool is closed")
        worker = self._idle.get()           # None: a slot whose worker could not be started; retried now
        try:
            if worker is not None and not worker.is_alive():
                # died between jobs (its zygote was killed, the OOM killer, ...): not this input's doing
                worker = self._retire(worker, "found dead before its next job", replace=False)
            if worker is None:
                worker = self._spawn()
            try:
                worker.wait_ready(self.start_timeout_s)
            except WorkerUnavailable as exc:
                worker = self._retire(worker, str(exc), replace=False)
                raise
            try:
                pixels, info, _ = worker.run({"opts": asdict(opts), "key": key, "max_bytes": max_bytes}, data,
                                             self.timeout_s)
            except _Fault as fault:
                if fault.kind == "crash" and not worker.zygote.alive:
                    # the worker went with its zygote (killed from outside): nothing says the input did it
                    worker = self._retire(worker, "its zygote died during the job", replace=False)
                    raise WorkerUnavailable("the decode zygote died during the job") from None
                fault = worker.death(fault)
                self._count(fault.kind)
                message = self._message(fault)
                worker = self._retire(worker, message, replace=True)
                raise DecodeFailure(message) from None
            with self._lock:
                self.stats.decoded += 1
            return pixels, info
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            w.close()
        self._zygote.close()

    def _message(self, fault: _Fault) -> str:
        if fault.kind == "timeout":
            return f"{DECODER_FAILED}the decoder ran past its time limit on this input (limit {self.timeout_s:g} s)"
        if fault.kind == "oom":
            return f"{DECODER_FAILED}the decoder ran out of memory (limit {self.memory_mb} MB)"
        return f"{DECODER_FAILED}the decoder crashed on this input ({fault.detail})"

    def _count(self, kind: str) -> None:
        field = {"crash": "crashes", "timeout": "timeouts", "oom": "out_of_memory"}[kind]
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def _spawn(self) -> _Worker:
        with self._lock:
            if not self._zygote.alive:      # never seen: it decodes nothing; but a pool must not die with it
                self._log(f"decode zygote {self._zygote.proc.pid} is gone or confused "
                          f"({exit_status(self._zygote.proc.poll())}); starting a new one")
                self._zygote.close()
                self._zygote = _Zygote(self._python, self._env, self.start_timeout_s)
            zygote = self._zygote
        worker = _Worker(zygote, self.memory_mb, self.start_timeout_s)
        with self._lock:
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker, why: str, *, replace: bool) -> _Worker | None:
        """Kill and reap `worker`; with `replace`, fork its successor now (it warms up while the failed
        request's error goes out). None: the slot is empty and the next job tries again."""
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.stats.restarts += 1
        new = None
        if replace:
            try:
                new = self._spawn()
            except WorkerUnavailable as exc:
                why += f"; no replacement yet: {exc}"
        self._log(f"decode worker {worker.pid} ({exit_status(worker.returncode)}) "
                  f"{'replaced by ' + str(new.pid) if new else 'retired'}: {why}")
        return new


class InProcessDecoder:
    """--decode-isolation false: decode in the stub itself (a crash there takes the instance down for good)."""
    stats = None

    @staticmethod
    def decode(data: bytes, opts: MediaOptions, key: str, max_bytes: int) -> tuple[np.ndarray, bytes]:
        return decode_media(data, opts, key, max_bytes)

    def close(self) -> None:
        pass


def open_decoder(settings: PreprocessSettings,
                 log: Callable[[str], None] | None = None) -> DecodePool | InProcessDecoder:
    """What the preprocessing model decodes with. One worker: a model instance executes one request at a time
    (more instances, more workers). Waits until it is ready, so a worker that cannot start fails the load."""
    if not settings.decode_isolation:
        return InProcessDecoder()
    pool = DecodePool(timeout_s=settings.decode_timeout_s, memory_mb=settings.decode_memory_mb, log=log)
    try:
        pool.wait_ready()
    except WorkerUnavailable:
        pool.close()
        raise
    return pool


# -- zygote and worker side ----------------------------------------------------------------------------------
def armed_faults(value: str) -> frozenset[str]:
    """FAULT_ENV's value -> the fault names it arms (unknown names are ignored: test-only, never fatal)."""
    return frozenset(name.strip() for name in value.split(",") if name.strip() in FAULTS)


def requested_fault(data: bytes | bytearray, armed: frozenset[str]) -> str | None:
    """The armed fault this input asks for with b"videochat-test-fault:<name>", if any."""
    if not armed:
        return None
    at = data.find(FAULT_MARKER)
    if at < 0:
        return None
    tail = bytes(data[at + len(FAULT_MARKER): at + len(FAULT_MARKER) + 16])
    return next((name for name in armed if tail.startswith(name.encode())), None)


def _inject(fault: str) -> None:
    if fault == "segfault":
        import ctypes
        ctypes.string_at(0)                 # SIGSEGV, like a decoder reading through a bad pointer
    elif fault == "hang":
        while True:                         # an endless decode loop (sleeping: kinder to shared CPUs)
            time.sleep(3600)
    elif fault == "alloc":
        chunks = []
        while True:                         # touched memory, until the cap stops it
            chunks.append(b"\x01" * (64 * MB))


def out_of_memory(exc: BaseException) -> bool:
    """Did an allocation fail anywhere in this exception's chain (Python, numpy, FFmpeg ENOMEM, torch)?"""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "not enough memory" in str(e)):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def _vm_data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmData missing from /proc/self/status")


def _tiny_png() -> bytes:
    """A 16x16 grey PNG, for the warm-up decode."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + b"\x80" * 48 for _ in range(16))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _read_exact(fd: int, n: int) -> bytearray | None:
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def _write_all(fd: int, *chunks: bytes | memoryview) -> None:
    for chunk in chunks:
        view, sent = memoryview(chunk).cast("B"), 0
        while sent < len(view):
            sent += os.write(fd, view[sent:])


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


_OOM_REPLY = {"status": "oom"}     # made before memory runs out


def _run_job(header: dict, data: bytearray, armed: frozenset[str]) -> tuple[dict, np.ndarray | None]:
    t0 = time.perf_counter()
    try:
        fault = requested_fault(data, armed)
        if fault is not None:
            _inject(fault)
        pixels, info = decode_media(data, MediaOptions(**header["opts"]), header["key"], header["max_bytes"])
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply; the frames (and memory) go with exc
        if out_of_memory(exc):
            reply = _OOM_REPLY
        elif isinstance(exc, RequestError):
            reply = {"status": "rejected", "message": str(exc)}
        else:
            reply = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        return reply, None
    reply = {"status": "ok", "shape": list(pixels.shape), "info": info.decode(),
             "decode_ms": (time.perf_counter() - t0) * 1e3}
    return reply, np.ascontiguousarray(pixels, dtype=np.float16)


def _serve_jobs(job_fd: int, res_fd: int, memory_mb: int) -> int:
    """A forked worker: warm up, cap memory, say ready, then one job after the other until the pipe closes."""
    import resource

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    armed = armed_faults(os.environ.get(FAULT_ENV, ""))
    decode_media(_tiny_png(), MediaOptions(image=True, num_segments=1, hd_num=1), "warm-up", MB)
    base = _vm_data_bytes()
    limit = base + memory_mb * MB
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    raw = _dumps({"status": "ready", "pid": os.getpid(), "base_mb": base // MB, "limit_mb": limit // MB,
                        "faults": sorted(armed)})
    _write_all(res_fd, _FRAME.pack(len(raw), 0), raw)
    while True:
        sizes = _read_exact(job_fd, _FRAME.size)
        if sizes is None:
            return 0                                # the pool closed our pipe: done
        header_len, data_len = _FRAME.unpack(sizes)
        header = json.loads(_read_exact(job_fd, header_len) or b"{}")
        data = _read_exact(job_fd, data_len) if data_len else bytearray()
        if data is None:
            return 0
        signal.alarm(int(header["timeout_s"]) + _ALARM_MARGIN_S)   # backstop if the pool cannot kill us
        try:
            reply, pixels = _run_job(header, data, armed)
            del data
            raw = _dumps(reply)
        except MemoryError:                 # not even the reply fits: say it with the exit code
            os._exit(OOM_EXIT_CODE)
        payload = memoryview(pixels).cast("B") if pixels is not None else b""
        _write_all(res_fd, _FRAME.pack(len(raw), len(payload)), raw, payload)
        signal.alarm(0)


def _fork_worker(job_fd: int, res_fd: int, memory_mb: int, control: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:                                    # the worker: never returns into the zygote's loop
        code = 1
        try:
            control.close()
            code = _serve_jobs(job_fd, res_fd, memory_mb)
        except MemoryError:
            code = OOM_EXIT_CODE
        except BaseException:  # noqa: BLE001 - a worker that failed to start: the pool sees the exit code
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(job_fd)
    os.close(res_fd)
    return pid


def _wait_child(pid: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def zygote_main(control_fd: int) -> int:
    """`python -m videochat.serving.decode_worker CONTROL_FD` (started by DecodePool only): import what a
    decode needs, then fork a worker per "fork" request and report exits per "wait", until the socket closes.
    Single-threaded on purpose (a fork copies only the calling thread)."""
    faulthandler.enable()       # a crash prints the stack into the server log; forked workers inherit it
    control = socket.socket(fileno=control_fd)
    import preprocessing            # noqa: F401 - torch + PyAV, imported once for every worker
    control.send(_dumps({"status": "ready", "pid": os.getpid()}))
    while True:
        try:
            raw, fds, _flags, _addr = socket.recv_fds(control, _CONTROL_BYTES, 2)
        except ConnectionResetError:
            return 0
        if not raw:
            return 0                                # the pool is gone: so are we (workers follow)
        request = json.loads(raw)
        try:
            if request["cmd"] == "fork":
                reply = {"pid": _fork_worker(fds[0], fds[1], request["memory_mb"], control)}
            elif request["cmd"] == "wait":
                reply = {"returncode": _wait_child(request["pid"], request["timeout_s"])}
            else:
                reply = {"error": f"unknown command {request['cmd']!r}"}
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        control.send(_dumps(reply))


if __name__ == "__main__":
    code = zygote_main(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)                  # skip interpreter teardown (seconds with torch loaded); nothing to clean
