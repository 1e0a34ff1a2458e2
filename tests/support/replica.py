"""Run `python -m videochat serve` as a subprocess for e2e tests: free 127.0.0.1 ports, the demo checkpoint,
CPU; read its output, its readiness endpoint (--health-port) and its tritonserver's stub processes; stop it.

The demo checkpoint is made once per test process (what `serve` without --checkpoint makes) and passed with
--checkpoint, so each server start does not pay the 15 s of building it.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from support.paths import ROOT, VIDEOS

VIDEO = VIDEOS / "example1.mp4"


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@functools.lru_cache(maxsize=1)
def demo_checkpoint() -> Path:
    from videochat.launch.launcher import ensure_demo_checkpoint
    return ensure_demo_checkpoint(Path(tempfile.mkdtemp(prefix="videochat-demo-")) / "demo")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def processes_under(path: Path) -> list[int]:
    """Processes whose command line mentions `path` (a test's work dir): none may outlive the server."""
    text = str(path)
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and text in " ".join(cmdline(int(e.name)))]


class Served:
    """One `python -m videochat serve` process."""

    def __init__(self, work_dir: Path, *extra: str, exit_timeout_s: int = 10) -> None:
        self.work_dir = Path(work_dir)
        self.http_port, self.grpc_port, self.metrics_port, self.health_port = free_ports(4)
        self.cmd = [sys.executable, "-m", "videochat", "serve", "--checkpoint", str(demo_checkpoint()),
                    "--work-dir", str(self.work_dir), "--device", "cpu",
                    "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                    "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                    "--exit-timeout-secs", str(exit_timeout_s), *extra]
        self.lines: list[str] = []
        self.ready_line = threading.Event()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("ready:"):
                self.ready_line.set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self, last: int = 60) -> str:
        return "".join(self.lines[-last:])

    def health_lines(self) -> list[str]:
        return [l.rstrip() for l in self.lines if l.startswith(("health:", "serve:", "ready:"))]

    def wait_ready(self, timeout_s: float = 240) -> "Served":
        deadline = time.monotonic() + timeout_s
        while not self.ready_line.wait(0.5):
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"serve not ready after {timeout_s} s:\n{self.output()}"
        return self

    # -- the launcher's readiness endpoint ---------------------------------------------------------------------
    def readiness(self, path: str = "/ready") -> tuple[Optional[int], dict]:
        """(HTTP status, JSON body); (None, {}) when nothing listens."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            return None, {}

    def wait_readiness(self, want: bool, timeout_s: float, poll_s: float = 0.1) -> float:
        """Seconds until /ready says `want` (200 for True, anything else for False); fails after timeout_s."""
        t0 = time.monotonic()
        while True:
            code, body = self.readiness()
            if (code == 200) == want:
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s, (f"/ready not {want} after {timeout_s} s: {code} {body}\n"
                                                       + "\n".join(self.health_lines()))
            time.sleep(poll_s)

    # -- processes ---------------------------------------------------------------------------------------------
    def triton_pid(self) -> int:
        pids = [p for p in children(self.proc.pid) if cmdline(p)[0].endswith("bin/tritonserver")]
        assert len(pids) == 1, pids
        return pids[0]

    def stub_pids(self, model: str) -> list[int]:
        """Live python stubs of `model` (children of tritonserver; a killed one is a zombie with no cmdline)."""
        return [p for p in children(self.triton_pid())
                if len(cmdline(p)) > 1 and Path(cmdline(p)[1]).parent.parent.name == model]

    def kill_stub(self, model: str) -> int:
        pid = self.stub_pids(model)[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running after {timeout_s} s:\n{self.output()}") from None

    def stop(self, timeout_s: float = 60) -> Optional[int]:
        """SIGTERM and wait; SIGKILL the whole process group if it hangs. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


class Traffic:
    """A client thread sending one short request after another; records (start, end, error or None)."""

    def __init__(self, url: str, *, max_new_tokens: int = 4, timeout_s: float = 10) -> None:
        self.url, self.max_new_tokens, self.timeout_s = url, max_new_tokens, timeout_s
        self.results: list[tuple[float, float, Optional[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)

    def _run(self) -> None:
        from videochat_client import VideoChatClient, VideoChatError
        with VideoChatClient(self.url, timeout=self.timeout_s, max_retries=0) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:   # a new conversation each time: the history must not grow
                    client.conversation(VIDEO, num_segments=2).ask("What happens?", max_new_tokens=self.max_new_tokens)
                    err = None
                except VideoChatError as e:
                    err = str(e)
                self.results.append((t0, time.monotonic(), err))
                if err:
                    time.sleep(0.05)   # a failing replica answers fast: do not spin

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[str]:
        return [e for t0, _, e in self.results if e and since <= t0 < until]

    def started(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for t0, _, _ in self.results if since <= t0 < until)
