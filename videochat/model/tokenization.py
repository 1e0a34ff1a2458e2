"""Tokenizers, loaded offline from the checkpoint directory.

* LLM: `SentencePieceLlamaTokenizer`, transformers 4.x's *slow* `LlamaTokenizer(legacy=False)` re-done over
  `sentencepiece` (what it wrapped), over the Mistral-v0.3 files at `llm.tokenizer_path` (default: the
  checkpoint dir itself). The official ids depend on that tokenizer's quirks (docs/model.md, quirks Q1-Q3): the `▁` it
  puts before a leading `[INST]`, a `▁` before every ` [INST]`, `</s>` text mapped to the EOS id. transformers 5
  has no slow LlamaTokenizer any more (its `LlamaTokenizer` is the `tokenizers` one, which drops that `▁`), and
  its sentencepiece backend counts `[INST]` as a special token, which also drops it — hence our own.
* QFormer: transformers' `BertTokenizer` (bert-base-uncased vocab) at `bridge.qformer_tokenizer_path` (default
  `<checkpoint>/qformer_tokenizer`) with `[DEC]` added as bos_token and left truncation. Only needed for
  requests with an `instruction`; the official HF repo does not ship it (the user places bert-base-uncased's
  `vocab.txt` there), so it is loaded lazily and a missing folder is a clear error.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

from videochat.errors import UserError
from videochat.model.config import VideoChatConfig

SPIECE_UNDERLINE = "▁"
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' `clean_up_tokenization` (only applied when a caller asks for it)
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerNotFoundError(FileNotFoundError, UserError):
    """A tokenizer folder or file that is missing, cannot be parsed, or does not fit the model."""


class TokenizerConfigError(ValueError, UserError):
    """A tokenizer config this re-implementation does not reproduce (it would silently change the ids)."""


def _resolve(ckpt_dir: str | os.PathLike, rel: str) -> str:
    return os.path.normpath(os.path.join(os.fspath(ckpt_dir), rel))


def _token_content(value) -> str | None:
    """A special token as written in tokenizer_config.json / special_tokens_map.json (str or AddedToken dict)."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class SentencePieceLlamaTokenizer:
    """The slow `LlamaTokenizer` of transformers 4.57 with `legacy=False`, for ids and decoding, exactly:

    encode: replace `▁` by spaces, prepend `▁` (add_prefix_space), split at the added tokens (`<s>`, `[INST]`, ...
    by exact text), encode every other chunk with sentencepiece without its dummy prefix (a chunk that starts
    with a space is encoded behind `<unk>` and those pieces dropped, so the space survives); a lone leading `▁`
    is dropped only before a *special* token (`[INST]` is added, not special: Q2); BOS in front per call (Q1).
    decode: added non-special tokens (`[INST]`) are emitted verbatim between sentencepiece-decoded runs, each
    run losing the `▁` of its first piece.
    """

    def __init__(self, model_file: str, *, added_tokens: dict[int, str], special_tokens: dict[str, str],
                 additional_special_tokens: Sequence[str] = (), add_bos_token: bool = True,
                 add_eos_token: bool = False, add_prefix_space: bool = True,
                 clean_up_tokenization_spaces: bool = False):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        # what 4.x's `get_spm_processor` does for legacy=False (there via protobuf; same field)
        self.sp.override_normalizer_spec(add_dummy_prefix=False)
        self.added_tokens_decoder = dict(added_tokens)
        self.added_tokens_encoder = {content: i for i, content in added_tokens.items()}
        self.special_tokens = dict(special_tokens)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.add_prefix_space = add_prefix_space
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.all_special_tokens = list(dict.fromkeys([*special_tokens.values(), *additional_special_tokens]))
        self.all_special_ids = self.convert_tokens_to_ids(self.all_special_tokens)
        self._special_set = frozenset(self.all_special_tokens)
        self._verbatim = (set(self.added_tokens_encoder) - self._special_set) | {
            t for t in additional_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size}
        self._unk_length = len(self.sp.encode(self.special_tokens["unk_token"]))
        longest_first = sorted(self.added_tokens_encoder, key=len, reverse=True)
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str) -> "SentencePieceLlamaTokenizer":
        """`tokenizer.model` + `tokenizer_config.json` (+ `special_tokens_map.json`) of a HF tokenizer folder."""
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        if config.get("legacy", True) or not config.get("add_prefix_space", True):
            raise TokenizerConfigError(f"{path}: only legacy=false, add_prefix_space=true is reproduced (the "
                                       f"official Mistral-v0.3 files); got legacy={config.get('legacy')!r}, "
                                       f"add_prefix_space={config.get('add_prefix_space')!r}")
        added = {}
        for index, token in config.get("added_tokens_decoder", {}).items():
            if any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
                raise TokenizerConfigError(f"{path}: added token {token['content']!r} strips or is single-word; "
                                           f"not reproduced")
            added[int(index)] = token["content"]
        special = {}
        for attr in SPECIAL_TOKEN_ATTRIBUTES:
            value = _token_content(special_map.get(attr, config.get(attr)))
            if value is not None:
                special[attr] = value
        extra = [_token_content(t) for t in special_map.get("additional_special_tokens",
                                                            config.get("additional_special_tokens", []))]
        return cls(os.path.join(path, "tokenizer.model"), added_tokens=added, special_tokens=special,
                   additional_special_tokens=extra, add_bos_token=config.get("add_bos_token", True),
                   add_eos_token=config.get("add_eos_token", False),
                   clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False))

    # ------------------------------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        pieces = {self.sp.id_to_piece(i) for i in range(self.vocab_size)}
        return len(pieces | set(self.added_tokens_encoder))

    def _special_id(self, attr: str) -> int | None:
        token = self.special_tokens.get(attr)
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    def _token_to_id(self, token: str) -> int:
        found = self.added_tokens_encoder.get(token)
        return self.sp.piece_to_id(token) if found is None else found

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _id_to_token(self, index: int) -> str:
        found = self.added_tokens_decoder.get(index)
        return self.sp.id_to_piece(index) if found is None else found

    def convert_ids_to_tokens(self, ids: Iterable[int], skip_special_tokens: bool = False) -> list[str]:
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ------------------------------------------------------------------------------------------ encoding
    def _encode_chunk(self, text: str) -> list[str]:
        """sentencepiece without the dummy prefix; a leading space would be stripped, so encode behind <unk>."""
        if not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        pieces = self.sp.encode(self.special_tokens["unk_token"] + text, out_type=str)
        return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        if not text:
            return []
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        chunks = self._added_pattern.split(text) if self._added_pattern else [text]
        tokens: list[str] = []
        for chunk in chunks:
            if chunk in self.added_tokens_encoder:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._encode_chunk(chunk))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_set:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    # ------------------------------------------------------------------------------------------ decoding
    def _decode_run(self, tokens: list[str]) -> str:
        """One run of non-verbatim tokens (4.x `convert_tokens_to_string`, legacy=False)."""
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens = [tokens[0][1:], *tokens[1:]]   # the prefix space added at encode time
        out, pending, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self._special_set:
                out += self.sp.decode(pending) + token
                pending, prev_special = [], True
            else:
                if prev_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                pending.append(token)
                prev_special = False
        return out + self.sp.decode(pending)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               spaces_between_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None) -> str:
        """4.x `PreTrainedTokenizer._decode` (same defaults)."""
        parts: list[str] = []
        run: list[str] = []
        for token in self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens):
            if skip_special_tokens and token in self._special_set:
                continue
            if token in self._verbatim:
                if run:
                    text = self._decode_run(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._decode_run(run))
        text = (" " if spaces_between_special_tokens else "").join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]


def check_llm_tokenizer_file(ckpt_dir: str | os.PathLike, config: VideoChatConfig) -> str:
    """The LLM tokenizer's folder, if it has a `tokenizer.model` (no import: `preflight` checks it early)."""
    path = _resolve(ckpt_dir, config.llm.tokenizer_path)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise TokenizerNotFoundError(f"LLM tokenizer: no tokenizer.model in {path} (llm.tokenizer_path="
                                     f"{config.llm.tokenizer_path!r} relative to the checkpoint dir)")
    return path


def load_llm_tokenizer(ckpt_dir: str | os.PathLike, config: VideoChatConfig) -> SentencePieceLlamaTokenizer:
    """The LLM tokenizer from `<ckpt_dir>/<llm.tokenizer_path>` (no network)."""
    path = check_llm_tokenizer_file(ckpt_dir, config)
    try:
        tok = SentencePieceLlamaTokenizer.from_dir(path)
    except RuntimeError as e:   # sentencepiece: "could not parse ModelProto"
        raise TokenizerNotFoundError(f"LLM tokenizer: {path}/tokenizer.model is not a sentencepiece model "
                                     f"({e})") from None
    if len(tok) > config.llm.vocab_size:
        raise TokenizerNotFoundError(f"LLM tokenizer in {path} has {len(tok)} tokens, more than the LLM vocab "
                                     f"{config.llm.vocab_size}")
    return tok


def load_qformer_tokenizer(ckpt_dir: str | os.PathLike, config: VideoChatConfig):
    """`BertTokenizer` + `[DEC]` from `<ckpt_dir>/<bridge.qformer_tokenizer_path>` (no network)."""
    from transformers import BertTokenizer

    path = _resolve(ckpt_dir, config.qformer.tokenizer_path)
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise TokenizerNotFoundError(
            f"QFormer tokenizer: no vocab.txt in {path}. Requests with an `instruction` need the "
            f"bert-base-uncased vocabulary: put its vocab.txt in that folder (the official checkpoint "
            f"does not ship it). Requests without an instruction never need it.")
    tok = BertTokenizer.from_pretrained(path, local_files_only=True, do_lower_case=True, truncation_side="left")
    tok.add_special_tokens({"bos_token": config.qformer.bos_token})
    if len(tok) != config.qformer.word_embeddings_rows:
        raise TokenizerNotFoundError(f"QFormer tokenizer in {path}: {len(tok)} tokens with {config.qformer.bos_token}"
                                     f", expected {config.qformer.word_embeddings_rows} (qformer_word_embeddings_rows)")
    return tok
