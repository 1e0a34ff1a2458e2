"""The exception tree and the ONE place where transport errors become it (`to_error`).

    VideoChatError            .code = gRPC status name ("INVALID_ARGUMENT", ...), .message = server's text
    ├── InvalidArgument       INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION; also bad local input
    ├── Unavailable           UNAVAILABLE (unreachable, overloaded, shutting down; also "Server is stopping ..." in
    │                         a stream); NOT_FOUND "Request for unknown model" (draining replica / model not loaded)
    ├── DeadlineExceeded      DEADLINE_EXCEEDED (the per-call deadline expired, here or on the server)
    ├── Cancelled             CANCELLED
    ├── MediaNotCached        NOT_FOUND "media not cached: ..." (a follow-up's media_key is not on this replica;
    │                         generate() resends the turn with the bytes once, so callers with bytes never see it)
    ├── AnswerRestarted       ABORTED, raised by a stream's iterator: its replica was lost mid-answer and the answer
    │                         starts again on another one (iterate on to get it; docs/client.md "Fleets")
    └── ServerError           everything else (INTERNAL, UNKNOWN, UNIMPLEMENTED, RESOURCE_EXHAUSTED, ...)

Why message classification exists: Triton drops the status code of an error that arrives *inside* a gRPC
stream (`ModelStreamInferResponse.error_message` is a bare string; measured with 2.51: a model's
`TritonError(..., INVALID_ARG)` reaches a unary caller as INVALID_ARGUMENT but a stream caller as a message
only). For those we recover the code from the message (`classify_message`); errors of the RPC itself keep
their real status. A message that starts with one of the server's declared prefixes (schema.ERROR_PREFIXES,
after Triton's "in ensemble '...', ") names its code in every case: Triton has no DEADLINE_EXCEEDED, so the
server's deadline errors travel as CANCELLED with the "deadline exceeded: " prefix.
"""
from __future__ import annotations

import re
from typing import Optional

import grpc
from tritonclient.utils import InferenceServerException

from .schema import ERROR_PREFIXES, MEDIA_NOT_CACHED


class VideoChatError(Exception):
    """Base class. `code` is the gRPC status name, `message` the server's (or client's) text."""

    default_code = "UNKNOWN"

    def __init__(self, message: str, *, code: Optional[str] = None, request_id: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(VideoChatError):
    default_code = "INVALID_ARGUMENT"


class Unavailable(VideoChatError):
    default_code = "UNAVAILABLE"


class DeadlineExceeded(VideoChatError):
    default_code = "DEADLINE_EXCEEDED"


class Cancelled(VideoChatError):
    default_code = "CANCELLED"


class ServerError(VideoChatError):
    default_code = "INTERNAL"


class MediaNotCached(VideoChatError):
    default_code = MEDIA_NOT_CACHED
class AnswerRestarted(VideoChatError):
    """Raised by `AnswerStream`/`AsyncAnswerStream` iteration: the connection to the replica that was answering
    was lost mid-answer, and the whole turn was sent again (to another replica). `partial_text` is what had been
    streamed and is now void; iterating the same stream again yields the new answer from its start."""

    default_code = "ABORTED"

    def __init__(self, message: str, *, partial_text: str = "", attempt: int = 2, request_id: Optional[str] = None):
        super().__init__(message, request_id=request_id)
        self.partial_text = partial_text
        self.attempt = attempt


_CLASS_BY_CODE = {
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "FAILED_PRECONDITION": InvalidArgument,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
}

# NOT_FOUND with these words means "this replica has no such model (right now)": a replica that is draining
# after SIGTERM answers exactly this, so it is retryable and, if it persists, the service is unavailable.
_MODEL_MISSING = re.compile(r"Request for unknown model|has no available versions")

# "unavailable: ...", or "in ensemble 'videochat', unavailable: ..." (the prefix Triton adds for a step's error).
_DECLARED = re.compile(r"^(?:in ensemble '[^']*', )?(" + "|".join(re.escape(p) for p in ERROR_PREFIXES.values()) + ")")
_CODE_BY_PREFIX = {p: code for code, p in ERROR_PREFIXES.items()}


def declared_code(message: str) -> Optional[str]:
    """The code the server put at the start of its message, if it did."""
    m = _DECLARED.match(message)
    return _CODE_BY_PREFIX[m.group(1)] if m else None


# Ordered (pattern, code) rules for stream errors that arrive without a status. The first match wins.
_MESSAGE_RULES = (
    # Python backend crashes / raises: a server bug, never the caller's fault.
    (re.compile(r"Stub process .* is not healthy|Failed to process the request|\nAt:\n|Traceback|"
                r"preprocessing failed|internal error", re.I), "INTERNAL"),
    (_MODEL_MISSING, "NOT_FOUND"),
    # A replica draining after SIGTERM (measured on 2.51): while its ensemble still finishes streams, a new request
    # gets "Server is stopping, scheduler for model has stopped accepting new inference requests".
    (re.compile(r"Server exiting|Server is stopping|stopped accepting new inference requests|failed to connect|"
                r"Connection refused"), "UNAVAILABLE"),
    (re.compile(r"\bcancell?ed\b", re.I), "CANCELLED"),
    (re.compile(r"deadline|timed? ?out", re.I), "DEADLINE_EXCEEDED"),
    # An explicit code name in the message (a server may prefix its user errors with it).
    (re.compile(r"INVALID_ARG(UMENT)?\b|invalid argument", re.I), "INVALID_ARGUMENT"),
    # Triton core request validation and our preprocessing/validation wording.
    (re.compile(r"unexpected (shape|inference input|datatype|number of)|expected \d+ inputs?|"
                r"input byte size|invalid|unsupported|(cannot|could not|failed to) decode|corrupt|truncated|"
                r"not a recogni[sz]able|no video stream|no (valid )?frames?|not a video|missing input|"
                r"\bempty\b|must (be|hold)|not valid|out of range|at most|longer than|"
                r"too (large|long|many|big)|exceeds", re.I), "INVALID_ARGUMENT"),
)


def classify_message(message: str) -> str:
    """The gRPC status name a status-less (in-stream) error message most likely had."""
    declared = declared_code(message)
    if declared is not None:
        return declared
    for pattern, code in _MESSAGE_RULES:
        if pattern.search(message):
            return code
    return "UNKNOWN"


def _status_name(status: Optional[str]) -> Optional[str]:
    # tritonclient keeps `str(grpc.StatusCode.X)` == "StatusCode.X"; None inside streams.
    if not status:
        return None
    return status.rsplit(".", 1)[-1].upper()


def error_from_code(code: str, message: str, *, request_id: Optional[str] = None) -> VideoChatError:
    if code == "NOT_FOUND" and _MODEL_MISSING.search(message):
        return Unavailable(message, code="NOT_FOUND", request_id=request_id)
    if code == MEDIA_NOT_CACHED and declared_code(message) == MEDIA_NOT_CACHED:
        return MediaNotCached(message, request_id=request_id)
    cls = _CLASS_BY_CODE.get(code, ServerError)
    return cls(message, code=code, request_id=request_id)


def to_error(exc: BaseException, *, request_id: Optional[str] = None) -> VideoChatError:
    """Convert any transport exception (grpc.RpcError incl. aio, InferenceServerException) to our tree."""
    if isinstance(exc, VideoChatError):
        return exc
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        name = code.name if isinstance(code, grpc.StatusCode) else _status_name(str(code)) or "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return error_from_code(declared_code(details or "") or name, details or "", request_id=request_id)
    if isinstance(exc, InferenceServerException):
        message = exc.message() or ""
        name = declared_code(message) or _status_name(exc.status()) or classify_message(message)
        return error_from_code(name, message, request_id=request_id)
    return ServerError(f"{type(exc).__name__}: {exc}", code="UNKNOWN", request_id=request_id)


def is_retryable(err: VideoChatError) -> bool:
    """Safe to resend the same request: nothing reached a model, or a replica is going away.

    Only called before any token was received (the caller enforces that)."""
    if err.code == "UNAVAILABLE":
        return True
    return err.code == "NOT_FOUND" and bool(_MODEL_MISSING.search(err.message))


# A call cut because its replica (or the path to it) went away: the replica was killed or crashed, a proxy lost
# its backend, a connection was reset. Measured: a SIGKILLed replica's stream ends with INTERNAL "Stream removed
# (RST_STREAM ...)" behind nginx and UNKNOWN "Stream removed (Data frame with END_STREAM flag received)" behind
# haproxy, or CANCELLED "Stream removed (...) (RST_STREAM (Received RST_STREAM with error code 8))" when haproxy
# resets the client's stream (tests/e2e/test_failover.py); a proxy with no backend answers HTTP 502/503, which gRPC
# reports as "Received http2 header with status". (A cancel by this client itself says "Locally cancelled".)
_REPLICA_LOST = re.compile(r"Stream removed|RST_STREAM|Socket closed|Connection reset|Broken pipe|GOAWAY|"
                           r"Received http2 header with status: 50[234]|connection (?:was )?(?:lost|closed|aborted)",
                           re.I)


def is_replica_lost(err: VideoChatError) -> bool:
    """The call failed because its replica or connection went away (not because of the request), so the whole
    turn can be sent again elsewhere, even after part of the answer arrived: the server keeps no state between
    turns (the history is the client's). UNAVAILABLE counts (connection refused or reset, draining replica)."""
    if err.code == "UNAVAILABLE":
        return True
    return err.code in ("INTERNAL", "UNKNOWN", "CANCELLED") and bool(_REPLICA_LOST.search(err.message))
