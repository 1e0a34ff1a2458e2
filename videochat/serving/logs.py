"""Request ids in the python models' log lines: `[request_id=ID] message`.

The id is the client's (Triton passes it to every ensemble step, triton_facts §1); the client puts the same id
in its exceptions (`VideoChatError.request_id`), so a caller's error can be found in the server's log.
`videochat.launch.logs` lifts the tag into the `request_id` field of `serve --log-format json`."""
from __future__ import annotations

import re

REQUEST_ID_RE = re.compile(r"\[request_id=([^\]\s]*)\] ?")


def tagged(request_id: str, message: str) -> str:
    """`message` tagged with its request's id ('-' when the client sent none)."""
    return f"[request_id={_clean(request_id) or '-'}] {message}"


def _clean(request_id: str) -> str:
    """Ids are the client's text: no whitespace or ']' may break the tag (or the line)."""
    return re.sub(r"[\s\]]", "_", request_id or "")[:200]
