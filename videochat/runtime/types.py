"""Request and result types of generation, with their checks (`ChatRequest`, `GenerationParams`,
`TokenEvent`, `ChatResult`, `FinishReason`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from videochat_client.schema import DEFAULTS

from videochat.runtime.chat_format import History, MediaType, normalize_history

# media tensors are [clips, T, channels, height, width]
MEDIA_DIMS = 5
RGB_CHANNELS = 3


class FinishReason(str, enum.Enum):
    STOP = "stop"            # generated EOS
    LENGTH = "length"        # reached max_new_tokens
    CANCELLED = "cancelled"  # should_stop(i) returned True


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """Per-request decoding settings; defaults = the model card's greedy 200-token call (+ HF's sampling
    defaults used only when `do_sample`). `top_k=0` and `top_p=1.0` switch those filters off."""

    max_new_tokens: int = DEFAULTS.max_new_tokens
    do_sample: bool = False
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k
    repetition_penalty: float = DEFAULTS.repetition_penalty
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    """One chat turn about one video or image.

    media: [clips, T, 3, 224, 224] float (fp16/fp32; cast to the model dtype). For images T == 1 and every
           clip becomes one `<Image>` placeholder. None when `visual_tokens` is given.
    visual_tokens: [clips * tokens_per_clip, H], the vision pass's output taken from a cache (a follow-up by
           media_key, docs/serving.md): the engine uses them as they are and encodes nothing.
    history: (question, answer) turns before this one; stored as a tuple, never mutated.
    """

    media: torch.Tensor | None
    prompt: str
    media_type: MediaType = MediaType.VIDEO
    history: History = ()
    msg: str = ""
    instruction: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    media_key: str | None = None   # content hash of the input bytes + preprocessing options; None = never cached
    visual_tokens: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "media_type", MediaType(self.media_type))
        object.__setattr__(self, "history", normalize_history(self.history))
        if self.visual_tokens is not None:
            if self.media is not None:
                raise ValueError("give media or visual_tokens, not both")
            if not isinstance(self.visual_tokens, torch.Tensor) or self.visual_tokens.dim() != 2 \
                    or self.visual_tokens.shape[0] < 1:
                raise ValueError("visual_tokens must be a [clips * tokens_per_clip, H] tensor")
        else:
            validate_media(self.media, self.media_type)
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.media_key is not None and not isinstance(self.media_key, str):
            raise ValueError(f"media_key must be a string or None, got {type(self.media_key).__name__}")

    def clips(self, tokens_per_clip: int) -> int:
        """Clips of the media (one placeholder each in the prompt), also when only the visual tokens are given."""
        if self.media is not None:
            return int(self.media.shape[0])
        rows = int(self.visual_tokens.shape[0])
        if rows % tokens_per_clip:
            raise ValueError(f"visual_tokens has {rows} rows, not a multiple of {tokens_per_clip} per clip")
        return rows // tokens_per_clip

    @property
    def num_clips(self) -> int:
        if self.media is None:
            raise ValueError("num_clips of a request given by visual_tokens: use clips(tokens_per_clip)")
        return int(self.media.shape[0])


@dataclass(frozen=True, kw_only=True)
class TokenEvent:
    """What one request produced in one step. `token_id` is None only for a cancellation event; `text` is the
    new part of the decoded answer (may be "" while an incomplete character is held back)."""

    token_id: int | None
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0       # LLM prompt length of the request (visual tokens included)
    completion_tokens: int = 0   # tokens generated so far, this one included


@dataclass(frozen=True, kw_only=True)
class ChatResult:
    """The answer to one request; `history` = the request's history + (prompt, text)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    history: History


def validate_media(media: torch.Tensor, media_type: MediaType | str) -> None:
    """Raise ValueError unless `media` is [clips >= 1, T >= 1, 3, H, W] (T == 1 for images)."""
    if not isinstance(media, torch.Tensor) or media.dim() != MEDIA_DIMS:
        shape = tuple(media.shape) if isinstance(media, torch.Tensor) else type(media).__name__
        raise ValueError(f"media must be a [clips, T, 3, H, W] tensor, got {shape}")
    clips, frames, channels = media.shape[:3]
    if clips < 1 or frames < 1 or channels != RGB_CHANNELS:
        raise ValueError(f"media must be [clips>=1, T>=1, 3, H, W], got {tuple(media.shape)}")
    if MediaType(media_type) is MediaType.IMAGE and frames != 1:
        raise ValueError(f"image media must have T == 1, got {tuple(media.shape)}")
    if not media.is_floating_point():
        raise ValueError(f"media must be floating point, got {media.dtype}")
