"""A real haproxy (Debian's package) started on free 127.0.0.1 ports with the shipped deploy/haproxy/haproxy.cfg:
the replicas, ports and runtime socket go in through the environment variables that file reads, nothing else
is changed. Its runtime API (`show stat`) tells which replica haproxy holds UP and how many calls each has."""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from support.paths import ROOT
from support.replica import free_ports

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "videochat"
# A header no client sends: with VIDEOCHAT_LB_HASH_HEADER set to it, `balance hdr()` finds nothing to hash and
# haproxy balances round robin (affinity off, same file).
NO_AFFINITY = "x-no-affinity"


def find_haproxy() -> Optional[str]:
    """The haproxy binary (scripts/setup.sh installs Debian's package when it runs as root), or None."""
    for candidate in (shutil.which("haproxy"), "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def environment(replicas: Sequence[tuple[str, int]], *, bind: str, stats_bind: str, sock: str,
                hash_header: Optional[str] = None, balance_factor: Optional[int] = None) -> dict[str, str]:
    """What deploy/haproxy/haproxy.cfg reads: replicas as (host:grpc_port, health_port); `hash_header` sets
    VIDEOCHAT_LB_HASH_HEADER, `balance_factor` VIDEOCHAT_LB_HASH_BALANCE_FACTOR (None: the file's defaults,
    x-session-id and 150)."""
    assert 1 <= len(replicas) <= 4, "the shipped config has four server slots"
    env = {"VIDEOCHAT_LB_BIND": bind, "VIDEOCHAT_LB_STATS_BIND": stats_bind, "VIDEOCHAT_LB_SOCKET": sock}
    if hash_header is not None:
        env["VIDEOCHAT_LB_HASH_HEADER"] = hash_header
    if balance_factor is not None:
        env["VIDEOCHAT_LB_HASH_BALANCE_FACTOR"] = str(balance_factor)
    for i, (addr, health_port) in enumerate(replicas, start=1):
        env[f"VIDEOCHAT_REPLICA_{i}"] = addr
        env[f"VIDEOCHAT_HEALTH_PORT_{i}"] = str(health_port)
    return env


def check_config(binary: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`haproxy -c`: parse and validate the shipped file with these variables."""
    return subprocess.run([binary, "-c", "-f", str(CONFIG)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=30)


class Haproxy:
    """haproxy -db (foreground) in front of `replicas`; `.url` is its gRPC address; `hash_header` and
    `balance_factor`: see `environment` (NO_AFFINITY: round robin)."""

    def __init__(self, binary: str, replicas: Sequence[tuple[str, int]], *, hash_header: Optional[str] = None,
                 balance_factor: Optional[int] = None) -> None:
        self.port, self.stats_port = free_ports(2)
        self.dir = Path(tempfile.mkdtemp(prefix="vc-lb-"))   # short: a unix socket path has at most 107 bytes
        self.socket = self.dir / "admin.sock"
        self.env = environment(replicas, bind=f"127.0.0.1:{self.port}", stats_bind=f"127.0.0.1:{self.stats_port}",
                               sock=str(self.socket), hash_header=hash_header,
                               balance_factor=balance_factor)
        checked = check_config(binary, self.env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.lines: list[str] = []
        self.proc = subprocess.Popen([binary, "-db", "-f", str(CONFIG)], env={**os.environ, **self.env},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, cmd: str) -> str:
        """One runtime API command over the admin socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the backend's servers, by name (fields: status, scur, stot, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(text.splitlines())
        return {r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")}

    def up(self) -> set[str]:
        try:
            return {name for name, row in self.servers().items() if row["status"].startswith("UP")}
        except OSError:
            return set()

    def wait_up(self, names: set[str], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.up() != names:
            assert self.proc.poll() is None, "haproxy exited:\n" + "".join(self.lines[-30:])
            assert time.monotonic() < deadline, f"haproxy UP {self.up()} != {names}:\n" + "".join(self.lines[-30:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
