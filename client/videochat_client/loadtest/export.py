"""Per-request export of `videochat loadtest`: one JSON object per request in `<out stem>.requests.jsonl`
next to `--out`, for one's own analysis (percentiles over any window, SLO what-ifs, joining with the server's
log by `request_id`). Times are seconds since the level started (the level's own clock)."""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Sequence, Tuple

from .report import Record

FIELDS = ("level", "start_s", "ttft_s", "end_s", "latency_ms", "ttft_ms", "itl_ms", "prompt_tokens",
          "output_tokens", "status", "finish_reason", "replica", "request_id", "turn", "error_message")


def requests_path(out: str) -> str:
    """/x/run.json -> /x/run.requests.jsonl"""
    return os.path.splitext(out)[0] + ".requests.jsonl"


def request_row(level: Dict[str, object], r: Record) -> Dict[str, object]:
    ttft_s = None if r.ttft_ms is None else r.start + r.ttft_ms / 1e3
    return {"level": level, "start_s": r.start, "ttft_s": ttft_s, "end_s": r.end, "latency_ms": r.latency_ms,
            "ttft_ms": r.ttft_ms, "itl_ms": r.itl_ms, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "status": r.error or "OK", "finish_reason": r.finish_reason or None,
            "replica": r.replica, "request_id": r.request_id or None, "turn": r.turn,
            "error_message": r.error_message[:300] or None}


def write_requests(path: str, levels: Sequence[Tuple[Dict[str, object], Iterable[Record]]]) -> int:
    """(level key, e.g. {"concurrency": 4}, its records) for every level -> JSONL; returns the rows written."""
    rows: List[str] = []
    for level, records in levels:
        for r in sorted(records, key=lambda r: r.start):
            rows.append(json.dumps(request_row(level, r)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(rows) + ("\n" if rows else ""))
    return len(rows)
