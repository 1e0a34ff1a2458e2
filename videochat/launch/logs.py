"""`serve --log-format json`: one JSON object per line on stdout, for log shippers (Loki, Elasticsearch, ...).

Two sources: tritonserver's own lines (Triton 2.51 writes only text: `I1120 10:20:30.123456 42 file.cc:12] msg`,
the python models' `pb_utils.Logger` lines included), converted by `triton_record`; and the launcher's own
output (its prints on stdout and stderr), converted line by line by `JsonLines`. Fields: `ts` (UTC, when the
launcher read the line), `level` (info | warning | error | verbose), `source` (tritonserver | serve), `msg`, and
`request_id` when the line is about one request (the models tag those `[request_id=ID]`,
videochat.serving.logs), plus `file` and `pid` for Triton's lines."""
from __future__ import annotations

import io
import json
import re
import sys
import threading
from datetime import datetime, timezone
from typing import Any, TextIO

from videochat.serving.logs import REQUEST_ID_RE

LOG_FORMATS = ("text", "json")
_TRITON = re.compile(r"^([IWEV])(\d{4} \d{2}:\d{2}:\d{2}\.\d+)\s+(\d+)\s+([^\s\]]+)\]\s?(.*)$")
_LEVELS = {"I": "info", "W": "warning", "E": "error", "V": "verbose"}
_LOCK = threading.Lock()        # one writer at a time on the real stdout: whole lines, never interleaved


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _with_request_id(record: dict[str, Any]) -> dict[str, Any]:
    match = REQUEST_ID_RE.search(record["msg"])
    if match:
        record["request_id"] = match.group(1)
        record["msg"] = record["msg"][:match.start()] + record["msg"][match.end():]
    return record


def triton_record(line: str) -> dict[str, Any]:
    """One line of tritonserver's output -> a record (a line not in Triton's format: level info, as it is)."""
    text = line.rstrip("\r\n")
    match = _TRITON.match(text)
    if not match:
        return _with_request_id({"ts": _now(), "level": "info", "source": "tritonserver", "msg": text})
    level, stamp, pid, where, msg = match.groups()
    if len(msg) >= 2 and msg[0] == msg[-1] == '"':   # the python backend quotes its models' messages
        msg = msg[1:-1]
    return _with_request_id({"ts": _now(), "level": _LEVELS[level], "source": "tritonserver", "msg": msg,
                             "file": where, "pid": int(pid), "triton_ts": stamp})


def serve_record(line: str, *, level: str = "info") -> dict[str, Any]:
    text = line.rstrip("\r\n")
    if text.startswith("error: "):
        level = "error"
    return _with_request_id({"ts": _now(), "level": level, "source": "serve", "msg": text})


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


class JsonLines(io.TextIOBase):
    """A text stream that writes every complete line given to it as one JSON record on `target` (the launcher's
    prints, unchanged in the code, become JSON); `buffer` is None so byte writers fall back to print."""

    def __init__(self, target: TextIO, *, level: str = "info") -> None:
        super().__init__()
        self.target, self.level = target, level
        self._pending = ""
        self.buffer = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with _LOCK:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                if line.strip():
                    self.target.write(dumps(serve_record(line, level=self.level)))
            if lines:
                self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False


def emit(record: dict[str, Any], target: TextIO | None = None) -> None:
    """A record made elsewhere (tritonserver's lines) onto the real stdout, whole."""
    target = target or sys.__stdout__
    with _LOCK:
        target.write(dumps(record))
        target.flush()


def install_json_stdio() -> JsonLines:
    """Replace sys.stdout/sys.stderr by JSON writers onto the real stdout (one stream for a log shipper);
    returns the stdout one."""
    real = sys.__stdout__
    out = JsonLines(real)
    sys.stdout = out
    sys.stderr = JsonLines(real, level="error")
    return out
