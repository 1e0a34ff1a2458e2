"""Tokenizers, loaded offline from the checkpoint directory.

* LLM: the **slow** sentencepiece `LlamaTokenizer` (Mistral-v0.3 files) at `llm.tokenizer_path` (default: the
  checkpoint dir itself). The fast tokenizer drops the `▁` before a leading `[INST]` and does not reproduce
  the official ids (docs/model.md, "Chat format").
* QFormer: `BertTokenizer` (bert-base-uncased vocab) at `bridge.qformer_tokenizer_path` (default
  `<checkpoint>/qformer_tokenizer`) with `[DEC]` added as bos_token and left truncation. Only needed for
  requests with an `instruction`; the official HF repo does not ship it (the user places bert-base-uncased's
  `vocab.txt` there), so it is loaded lazily and a missing folder is a clear error.
"""
from __future__ import annotations

import os

from videochat.errors import UserError
from videochat.model.config import VideoChatConfig


class TokenizerNotFoundError(FileNotFoundError, UserError):
    """A tokenizer folder or file that is missing, cannot be parsed, or does not fit the model."""


def _resolve(ckpt_dir: str | os.PathLike, rel: str) -> str:
    return os.path.normpath(os.path.join(os.fspath(ckpt_dir), rel))


def check_llm_tokenizer_file(ckpt_dir: str | os.PathLike, config: VideoChatConfig) -> str:
    """The LLM tokenizer's folder, if it has a `tokenizer.model` (transformers-free: `preflight` checks it before any slow import)."""
    path = _resolve(ckpt_dir, config.llm.tokenizer_path)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        raise TokenizerNotFoundError(f"LLM tokenizer: no tokenizer.model in {path} (llm.tokenizer_path="
                                     f"{config.llm.tokenizer_path!r} relative to the checkpoint dir)")
    return path


def load_llm_tokenizer(ckpt_dir: str | os.PathLike, config: VideoChatConfig):
    """The slow `LlamaTokenizer` from `<ckpt_dir>/<llm.tokenizer_path>` (no network)."""
    path = check_llm_tokenizer_file(ckpt_dir, config)   # before importing transformers (seconds)
    from transformers import LlamaTokenizer

    try:
        tok = LlamaTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, RuntimeError, ValueError) as e:   # sentencepiece: "could not parse ModelProto"
        raise TokenizerNotFoundError(f"LLM tokenizer: cannot load {path}/tokenizer.model: {e}") from None
    if not isinstance(tok, LlamaTokenizer):   # transformers returns False for a corrupt tokenizer.model
        raise TokenizerNotFoundError(f"LLM tokenizer: {path}/tokenizer.model is not a sentencepiece model")
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
