"""The official InternVideo2-Chat prompt and its tokenisation (docs/model.md, "Chat format", quirks Q1–Q4, Q17).

The reference `chat()` builds one string and `build_input_ids` tokenises it piecewise. Reproduced exactly:

* Q1  the string is cut at every visual placeholder and each text piece is tokenised on its own with
      `add_special_tokens=True`, so every piece starts with its own BOS;
* Q2  the slow LlamaTokenizer emits a standalone `▁` between that BOS and a leading `[INST]`
      (we call the slow tokenizer, we do not emulate it);
* Q3  history turns are ` [INST] q [/INST]a</s>`: answer glued to `[/INST]`, literal `</s>` text;
* Q4  history is a value here (a tuple in, a longer tuple out), never a mutable default;
* Q17 nothing is truncated.

Worked example (video, 3 clips, msg="", no history, 96 visual tokens per clip):

    [INST] <Video>[<VID_PLH>]</Video><Video>[<VID_PLH>]</Video><Video>[<VID_PLH>]</Video>[/INST] [INST] Q [/INST]
    -> pieces "[INST] <Video>", "</Video><Video>", "</Video><Video>", "</Video>[/INST] [INST] Q [/INST]"
    -> ids  <s> ▁ [INST] ▁< Video > | 96 x 0 | <s> ▁</ Video >< Video > | 96 x 0 | ... | <s> ▁</ Video > [/INST] ... [/INST]
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

# `build_input_ids` fills the visual positions with zeros (= `<unk>`); the ids are replaced by visual
# embeddings before the LLM sees them, but they are part of the golden `input_ids`.
PLACEHOLDER_TOKEN_ID = 0

INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
# the reference appends the literal text "</s>" after each answer; the tokenizer maps it to the EOS id
END_OF_ANSWER = "</s>"

History = tuple[tuple[str, str], ...]


class MediaType(str, enum.Enum):
    """What the media tensor holds: video clips `[clips, T, 3, H, W]` or images `[K, 1, 3, H, W]`."""

    VIDEO = "video"
    IMAGE = "image"


# per media type: (opening tag, placeholder, closing tag) — one triple per clip / image
_MEDIA_TAGS: dict[MediaType, tuple[str, str, str]] = {
    MediaType.VIDEO: ("<Video>", "[<VID_PLH>]", "</Video>"),
    MediaType.IMAGE: ("<Image>", "[<IMG_PLH>]", "</Image>"),
}


class PieceTokenizer(Protocol):
    """The slice of the slow `LlamaTokenizer` this module needs."""

    def __call__(self, text: str, *, add_special_tokens: bool = ...): ...


@dataclass(frozen=True, kw_only=True)
class TokenizedPrompt:
    """The LLM input of one request, before the visual tokens are merged in.

    input_ids:        [L] int64 — text ids with `PLACEHOLDER_TOKEN_ID` at every visual position
    placeholder_mask: [L] bool  — True at the visual positions (clips * tokens_per_clip of them)
    spans:            [start, end) of each visual block, in clip order (tiles row-major, then global view)
    conversation:     the exact prompt string of the reference
    """

    input_ids: torch.Tensor
    placeholder_mask: torch.Tensor
    spans: tuple[tuple[int, int], ...]
    conversation: str

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def normalize_history(history: Sequence[Sequence[str]] | None) -> History:
    """Return history as an immutable tuple of (question, answer) string pairs; rejects malformed turns."""
    if history is None:
        return ()
    turns = []
    for turn in history:
        if len(turn) != 2 or not all(isinstance(part, str) for part in turn):
            raise ValueError(f"each history turn must be a (question, answer) pair of strings, got {turn!r}")
        turns.append((turn[0], turn[1]))
    return tuple(turns)


def build_conversation(*, media_type: MediaType | str, num_clips: int, prompt: str, history: History = (),
                       msg: str = "", instruction: str | None = None, answer_prompt: str | None = None) -> str:
    """The exact prompt string of the reference `chat()` (docs/model.md, "Chat format")."""
    media_type = MediaType(media_type)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    open_tag, placeholder, close_tag = _MEDIA_TAGS[media_type]
    parts = [instruction or "", f"{INST_OPEN} ", (open_tag + placeholder + close_tag) * num_clips,
             msg.rstrip(), INST_CLOSE]
    parts += [f" {INST_OPEN} {question} {INST_CLOSE}{answer}{END_OF_ANSWER}" for question, answer in history]
    parts += [f" {INST_OPEN} {prompt} {INST_CLOSE}", answer_prompt or ""]
    return "".join(parts)


def tokenize_conversation(tokenizer: PieceTokenizer, conversation: str, *, media_type: MediaType | str,
                          num_clips: int, tokens_per_clip: int) -> TokenizedPrompt:
    """Tokenise like `build_input_ids`: per-piece tokenisation, `tokens_per_clip` placeholders after each of the
    first `num_clips` pieces. Raises ValueError if the user text itself contains a placeholder string (the
    reference would then scatter the wrong number of visual tokens)."""
    placeholder = _MEDIA_TAGS[MediaType(media_type)][1]
    pieces = conversation.split(placeholder)
    if len(pieces) != num_clips + 1:
        raise ValueError(f"the prompt text must not contain {placeholder!r} "
                         f"(found {len(pieces) - 1} placeholders for {num_clips} clips)")
    ids: list[int] = []
    mask: list[bool] = []
    spans = []
    for index, piece in enumerate(pieces):
        piece_ids = list(tokenizer(piece, add_special_tokens=True)["input_ids"])
        ids += piece_ids
        mask += [False] * len(piece_ids)
        if index < num_clips:
            spans.append((len(ids), len(ids) + tokens_per_clip))
            ids += [PLACEHOLDER_TOKEN_ID] * tokens_per_clip
            mask += [True] * tokens_per_clip
    return TokenizedPrompt(input_ids=torch.tensor(ids, dtype=torch.long),
                           placeholder_mask=torch.tensor(mask, dtype=torch.bool),
                           spans=tuple(spans), conversation=conversation)


def build_prompt(tokenizer: PieceTokenizer, *, media_type: MediaType | str, num_clips: int, tokens_per_clip: int,
                 prompt: str, history: History = (), msg: str = "", instruction: str | None = None,
                 answer_prompt: str | None = None) -> TokenizedPrompt:
    """`build_conversation` + `tokenize_conversation`: the full LLM text input of one chat turn."""
    conversation = build_conversation(media_type=media_type, num_clips=num_clips, prompt=prompt,
                                      history=normalize_history(history), msg=msg, instruction=instruction,
                                      answer_prompt=answer_prompt)
    return tokenize_conversation(tokenizer, conversation, media_type=media_type, num_clips=num_clips,
                                 tokens_per_clip=tokens_per_clip)


def append_turn(history: History, prompt: str, answer: str) -> History:
    """History after a turn: a new tuple, the input is left as it was."""
    return tuple(history) + ((prompt, answer),)
