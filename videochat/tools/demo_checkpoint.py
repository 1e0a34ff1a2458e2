"""`python -m videochat make-demo-checkpoint OUT_DIR [--seed N]`: a tiny seeded random-weight checkpoint.

Same layout as the real InternVideo2-Chat-8B-HD checkpoint (official key names, peft-0.5.0 LoRA A/B,
`project_down`, `img_pos_embed`, int64 `position_ids`), tiny widths like the test fixture, a config.json with
the extension fields, and its own tokenizers (the fixture's tiny sentencepiece + BERT vocab, shipped in
`videochat/tools/demo_assets/`). Byte-for-byte deterministic for a given seed. Weights are random but shaped so the
answers are words: norms ~1, layer scales 0.2-0.6, a large `lm_head` gain, control/byte-fallback rows damped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import TYPE_CHECKING

from videochat.errors import UserError, one_line
from videochat.model.config import LLMConfig, QFormerConfig, VideoChatConfig, VisionConfig
from videochat.tools.chat import seed_arg

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_assets")
NUM_CONTROL_AND_BYTE_TOKENS = 5 + 256   # <unk> <s> </s> [INST] [/INST] + byte fallback pieces of the demo tokenizer
LM_HEAD_GAIN = 8.0

if TYPE_CHECKING:   # imported where used: a bad OUT_DIR fails before the seconds torch takes to import
    import torch


def demo_config() -> VideoChatConfig:
    """Tiny dims (like the fixture): ViT 64/3 blocks, QFormer 48/2 layers, Mistral 64/2 layers, vocab 480."""
    return VideoChatConfig(
        vision=VisionConfig(embed_dim=64, depth=4, num_heads=4),
        qformer=QFormerConfig(vocab_size=115, word_embeddings_rows=116, hidden_size=48, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                              encoder_width=64),
        llm=LLMConfig(vocab_size=480, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tokenizer_path="llm_tokenizer"),
    ).validate()


def _init(key: str, shape: tuple[int, ...], gen: torch.Generator, eos_id: int) -> torch.Tensor:
    import torch

    def randn(*s):
        return torch.randn(*s, generator=gen)

    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith((".ls1", ".ls2")):
        return 0.2 + 0.4 * torch.rand(shape, generator=gen)
    if len(shape) == 1 and ("norm" in key.lower() or "LayerNorm" in key) and key.endswith("weight"):
        return 1.0 + 0.1 * randn(*shape)
    if key.endswith("bias"):
        return 0.02 * randn(*shape)
    if key.endswith(("pos_embed", "cls_token", "query_tokens")):
        return 0.5 * randn(*shape)
    if "lora_B" in key:
        return 0.02 * randn(*shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    w = randn(*shape) / max(fan_in, 1) ** 0.5
    if key == "lm.base_model.model.lm_head.weight":
        w = w * LM_HEAD_GAIN
        damp = torch.ones(shape[0], 1)
        damp[:NUM_CONTROL_AND_BYTE_TOKENS] = 0.1
        damp[eos_id] = 0.6      # EOS stays possible, so answers can end
        w = w * damp
    return w


def make_demo_checkpoint(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write the demo checkpoint into `out_dir` (created; existing files overwritten). Returns the path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    import torch
    from safetensors.torch import save_file

    from videochat.model.checkpoint import official_layout
    from videochat.model.videochat_model import VideoChatModel

    config = demo_config()
    with torch.device("meta"):
        skeleton = VideoChatModel(config)
    layout = official_layout(skeleton, config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: _init(k, layout[k], gen, config.llm.eos_token_id).contiguous() for k in sorted(layout)}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw["model_config"]["llm"]["pretrained_llm_path"] = "(demo: tiny random Mistral; see llm.config)"
    raw["demo_seed"] = seed
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
        f.write("\n")
    for sub in ("llm_tokenizer", "qformer_tokenizer"):
        dst = os.path.join(out_dir, sub)
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(ASSETS, sub))):
            shutil.copyfile(os.path.join(ASSETS, sub, name), os.path.join(dst, name))
    return out_dir


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m videochat make-demo-checkpoint",
                                 description="Write a tiny seeded random-weight checkpoint in the official layout.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=seed_arg, default=0)
    args = ap.parse_args(argv)
    try:
        path = make_demo_checkpoint(args.out_dir, seed=args.seed)
    except OSError as e:   # OUT_DIR is a file, or under one, or not writable; exit 2 via run_cli
        raise UserError(f"cannot write the demo checkpoint: {one_line(e)}") from None
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    print(f"demo checkpoint written to {path} ({size / 1e6:.1f} MB)")
    return 0
