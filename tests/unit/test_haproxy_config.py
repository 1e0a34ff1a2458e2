"""deploy/haproxy/haproxy.cfg with the real haproxy, no Triton: it parses (`haproxy -c`) with one to four
replicas and refuses to start with none; the settings the deployment guide promises are in it; and its health
check really reads a replica's GET /ready on the health port over HTTP/1 (a stdlib server plays the launcher's
endpoint): UP on 200, DOWN within a second of a 503 (a draining replica), UP again after two good checks; and
its affinity: calls with one `x-session-id` all reach one backend (two plain grpcio servers play the replicas),
while VIDEOCHAT_LB_HASH_HEADER naming a header no client sends spreads them round robin (hashing off).
The full path (gRPC through haproxy to real replicas, faults) is tests/e2e/test_failover.py."""
from __future__ import annotations

import http.server
import re
import threading
import time

from concurrent import futures

import grpc
import pytest

from support.haproxy import CONFIG, NO_AFFINITY, Haproxy, check_config, environment, find_haproxy

HAPROXY = find_haproxy()
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (scripts/setup.sh installs "
                                                            "Debian's package when run as root)")


def test_haproxy_config_has_the_documented_settings():
    text = CONFIG.read_text()
    for setting in (r"bind \"\$\{VIDEOCHAT_LB_BIND-[^}]+\}\" proto h2",
                    r"balance hdr\(\"\$\{VIDEOCHAT_LB_HASH_HEADER-x-session-id\}\"\)", r"hash-type consistent",
                    r"hash-balance-factor \"\$\{VIDEOCHAT_LB_HASH_BALANCE_FACTOR-150\}\"",
                    r"option httpchk GET /ready", r"default-server proto h2 ",
                    r"timeout server 10m", r"timeout client 10m", r"timeout tunnel", r"hard-stop-after",
                    r"tune.h2.initial-window-size", r"tune.bufsize"):
        assert re.search(setting, text), setting
    servers = re.findall(r"^\s*server (r\d) .*$", text, re.M)
    assert servers == ["r1", "r2", "r3", "r4"]
    # haproxy 2.6 ignores check-proto in default-server: every server line needs its own
    assert all("check-proto h1" in line for line in re.findall(r"^\s*server r\d .*$", text, re.M))
    settings = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    assert "shutdown-sessions" not in settings    # a replica marked down keeps its calls in flight (drain)


@needs_haproxy
@pytest.mark.parametrize("n", [1, 4])
def test_haproxy_config_is_valid_with_one_to_four_replicas(n):
    env = environment([(f"127.0.0.1:{9001 + i}", 9101 + i) for i in range(n)], bind="127.0.0.1:9000",
                      stats_bind="127.0.0.1:9404", sock="/tmp/videochat-haproxy-check.sock")
    done = check_config(HAPROXY, env)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_haproxy
@pytest.mark.parametrize("factor, valid", [(0, True), (150, True), (100, False)])
def test_haproxy_bounded_load_factor_comes_from_the_environment(factor, valid):
    env = environment([("127.0.0.1:9001", 9101)], bind="127.0.0.1:9000", stats_bind="127.0.0.1:9404",
                      sock="/tmp/videochat-haproxy-check.sock", balance_factor=factor)
    done = check_config(HAPROXY, env)
    assert (done.returncode == 0) == valid, done.stdout + done.stderr
    if not valid:   # haproxy's own rule, so a typo is caught at start, not by skewed load
        assert "must be 0 or greater than 100" in done.stderr


@needs_haproxy
def test_haproxy_config_without_a_replica_is_refused():
    done = check_config(HAPROXY, {"VIDEOCHAT_LB_SOCKET": "/tmp/videochat-haproxy-check.sock"})
    assert done.returncode != 0 and "server" in (done.stdout + done.stderr)


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).paths.append((self.path, self.request_version))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@needs_haproxy
def test_haproxy_checks_the_launchers_ready_endpoint_over_http1():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    health_port = server.server_address[1]
    lb = Haproxy(HAPROXY, [(f"127.0.0.1:{health_port}", health_port)])
    try:
        lb.wait_up({"r1"}, timeout_s=10)
        assert ("/ready", "HTTP/1.0") in _Ready.paths      # httpchk: HTTP/1.0, not h2
        _Ready.status = 503
        t0 = time.monotonic()
        lb.wait_up(set(), timeout_s=5)
        down_s = time.monotonic() - t0
        _Ready.status = 200
        lb.wait_up({"r1"}, timeout_s=5)
        print(f"\nhaproxy: DOWN {down_s * 1e3:.0f} ms after /ready turned 503")
        assert down_s < 1.5
    finally:
        lb.stop()
        server.shutdown()


class _AnyCall(grpc.GenericRpcHandler):
    """Answers every gRPC method with empty bytes: an h2 backend for haproxy that is not Triton."""

    def service(self, handler_call_details):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: b"")


def _grpc_backend() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(_AnyCall(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@needs_haproxy
@pytest.mark.parametrize("hash_header, sticky", [(None, True), ("x-user-id", True), (NO_AFFINITY, False)])
def test_haproxy_affinity_follows_the_hash_header_variable(hash_header, sticky):
    health = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Ready", (_Ready,), {"status": 200, "paths": []}))
    health.handle_error = lambda *args: None    # haproxy closes check connections early: no tracebacks
    threading.Thread(target=health.serve_forever, daemon=True).start()
    backends = [_grpc_backend() for _ in range(2)]
    lb = Haproxy(HAPROXY, [(f"127.0.0.1:{port}", health.server_address[1]) for _, port in backends],
                 hash_header=hash_header)
    header = hash_header if hash_header not in (None, NO_AFFINITY) else "x-session-id"
    try:
        lb.wait_up({"r1", "r2"}, timeout_s=10)
        with grpc.insecure_channel(lb.url) as channel:
            call = channel.unary_unary("/videochat.Test/Call")
            for _ in range(8):     # one after the other: bounded load (hash-balance-factor) never moves one
                call(b"", metadata=[(header, "conversation-1")], timeout=5)
        calls = sorted(int(row["stot"] or 0) for row in lb.servers().values())
        # off: haproxy's round robin over the consistent-hash ring spreads them, not strictly one by one
        assert sum(calls) == 8 and (calls[0] == 0 if sticky else calls[0] > 0), calls
    finally:
        lb.stop()
        health.shutdown()
        for server, _ in backends:
            server.stop(None)
