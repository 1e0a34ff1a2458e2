"""The launcher's own health endpoint: what load balancers and Kubernetes probes should check.

    GET /ready  200 while the replica serves (the last check passed), 503 otherwise (starting, a check failed,
                recovering, draining after SIGTERM, giving up)
    GET /live   200 while the launcher runs and has not given up, 503 once it is stopping for good
    body        JSON: the supervisor's status (phase, reason, last probe, recoveries, ...)

Triton's own /v2/health/ready stays 200 with a dead stub (2.51), so it cannot be the signal.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class ReadinessServer:
    """A tiny HTTP server in a daemon thread. `status()` returns a dict with at least "ready" and "live"."""

    def __init__(self, host: str, port: int, status: Callable[[], dict]) -> None:
        self._status = status
        handler = self._handler()
        self.httpd = ThreadingHTTPServer((host, port), handler)   # OSError if the port is taken
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="videochat-readiness", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "ReadinessServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type:
        status = self._status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                key = {"/ready": "ready", "/live": "live"}.get(self.path.split("?", 1)[0].rstrip("/"))
                if key is None:
                    self._send(404, {"error": "not found; GET /ready or /live"})
                    return
                state = status()
                self._send(200 if state.get(key) else 503, state)

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:   # probes every second would flood the launcher's output
                pass

        return Handler
