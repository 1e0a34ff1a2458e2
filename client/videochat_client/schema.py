"""The wire schema of the public `videochat` ensemble: every input and output, declared once.

Everything else derives from this table: the `config.pbtxt` input/output blocks and the ensemble's step maps
(videochat/launch/render.py), the server's parsing and bounds (videochat/serving/requests.py), the request
tensors this client builds (protocol.py), and the API table in docs/serving.md (`markdown_table`). Pure
Python: importable without torch, numpy or tritonclient, so the client, the server and the docs share it.

Names: lower case on the wire; UPPER case between the ensemble's internal steps (TensorRT-LLM's convention),
so every input_map reads "internal <- external". Dims exclude the batch dimension (max_batch_size > 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

MODEL_NAME = "videochat"

# Consumers of an input: preprocessing decodes the media; the VideoChat model reads the chat fields (which
# preprocessing passes on with defaults filled, see videochat/serving/requests.py for why).
MEDIA, CHAT = "media", "chat"


@dataclass(frozen=True)
class Field:
    """One tensor of the public API."""

    name: str                                  # lower case, as clients send it
    triton_type: str                           # Triton's name without TYPE_: BYTES, BOOL, INT32, INT64, FP32
    doc: str
    dims: Tuple[int, ...] = (1,)
    optional: bool = True
    default: Any = None                        # value the server uses when omitted (None: required or absent)
    bounds: Optional[Tuple[Any, Any]] = None   # inclusive range the server accepts (numbers)
    stage: str = CHAT                          # MEDIA or CHAT (inputs only)

    @property
    def internal(self) -> str:
        """The UPPER-case name between the ensemble's steps."""
        return self.name.upper()

    @property
    def pbtxt_type(self) -> str:
        return "TYPE_STRING" if self.triton_type == "BYTES" else f"TYPE_{self.triton_type}"


@dataclass(frozen=True)
class Defaults:
    """The model card's defaults (InternVideo2-Chat-8B-HD `chat`/`load_video`), the one place they are written."""

    num_segments: int = 8
    hd_num: int = 6
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0                 # 0 = no top-k filtering
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ApiLimits:
    """Bounds of one request that the server checks before any decoding or GPU work (API limits, not model
    facts). The upload size and max_new_tokens ceilings are server settings (`serve --max-video-bytes`,
    `--max-new-tokens-limit`); their defaults are here."""

    max_num_segments: int = 64
    max_hd_num: int = 24
    max_text_bytes: int = 64 * 1024
    max_history_turns: int = 64
    max_video_bytes: int = 512 * 1024 * 1024
    max_new_tokens: int = 1024


DEFAULTS = Defaults()
LIMITS = ApiLimits()


@dataclass(frozen=True)
class MediaOptions:
    """How the server samples the media (defaults = the model card), plus the text that goes with it.
    The server's content cache keys on `decode_options` (the fields that change the pixels)."""

    image: bool = False
    num_segments: int = DEFAULTS.num_segments
    hd_num: int = DEFAULTS.hd_num
    padding: bool = False
    msg: str = ""
    instruction: Optional[str] = None

    @property
    def decode_options(self) -> Tuple[bool, int, int, bool]:
        return (self.image, self.num_segments, self.hd_num, self.padding)
NO_SEED = -1   # the seed value meaning "no seed" between the steps (seeds are >= 0)

INPUTS: Tuple[Field, ...] = (
    Field("video", "BYTES", "the video or image file's bytes (any container/codec FFmpeg reads); may be omitted "
          "when `media_reference` is given", stage=MEDIA),
    # not named media_key: Triton 2.51 refuses an ensemble whose input and output share a name
    Field("media_reference", "BYTES", "instead of `video`: the `media_key` output of an earlier answer (a "
          "follow-up without re-upload); with `video` too, the bytes are used (a re-upload after a miss)",
          stage=MEDIA),
    Field("prompt", "BYTES", "the question (UTF-8)", optional=False),
    Field("history", "BYTES", 'earlier turns as JSON `[["question", "answer"], ...]`', default="[]"),
    Field("msg", "BYTES", "extra text before the question (the model card's `msg`)", default=""),
    Field("instruction", "BYTES", "QFormer instruction; empty = none", default=""),
    Field("image", "BOOL", "true: treat the input as one still image (T = 1)", default=False, stage=MEDIA),
    Field("num_segments", "INT32", "frames sampled from a video", default=DEFAULTS.num_segments,
          bounds=(1, LIMITS.max_num_segments), stage=MEDIA),
    Field("hd_num", "INT32", "most 224x224 tiles per frame (HD tiling)", default=DEFAULTS.hd_num,
          bounds=(1, LIMITS.max_hd_num), stage=MEDIA),
    Field("padding", "BOOL", "pad to the tile grid instead of resizing", default=False, stage=MEDIA),
    Field("max_new_tokens", "INT32", "most tokens to generate (capped by the server's limit)",
          default=DEFAULTS.max_new_tokens, bounds=(1, LIMITS.max_new_tokens)),
    Field("do_sample", "BOOL", "sample instead of greedy decoding", default=False),
    Field("temperature", "FP32", "sampling temperature (> 0)", default=DEFAULTS.temperature),
    Field("top_p", "FP32", "nucleus sampling mass, in (0, 1]", default=DEFAULTS.top_p),
    Field("top_k", "INT32", "top-k sampling; 0 = off", default=DEFAULTS.top_k),
    Field("repetition_penalty", "FP32", "repetition penalty (> 0; 1 = off)", default=DEFAULTS.repetition_penalty),
    Field("seed", "INT64", "seed for sampling (>= 0); omitted = nondeterministic", default=NO_SEED),
)

OUTPUTS: Tuple[Field, ...] = (
    Field("text", "BYTES", "the answer's text (streaming: this response's delta)", optional=False),
    Field("token_ids", "INT32", "the answer's token ids (streaming: this response's delta)", dims=(-1,),
          optional=False),
    Field("prompt_tokens", "INT32", "tokens in the prompt, visual tokens included", optional=False),
    Field("completion_tokens", "INT32", "tokens generated so far", optional=False),
    Field("finish_reason", "BYTES", '"stop", "length" or "cancelled" on the final response, else ""',
          optional=False),
    Field("media_key", "BYTES", "reference to this media for the next turns (send it as `media_reference` instead of `video`); "
          '"" when this replica does not keep its visual tokens (cache off or too small)', optional=False),
)

# Request `parameters` (not tensors: Triton hands them to every step of the ensemble as they are).
# The client's time budget for one attempt, in milliseconds (relative, like gRPC's grpc-timeout header, so no
# clock sync is needed): the server ends a generation, or never starts one, once it has passed.
TIMEOUT_MS_PARAMETER = "timeout_ms"

# Errors inside a gRPC stream reach the client as a bare message (Triton drops the status code), so the server
# starts the messages it means for the client with the code's name; the client maps them back (errors.py).
ERROR_PREFIXES = {
    "INVALID_ARGUMENT": "invalid argument: ",
    "UNAVAILABLE": "unavailable: ",           # overloaded or shutting down: retry later or elsewhere
    "DEADLINE_EXCEEDED": "deadline exceeded: ",
    # a `media_reference` this replica does not hold (evicted, restarted, another replica, never issued): resend the
    # turn with the video's bytes. NOT_FOUND with this prefix only; Triton's own NOT_FOUND ("Request for unknown
    # model") means a draining replica.
    "NOT_FOUND": "media not cached: ",
}
MEDIA_NOT_CACHED = "NOT_FOUND"     # the code of that error
MAX_MEDIA_KEY_BYTES = 256          # a longer media_reference is INVALID_ARGUMENT (keys the server issues are 68)

INPUT_BY_NAME = {f.name: f for f in INPUTS}
MEDIA_INPUTS = tuple(f for f in INPUTS if f.stage == MEDIA)
CHAT_INPUTS = tuple(f for f in INPUTS if f.stage == CHAT)


def markdown_table(fields: Tuple[Field, ...] = INPUTS) -> str:
    """The docs' API table (docs/serving.md embeds it; a test fails when the two differ)."""
    rows = ["| name | type | dims | required | default | bounds | meaning |", "|---|---|---|---|---|---|---|"]
    for f in fields:
        default = "" if f.default is None else repr(f.default).replace("'", '"')
        bounds = "" if f.bounds is None else f"{f.bounds[0]}..{f.bounds[1]}"
        rows.append(f"| `{f.name}` | {f.triton_type} | {list(f.dims)} | {'no' if f.optional else 'yes'} | "
                    f"{default} | {bounds} | {f.doc} |")
    return "\n".join(rows)
