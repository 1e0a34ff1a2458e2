"""Generation types and token selection; the fixed-batch API over the continuous-batching engine.

Request/result types (`ChatRequest`, `GenerationParams`, `TokenEvent`, `ChatResult`), streaming
detokenisation and sampling live here; `videochat.runtime.engine.GenerationEngine` runs the batch (requests join
and leave between decode steps). `generate_stream(model, requests)` adds all requests to one engine and
yields one `TokenEvent | None` per request per step; `generate(model, requests)` is the non-streaming
wrapper. Equivalence with the reference (batch size 1, HF `generate`, spec §6, quirks Q5, Q6, Q14, Q16):

* prompts are left-padded with an attention mask and position ids `cumsum(mask) - 1`, as HF `generate` does,
  so a request's tokens do not depend on its batch-mates (tested token for token);
* greedy is `argmax` of the float32 logits; EOS is masked at a request's first step (the `min_length=1`
  quirk of the transformers version the reference ran on, Q6);
* sampling follows HF's processor order (repetition penalty over generated ids, temperature, top-k, top-p)
  with one `torch.Generator` per request, so a seeded request samples the same tokens in any batch;
* text is decoded like `batch_decode(skip_special_tokens=True)` with the slow tokenizer; the streamed deltas
  concatenate to exactly that text.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from videochat_client.schema import DEFAULTS

from videochat.runtime.chat_format import History, MediaType, append_turn, normalize_history

# media tensors are [clips, T, channels, height, width]
MEDIA_DIMS = 5
RGB_CHANNELS = 3
# `generate_caption` hard-codes min_length=1; transformers 4.38 (the reference) applies it to the new tokens,
# i.e. EOS cannot be the first generated token (spec §6). transformers >= 4.40 would not mask.
MIN_NEW_TOKENS = 1
# decode settings of the reference's `batch_decode` (explicit, not left to the tokenizer config)
DECODE_KWARGS = dict(skip_special_tokens=True, spaces_between_special_tokens=False,
                     clean_up_tokenization_spaces=False)
# what an incomplete UTF-8 sequence (byte-fallback tokens) decodes to; held back while streaming
INCOMPLETE_CHAR = "\ufffd"
_SEED_BITS = 63


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
           clip becomes one `<Image>` placeholder.
    history: (question, answer) turns before this one; stored as a tuple, never mutated.
    """

    media: torch.Tensor
    prompt: str
    media_type: MediaType = MediaType.VIDEO
    history: History = ()
    msg: str = ""
    instruction: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    media_key: str | None = None   # content hash of the input bytes + preprocessing options; None = never cached

    def __post_init__(self):
        object.__setattr__(self, "media_type", MediaType(self.media_type))
        object.__setattr__(self, "history", normalize_history(self.history))
        validate_media(self.media, self.media_type)
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.media_key is not None and not isinstance(self.media_key, str):
            raise ValueError(f"media_key must be a string or None, got {type(self.media_key).__name__}")

    @property
    def num_clips(self) -> int:
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


# --------------------------------------------------------------------------------------------- detokenisation

class IncrementalDetokenizer:
    """Streams the text of a growing id list so that the deltas concatenate to exactly
    `tokenizer.decode(all_ids, **DECODE_KWARGS)`.

    Each step decodes a short window (the ids since the last-but-one emission) twice — without and with the new
    ids — and emits the difference (the TGI/vLLM scheme, linear instead of quadratic in the answer length);
    a tail that decodes to an incomplete UTF-8 character is held back. `finish()` decodes everything once and
    emits whatever the window scheme has not (normally nothing, or a held-back `\\ufffd`).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        # `skip_special_tokens=True` done here, by id: the slow tokenizer re-derives its special-token list for
        # every token it decodes, which was ~40% of a batch-16 decode step of the demo model on CPU.
        kept = [i for i in ids if i not in self._special_ids]
        return self._tokenizer.decode(kept, **{**DECODE_KWARGS, "skip_special_tokens": False})

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(INCOMPLETE_CHAR) \
                or not new_text.startswith(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """The rest of the final text. Raises if the streamed text is not a prefix of it (a tokenizer whose
        decoding is not local would need the quadratic full re-decode)."""
        final = self._decode(self.ids)
        if not final.startswith(self.emitted):
            raise RuntimeError(f"incremental detokenisation diverged: streamed {self.emitted!r}, "
                               f"full decode {final!r}")
        delta = final[len(self.emitted):]
        self.emitted = final
        return delta


# --------------------------------------------------------------------------------------------- token selection

def apply_repetition_penalty(logits: torch.Tensor, generated: Sequence[int], penalty: float) -> torch.Tensor:
    """HF `RepetitionPenaltyLogitsProcessor` on one row [V]; the reference calls `generate(inputs_embeds=...)`,
    so only the generated ids count (the prompt is not in `input_ids`)."""
    if penalty == 1.0 or not generated:
        return logits
    ids = torch.tensor(sorted(set(generated)), device=logits.device)
    scores = logits.gather(0, ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, ids, scores)


def filter_top_k_top_p(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """HF `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1) on one row [V]."""
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[-1] = False  # keep at least the best token
        remove = remove_sorted.scatter(0, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, -float("inf"))
    return logits


def sample_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """Temperature, top-k, top-p, then one multinomial draw from `generator`; `logits` is one float32 row [V]."""
    logits = filter_top_k_top_p(logits / params.temperature, top_k=params.top_k, top_p=params.top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


def make_generator(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    if not params.do_sample:
        return None
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(_SEED_BITS)
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------- batch helpers

def tokens_per_clip(model) -> int:
    """Visual tokens per clip (view) = num_query_token + extra_num_query_token of the bridge config."""
    return int(model.config.num_visual_tokens_per_clip)


def eos_token_ids(model) -> frozenset[int]:
    """EOS id(s) from the LLM config (the reference stops on the LM generation config's EOS), else the
    tokenizer's."""
    eos = getattr(model.llm.config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos)


def left_pad(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, H] per request -> inputs_embeds [B, L_max, H] (zeros on the left) and attention_mask [B, L_max]."""
    longest = max(e.shape[0] for e in embeds)
    batch = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for row, e in enumerate(embeds):
        batch[row, longest - e.shape[0]:] = e
        mask[row, longest - e.shape[0]:] = 1
    return batch, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position ids [B, L] = cumsum(mask) - 1 (as HF generate), 1 at padding (never attended)."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


# --------------------------------------------------------------------------------------------- fixed-batch API
# Thin wrappers over `videochat.runtime.engine.GenerationEngine` (imported lazily: the engine imports this module's
# types), so there is one prefill and one decode code path.

def first_step_logits(model, requests: Sequence[ChatRequest]) -> torch.Tensor:
    """Raw logits [B, V] (float32) of the first generated position, computed by the same batched prefill as
    generation (for parity checks against the reference and for scoring)."""
    from videochat.runtime.engine import GenerationEngine
    engine = GenerationEngine(model)
    engine.add(requests)
    return engine.pending_logits


def generate_stream(model, requests: Sequence[ChatRequest],
                    should_stop: Callable[[int], bool] | None = None) -> Iterator[list[TokenEvent | None]]:
    """Generate for all requests together; yield, per step, one `TokenEvent | None` per request (None once the
    request has finished). `should_stop(i)` is asked before every step; True cancels request i.

    All requests join one `GenerationEngine` at once; finished requests leave the batch (their rows are dropped
    from the KV cache), so a long answer never pays for finished batch-mates.
    """
    from videochat.runtime.engine import GenerationEngine
    engine = GenerationEngine(model)
    index = {handle: i for i, handle in enumerate(engine.add(requests))}
    while engine.num_active:
        events: list[TokenEvent | None] = [None] * len(requests)
        if should_stop is not None:
            for handle in engine.handles:
                if should_stop(index[handle]):
                    events[index[handle]] = engine.cancel(handle)
        for handle, event in engine.step():
            events[index[handle]] = event
        yield events


def generate(model, requests: Sequence[ChatRequest],
             should_stop: Callable[[int], bool] | None = None) -> list[ChatResult]:
    """Non-streaming wrapper of `generate_stream`: one `ChatResult` per request, in order."""
    token_ids: list[list[int]] = [[] for _ in requests]
    texts = [""] * len(requests)
    reasons: list[FinishReason | None] = [None] * len(requests)
    prompt_tokens = [0] * len(requests)
    for events in generate_stream(model, requests, should_stop):
        for i, event in enumerate(events):
            if event is None:
                continue
            if event.token_id is not None:
                token_ids[i].append(event.token_id)
            texts[i] += event.text
            prompt_tokens[i] = event.prompt_tokens
            if event.finished:
                reasons[i] = event.finish_reason
    return [ChatResult(text=texts[i], token_ids=token_ids[i], prompt_tokens=prompt_tokens[i],
                       completion_tokens=len(token_ids[i]),
                       finish_reason=reasons[i], history=append_turn(r.history, r.prompt, texts[i]))
            for i, r in enumerate(requests)]
