"""Model configuration: frozen dataclasses whose defaults are the real InternVideo2-Chat-8B-HD.

`VideoChatConfig.from_json(path)` reads the official `config.json` (docs/model.md, "Reference architecture").
The official file leaves most dimensions implicit; the optional *extension fields* (the tiny fixture and the
demo checkpoint set them) override any dimension, and every missing field takes the real model's value, so the
real checkpoint's `config.json` works unchanged. No network, no transformers import at module import.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from videochat.errors import UserError

LORA_TARGETS_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class ConfigError(ValueError, UserError):
    """An inconsistent or unreadable model config (the message names both numbers, or the file)."""


def _check(cond: bool, what: str, got: Any, expected: Any) -> None:
    if not cond:
        raise ConfigError(f"config: {what}: got {got}, expected {expected}")


@dataclass(frozen=True)
class VisionConfig:
    """InternVideo2-1B ViT ("clean" variant; docs/model.md, "Reference architecture").
    Blocks built = depth + x_vis_return_idx + 1."""
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1408
    depth: int = 40                  # declared depth of the official builder
    x_vis_return_idx: int = -2       # return the output of block depth-2 -> 39 blocks are built
    num_heads: int = 16
    mlp_ratio: float = 48 / 11
    num_frames: int = 8              # frames `pos_embed` was trained for
    tubelet_size: int = 1
    norm_eps: float = 1e-6           # RMSNorm eps (norm1/norm2/q_norm/k_norm)
    vision_layernorm_eps: float = 1e-12

    @property
    def num_blocks(self) -> int:
        return self.depth + self.x_vis_return_idx + 1

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # floor, as the official code

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches_per_frame(self) -> int:
        return self.grid_size ** 2

    def num_tokens(self, frames: int) -> int:
        """Visual tokens per clip: cls + frames * patches (2049 for a video, 257 for an image)."""
        return 1 + (frames // self.tubelet_size) * self.num_patches_per_frame

    def validate(self) -> None:
        _check(self.embed_dim % self.num_heads == 0, "vision embed_dim % num_heads", self.embed_dim % self.num_heads, 0)
        _check(self.num_blocks >= 1, "vision blocks built (depth + x_vis_return_idx + 1)", self.num_blocks, ">= 1")
        _check(self.img_size % self.patch_size == 0, "vision img_size % patch_size", self.img_size % self.patch_size, 0)


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 style BERT QFormer (bert-base-uncased + cross-attention; docs/model.md, "Reference architecture")."""
    vocab_size: int = 30522          # BERT vocab before "[DEC]"
    word_embeddings_rows: int = 30523  # vocab_size + 1 ("[DEC]" added as bos_token)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_freq: int = 2    # cross-attention in layers with index % freq == 0
    encoder_width: int = 1408        # width of the visual tokens (= ViT embed_dim)
    num_query_token: int = 32
    extra_num_query_token: int = 64
    tokenizer_path: str = "qformer_tokenizer"  # relative to the checkpoint dir; bert-base-uncased vocab.txt
    bos_token: str = "[DEC]"

    @property
    def num_queries(self) -> int:
        return self.num_query_token + self.extra_num_query_token

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    def validate(self) -> None:
        _check(self.word_embeddings_rows == self.vocab_size + 1, "qformer_word_embeddings_rows (vocab_size + [DEC])",
               self.word_embeddings_rows, self.vocab_size + 1)
        _check(self.hidden_size % self.num_attention_heads == 0, "qformer hidden_size % num_attention_heads",
               self.hidden_size % self.num_attention_heads, 0)


@dataclass(frozen=True)
class LLMConfig:
    """Mistral-7B-Instruct-v0.3 (public config values) + the LoRA the checkpoint stores (docs/model.md,
    "Reference architecture")."""
    vocab_size: int = 32768
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None      # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: tuple[str, ...] = LORA_TARGETS_DEFAULT
    tokenizer_path: str = "./"       # relative to the checkpoint dir

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def mistral_config(self, attn_implementation: str = "sdpa"):
        """The same model as a transformers `MistralConfig`: the tests' reference (`MistralForCausalLM` with our
        weights must give our logits). Imported lazily: the package import stays torch-free."""
        from transformers import MistralConfig
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("use_lora", "lora_r", "lora_alpha", "lora_target_modules", "tokenizer_path")}
        if kwargs["head_dim"] is None:
            kwargs["head_dim"] = self.hidden_size // self.num_attention_heads
        cfg = MistralConfig(**kwargs)
        cfg._attn_implementation = attn_implementation
        return cfg

    def validate(self) -> None:
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "llm num_attention_heads % num_key_value_heads", self.num_attention_heads % self.num_key_value_heads, 0)
        _check(self.lora_r > 0, "llm lora_r", self.lora_r, "> 0")


@dataclass(frozen=True)
class VideoChatConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit_add_ln: bool = True          # `vision_layernorm` after the ViT

    @property
    def num_visual_tokens_per_clip(self) -> int:
        """LLM tokens per view (tile or global view): the 96 QFormer queries."""
        return self.qformer.num_queries

    def validate(self) -> "VideoChatConfig":
        self.vision.validate()
        self.qformer.validate()
        self.llm.validate()
        _check(self.qformer.encoder_width == self.vision.embed_dim, "bridge.encoder_width vs vision embed_dim",
               self.qformer.encoder_width, self.vision.embed_dim)
        _check(self.vit_add_ln, "vision_encoder.vit_add_ln", self.vit_add_ln, True)
        return self

    # ------------------------------------------------------------------ official config.json
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "VideoChatConfig":
        """Read an official-style `config.json` (file or checkpoint directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read model config {path}: {e.strerror or e}") from None
        except ValueError as e:  # JSONDecodeError, or not UTF-8 text at all (a weights file given as config)
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"model config {path}: expected a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except (TypeError, AttributeError) as e:  # a field of the wrong JSON type (e.g. "depth": "40")
            raise ConfigError(f"model config {path}: a field has the wrong type: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "VideoChatConfig":
        mc = raw.get("model_config", raw)
        ve, br, lm = mc.get("vision_encoder", {}), mc.get("bridge", {}), mc.get("llm", {})
        d = VisionConfig()
        embed_dim = ve.get("encoder_embed_dim", d.embed_dim)
        vision = VisionConfig(
            img_size=ve.get("img_size", d.img_size), patch_size=ve.get("patch_size", d.patch_size),
            embed_dim=embed_dim, depth=ve.get("depth", d.depth),
            x_vis_return_idx=ve.get("x_vis_return_idx", d.x_vis_return_idx),
            num_heads=ve.get("num_heads", d.num_heads), mlp_ratio=ve.get("mlp_ratio", d.mlp_ratio),
            num_frames=ve.get("num_frames", d.num_frames), tubelet_size=ve.get("tubelet_size", d.tubelet_size),
            norm_eps=ve.get("norm_eps", d.norm_eps),
            vision_layernorm_eps=ve.get("vision_layernorm_eps", d.vision_layernorm_eps))
        # derived fields stated in the file must agree with what we build
        if "num_blocks_instantiated" in ve:
            _check(ve["num_blocks_instantiated"] == vision.num_blocks,
                   "vision_encoder.num_blocks_instantiated vs depth + x_vis_return_idx + 1",
                   ve["num_blocks_instantiated"], vision.num_blocks)
        if "mlp_hidden_dim" in ve:
            _check(ve["mlp_hidden_dim"] == vision.mlp_hidden_dim, "vision_encoder.mlp_hidden_dim vs int(D*mlp_ratio)",
                   ve["mlp_hidden_dim"], vision.mlp_hidden_dim)
        for key, want in (("qkv_bias", False), ("qk_normalization", True), ("norm_layer", "RMSNorm"),
                          ("layer_scale", True), ("cls_token", True), ("sep_image_video_pos_embed", True),
                          ("x_vis_only", True)):
            if key in ve:
                _check(ve[key] == want, f"vision_encoder.{key} (only the official variant is implemented)",
                       ve[key], want)

        q = br.get("qformer_config", {})
        dq = QFormerConfig()
        vocab = q.get("vocab_size", dq.vocab_size)
        qformer = QFormerConfig(
            vocab_size=vocab, word_embeddings_rows=br.get("qformer_word_embeddings_rows", vocab + 1),
            hidden_size=q.get("hidden_size", dq.hidden_size),
            num_hidden_layers=q.get("num_hidden_layers", dq.num_hidden_layers),
            num_attention_heads=q.get("num_attention_heads", dq.num_attention_heads),
            intermediate_size=q.get("intermediate_size", dq.intermediate_size),
            max_position_embeddings=q.get("max_position_embeddings", dq.max_position_embeddings),
            layer_norm_eps=q.get("layer_norm_eps", dq.layer_norm_eps), pad_token_id=q.get("pad_token_id", 0),
            cross_attention_freq=br.get("cross_attention_freq", dq.cross_attention_freq),
            encoder_width=br.get("encoder_width", embed_dim),
            num_query_token=br.get("num_query_token", dq.num_query_token),
            extra_num_query_token=br.get("extra_num_query_token", dq.extra_num_query_token),
            tokenizer_path=_local_path(br.get("qformer_tokenizer_path"), dq.tokenizer_path),
            bos_token=br.get("qformer_extra_special_tokens", {}).get("bos_token", dq.bos_token))
        if "hidden_act" in q:
            _check(q["hidden_act"] == "gelu", "qformer_config.hidden_act", q["hidden_act"], "gelu")

        c = lm.get("config", {})
        dl = LLMConfig()
        llm_kwargs = {f.name: c[f.name] for f in dataclasses.fields(LLMConfig) if f.name in c}
        llm = LLMConfig(**llm_kwargs,
                        use_lora=lm.get("use_lora", dl.use_lora), lora_r=lm.get("lora_r", dl.lora_r),
                        lora_alpha=lm.get("lora_alpha", dl.lora_alpha),
                        lora_target_modules=tuple(lm.get("lora_target_modules", dl.lora_target_modules)),
                        tokenizer_path=_local_path(lm.get("tokenizer_path"), dl.tokenizer_path))
        if "name" in lm:
            _check(lm["name"] == "mistral_7b", "llm.name", lm["name"], "mistral_7b")
        return cls(vision=vision, qformer=qformer, llm=llm, vit_add_ln=ve.get("vit_add_ln", True)).validate()

    def to_dict(self) -> dict:
        """An official-style config dict with every extension field set (what the demo checkpoint writes)."""
        v, q, l = self.vision, self.qformer, self.llm
        llm_cfg = {f.name: getattr(l, f.name) for f in dataclasses.fields(l)
                   if f.name not in ("use_lora", "lora_r", "lora_alpha", "lora_target_modules", "tokenizer_path")}
        if llm_cfg["head_dim"] is None:
            del llm_cfg["head_dim"]
        llm_cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", torch_dtype="float32")
        return {
            "_name_or_path": "./", "model_cls": "InternVideo2_VideoChat2", "architectures": ["InternVideo2_VideoChat2"],
            "model_config": {
                "bridge": {
                    "name": "qformer", "num_query_token": q.num_query_token,
                    "extra_num_query_token": q.extra_num_query_token,
                    "qformer_config": {
                        "vocab_size": q.vocab_size, "hidden_size": q.hidden_size,
                        "num_hidden_layers": q.num_hidden_layers, "num_attention_heads": q.num_attention_heads,
                        "intermediate_size": q.intermediate_size, "hidden_act": "gelu",
                        "max_position_embeddings": q.max_position_embeddings, "layer_norm_eps": q.layer_norm_eps,
                        "pad_token_id": q.pad_token_id, "position_embedding_type": "absolute"},
                    "cross_attention_freq": q.cross_attention_freq, "encoder_width": q.encoder_width,
                    "qformer_tokenizer_path": q.tokenizer_path,
                    "qformer_extra_special_tokens": {"bos_token": q.bos_token},
                    "qformer_word_embeddings_rows": q.word_embeddings_rows},
                "llm": {"name": "mistral_7b", "use_lora": l.use_lora, "lora_r": l.lora_r, "lora_alpha": l.lora_alpha,
                        "lora_dropout": 0.1, "lora_target_modules": list(l.lora_target_modules),
                        "tokenizer_path": l.tokenizer_path, "config": llm_cfg},
                "vision_encoder": {
                    "name": "internvideo2-1B", "img_size": v.img_size, "patch_size": v.patch_size,
                    "encoder_embed_dim": v.embed_dim, "d_model": v.embed_dim, "num_frames": v.num_frames,
                    "tubelet_size": v.tubelet_size, "sep_image_video_pos_embed": True,
                    "x_vis_return_idx": v.x_vis_return_idx, "x_vis_only": True, "vit_add_ln": self.vit_add_ln,
                    "depth": v.depth, "num_heads": v.num_heads, "mlp_ratio": v.mlp_ratio,
                    "num_blocks_instantiated": v.num_blocks, "mlp_hidden_dim": v.mlp_hidden_dim,
                    "qkv_bias": False, "qk_normalization": True, "norm_layer": "RMSNorm", "norm_eps": v.norm_eps,
                    "layer_scale": True, "cls_token": True, "vision_layernorm_eps": v.vision_layernorm_eps},
            },
            "torch_dtype": "float32",
        }


def _local_path(value: str | None, default: str) -> str:
    """Config paths are folders inside the checkpoint dir; hub ids / prose (the real file says
    "bert-base-uncased (...)") fall back to the default local folder: we never download."""
    if not value or " " in value or value.startswith(("bert-base", "mistralai/")):
        return default
    return value
