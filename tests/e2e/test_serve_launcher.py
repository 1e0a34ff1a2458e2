"""`python -m videochat serve` as a user runs it: no checkpoint (the demo one is created), CPU, unary mode
(`--decoupled-mode false`); it answers one plain gRPC ModelInfer and stops cleanly on SIGTERM (exit 0, no
tritonserver or stub left behind)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.paths import ROOT, TINY
from support.server import TritonHandle, free_port


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_serve_demo_checkpoint_unary_and_sigterm(tmp_path):
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "videochat", "serve", "--work-dir", str(tmp_path), "--device", "cpu",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--preprocess-instances", "1", "--decoupled-mode", "false", "--exit-timeout-secs", "10"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines[-40:])
        assert (tmp_path / "demo-checkpoint" / "config.json").is_file()
        answer = TritonHandle(None, f"127.0.0.1:{ports[1]}").infer(
            model="videochat", video=(TINY / "videos" / "example1.mp4").read_bytes(), prompt="What is this?",
            max_new_tokens=5)
        assert 1 <= answer.usage.completion_tokens <= 5 and answer.finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            raise
    assert proc.returncode == 0, "".join(lines[-20:]) + rest[-3000:]
    assert "tritonserver exited with code 0" in rest
    assert processes_mentioning(str(tmp_path)) == []
