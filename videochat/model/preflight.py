"""Torch-free checks of a checkpoint directory, run by `chat` and `serve` before their slow part, so a broken
checkpoint fails in a fraction of a second with one line naming the file (for `serve`: instead of a stub
traceback in tritonserver's log after the other models loaded; for `chat`: before importing torch).

Checked: config.json parses and is consistent, the LLM tokenizer file exists, every weight file's safetensors
header reads. Key names and shapes are left to the strict loader (`checkpoint.py`: it needs the model skeleton,
i.e. torch), which reports unreadable files the same way should one change in between.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from videochat.model.config import VideoChatConfig
from videochat.errors import UserError
from videochat.model.tokenization import check_llm_tokenizer_file

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"   # as checkpoint.py


def check_checkpoint_files(checkpoint: str | os.PathLike) -> VideoChatConfig:
    """Raise ConfigError / TokenizerNotFoundError / UserError (all UserErrors) naming the first bad file of
    the checkpoint directory `checkpoint`; return its config."""
    from safetensors import SafetensorError, safe_open   # no torch with framework="numpy"

    checkpoint = Path(checkpoint)
    config = VideoChatConfig.from_json(checkpoint)
    check_llm_tokenizer_file(checkpoint, config)
    index = checkpoint / INDEX_FILE
    if index.is_file():
        try:
            files = sorted({checkpoint / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:   # not {"weight_map": {k: file}}
            raise UserError(f"{index} is not a valid safetensors index: {type(e).__name__}: {e}") from None
    else:
        files = [checkpoint / SINGLE_FILE]
    for path in files:
        if not path.is_file():   # safe_open would say "No such device" for a directory
            why = "not a regular file" if path.exists() else "No such file or directory"
            raise UserError(f"cannot read weight file {path}: {why}")
        try:
            with safe_open(str(path), framework="numpy"):   # reads and checks the header only
                pass
        except (SafetensorError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise UserError(f"cannot read weight file {path}: {why}") from None
    return config
