"""Config: the fixture's config.json is read with its tiny dims; the defaults are the real model — proved by
building the full-size model on the meta device and comparing every official key, shape and stored dtype with
the official key table (by hash; docs/model.md, "Checkpoint loading"); inconsistent configs fail naming both
numbers."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from support.paths import TINY
from videochat.model.checkpoint import official_layout, official_stored_dtype, plan_load
from videochat.model.config import ConfigError, VideoChatConfig
from videochat.model.videochat_model import VideoChatModel

FIXTURE = TINY


def test_fixture_config_values():
    cfg = VideoChatConfig.from_json(FIXTURE)
    assert (cfg.vision.embed_dim, cfg.vision.num_blocks, cfg.vision.num_heads, cfg.vision.mlp_hidden_dim) == (64, 3, 4, 279)
    assert (cfg.qformer.hidden_size, cfg.qformer.num_hidden_layers, cfg.qformer.word_embeddings_rows) == (48, 2, 116)
    assert cfg.qformer.encoder_width == 64 and cfg.qformer.tokenizer_path == "qformer_tokenizer"
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.vocab_size, cfg.llm.num_key_value_heads) == (64, 2, 480, 2)
    assert cfg.llm.tokenizer_path == "llm_tokenizer" and cfg.llm.lora_scaling == 2.0
    assert cfg.num_visual_tokens_per_clip == 96


def test_defaults_are_the_real_model():
    cfg = VideoChatConfig()
    v, q, l = cfg.vision, cfg.qformer, cfg.llm
    assert (v.embed_dim, v.num_blocks, v.num_heads, v.head_dim, v.mlp_hidden_dim) == (1408, 39, 16, 88, 6144)
    assert (v.num_tokens(8), v.num_tokens(1)) == (2049, 257)
    assert (q.hidden_size, q.num_hidden_layers, q.word_embeddings_rows, q.encoder_width, q.num_queries) == (768, 12, 30523, 1408, 96)
    assert [i for i in range(12) if q.has_cross_attention(i)] == [0, 2, 4, 6, 8, 10]
    assert (l.hidden_size, l.intermediate_size, l.num_hidden_layers, l.num_key_value_heads, l.vocab_size) == (4096, 14336, 32, 8, 32768)
    assert (l.rope_theta, l.rms_norm_eps, l.lora_r, l.lora_alpha, l.tie_word_embeddings) == (1e6, 1e-5, 16, 32, False)


def _official_config_without_extensions() -> dict:
    """The fixture's config.json with every extension field removed -> the real checkpoint's schema."""
    raw = json.loads((FIXTURE / "config.json").read_text())
    mc = raw["model_config"]
    for k in ("depth", "num_heads", "mlp_ratio", "num_blocks_instantiated", "mlp_hidden_dim", "qkv_bias",
              "qk_normalization", "norm_layer", "norm_eps", "layer_scale", "cls_token", "vision_layernorm_eps"):
        mc["vision_encoder"].pop(k)
    mc["vision_encoder"].update(encoder_embed_dim=1408, d_model=1408)
    for k in ("qformer_config", "cross_attention_freq", "encoder_width", "qformer_tokenizer_path",
              "qformer_extra_special_tokens", "qformer_word_embeddings_rows"):
        mc["bridge"].pop(k)
    for k in ("lora_target_modules", "tokenizer_path", "config"):
        mc["llm"].pop(k)
    mc["llm"]["pretrained_llm_path"] = "mistralai/Mistral-7B-Instruct-v0.3"
    return raw


def test_official_config_without_extension_fields_is_the_real_model():
    assert VideoChatConfig.from_dict(_official_config_without_extensions()) == VideoChatConfig()


# sha256 of the sorted "key\tshape\tdtype\n" lines of the spec's state_dict_full.tsv (1590 official tensors;
# the file itself lives outside the repo). Shapes are written "AxB", dtypes as stored.
TSV_SHA256 = "ac4e7df90edea799862ece464757a8940e7b8cc096ddd5a14e1fcdd29c6bd1be"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64"}


def test_full_size_meta_model_matches_every_official_key_shape_and_dtype():
    cfg = VideoChatConfig()
    with torch.device("meta"):
        model = VideoChatModel(cfg)
    got = official_layout(model, cfg)
    assert len(got) == 1590
    canon = "".join(f"{k}\t{'x'.join(map(str, got[k]))}\t{DTYPE_NAMES[official_stored_dtype(k)]}\n" for k in sorted(got))
    assert hashlib.sha256(canon.encode()).hexdigest() == TSV_SHA256
    # spot checks from the TSV (readable failures)
    assert got["vision_encoder.blocks.38.mlp.fc1.weight"] == (6144, 1408)
    assert got["qformer.bert.encoder.layer.10.crossattention.self.key.weight"] == (768, 1408)
    assert "qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in got
    assert got["lm.base_model.model.lm_head.lora_B.default.weight"] == (32768, 16)
    # the loader's plan accepts exactly this key set: official names, and the modern-peft aliases
    plan = plan_load(model, cfg, got)
    assert len(plan) == len(model.state_dict())
    assert sum(p.lora_a is not None for p in plan) == 32 * 7 + 1
    modern = {(k[: -len(".weight")] + ".base_layer.weight" if any(p.base == k and p.lora_a for p in plan) else k): s
              for k, s in got.items()}
    assert sum(k.endswith(".base_layer.weight") for k in modern) == 225
    assert len(plan_load(model, cfg, modern)) == len(plan)
    total = sum(t.numel() for t in model.state_dict().values())
    assert total == 8_471_369_472 - 3_146_496 - 42_532_864   # spec totals minus project_down and LoRA A/B


def test_inconsistent_config_names_both_numbers():
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["model_config"]["vision_encoder"]["mlp_hidden_dim"] = 280
    with pytest.raises(ConfigError, match="got 280, expected 279"):
        VideoChatConfig.from_dict(raw)
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["model_config"]["bridge"]["encoder_width"] = 65
    with pytest.raises(ConfigError, match="got 65, expected 64"):
        VideoChatConfig.from_dict(raw)
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["model_config"]["bridge"]["qformer_word_embeddings_rows"] = 115
    with pytest.raises(ConfigError, match="got 115, expected 116"):
        VideoChatConfig.from_dict(raw)
