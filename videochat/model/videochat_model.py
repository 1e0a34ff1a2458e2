"""`VideoChatModel`: ViT -> vision_layernorm -> QFormer -> project_up, and the Mistral LLM (docs/model.md,
"Reference architecture").

Built on the meta device and filled by the strict loader (`checkpoint.py`); fp32 on CPU, bf16 on CUDA.
Generation (prompt, KV cache, decoding) lives one layer up, in `videochat.runtime`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from videochat.model import llm
from videochat.model.checkpoint import CheckpointError, load_checkpoint
from videochat.model.config import VideoChatConfig
from videochat.model.projection import ProjectUp
from videochat.model.qformer import QFormer
from videochat.model.tokenization import load_llm_tokenizer, load_qformer_tokenizer
from videochat.model.vision_encoder import VisionEncoder

MEDIA_TYPES = ("video", "image")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class VideoChatModel(nn.Module):
    """Attributes: `config`, `llm` (`videochat.llm.MistralForCausalLM`, LoRA merged), `tokenizer` (the slow
    Llama tokenizer's ids, `videochat.tokenization`), `qformer_tokenizer` (lazy), `device`, `dtype`."""

    def __init__(self, config: VideoChatConfig):
        super().__init__()
        v, q = config.vision, config.qformer
        self.config = config
        self.vision_encoder = VisionEncoder(v)
        self.vision_layernorm = nn.LayerNorm(v.embed_dim, eps=v.vision_layernorm_eps)
        self.qformer = QFormer(q)
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_query_token, q.hidden_size))
        self.extra_query_tokens = nn.Parameter(torch.zeros(1, q.extra_num_query_token, q.hidden_size))
        self.project_up = ProjectUp(q.hidden_size, config.llm.hidden_size)
        self.llm = llm.build_llm(config.llm)
        self.tokenizer = None
        self.checkpoint_dir: str | None = None
        self._qformer_tokenizer = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        dtype: torch.dtype | None = None) -> "VideoChatModel":
        """Load a checkpoint dir (config.json, safetensors, tokenizers) strictly and offline."""
        path = os.fspath(path)
        dev = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        config = VideoChatConfig.from_json(path)
        tokenizer = load_llm_tokenizer(path, config)
        with torch.device("meta"):
            model = cls(config)
        load_checkpoint(model, path, config, dtype=dtype, device=dev)
        model._init_non_persistent_buffers(dev)
        model.eval().requires_grad_(False)
        model.tokenizer, model.checkpoint_dir, model.device, model.dtype = tokenizer, path, dev, dtype
        return model

    def _init_non_persistent_buffers(self, device: torch.device) -> None:
        """Buffers not stored in checkpoints (Mistral rotary `inv_freq`) are rebuilt on the real device."""
        llm.init_non_persistent_buffers(self.llm, device)
        still_meta = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if still_meta:
            raise CheckpointError(f"tensors left uninitialised after loading: {still_meta[:20]}")

    @property
    def qformer_tokenizer(self):
        if self._qformer_tokenizer is None:
            self._qformer_tokenizer = load_qformer_tokenizer(self.checkpoint_dir or ".", self.config)
        return self._qformer_tokenizer

    # ------------------------------------------------------------------------------------------ vision
    @property
    def queries(self) -> torch.Tensor:  # [1, 96, Hq]
        return torch.cat([self.query_tokens, self.extra_query_tokens], dim=1)

    def tokenize_instructions(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-clip instruction strings -> right-padded ids [M, Lt] and mask [M, Lt] (positions start at 0)."""
        tok = self.qformer_tokenizer
        max_len = min(512, self.config.qformer.max_position_embeddings)
        cache = {s: tok(s, truncation=True, max_length=max_len)["input_ids"] for s in set(instructions)}
        seqs = [cache[s] for s in instructions]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.config.qformer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def encode_clips(self, clips: torch.Tensor, instructions: Sequence[str | None] | None = None,
                     return_intermediates: bool = False):
        """clips [M, T, 3, 224, 224] (all with the same T) -> visual tokens [M, 96, H_llm] in model dtype.

        `instructions`: one per clip (None/"" = none). With `return_intermediates`, also returns a dict with
        `vision_encoder_out` [M, 1+T*256, D], `qformer_last_hidden_state` [M, 96+Lt, Hq], `project_up_out`.
        """
        m = clips.shape[0]
        x = clips.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)   # [M, 3, T, 224, 224]
        vis = self.vision_encoder(x)                                                  # [M, 1+T*256, D]
        image_embeds = self.vision_layernorm(vis)
        ids = mask = None
        instr = [s or None for s in (instructions or [None] * m)]
        if any(instr):
            ids, mask = self.tokenize_instructions([s or "" for s in instr])
            no_instr = torch.tensor([s is None for s in instr], device=self.device)
            mask = mask & ~no_instr[:, None]     # clips without an instruction see no text tokens
        queries = self.queries.expand(m, -1, -1)
        hidden = self.qformer(queries, image_embeds, ids, mask)                       # [M, 96+Lt, Hq]
        out = self.project_up(hidden[:, : queries.shape[1]])                          # [M, 96, H_llm]
        if return_intermediates:
            return out, {"vision_encoder_out": vis, "qformer_last_hidden_state": hidden, "project_up_out": out}
        return out

    @torch.inference_mode()
    def encode_media(self, media: Sequence[torch.Tensor], media_types: Sequence[str],
                     instructions: Sequence[str | None]) -> list[torch.Tensor]:
        """Per request `[clips, T, 3, 224, 224]` -> `[clips*96, H_llm]` (model dtype, view order kept).

        All clips of all requests go through the ViT/QFormer together, one pass per frame count T
        (images T=1 and videos T=8 have different token counts).
        """
        if not len(media) == len(media_types) == len(instructions):
            raise ValueError(f"encode_media: {len(media)} media, {len(media_types)} media_types, "
                             f"{len(instructions)} instructions")
        for i, (x, kind) in enumerate(zip(media, media_types)):
            if kind not in MEDIA_TYPES:
                raise ValueError(f"request {i}: media_type must be one of {MEDIA_TYPES}, got {kind!r}")
            if x.dim() != 5 or x.shape[2] != self.config.vision.in_chans or x.shape[0] == 0:
                raise ValueError(f"request {i}: media must be [clips, T, 3, H, W], got {list(x.shape)}")
            if kind == "image" and x.shape[1] != 1:
                raise ValueError(f"request {i}: an image must have T == 1, got T = {x.shape[1]}")
        results: list[torch.Tensor | None] = [None] * len(media)
        for frames in sorted({x.shape[1] for x in media}):
            idx = [i for i, x in enumerate(media) if x.shape[1] == frames]
            clips = torch.cat([media[i].to(self.dtype) for i in idx])
            per_clip = [instructions[i] for i in idx for _ in range(media[i].shape[0])]
            tokens = self.encode_clips(clips, per_clip)                                  # [M, 96, H_llm]
            for i, part in zip(idx, tokens.split([media[i].shape[0] for i in idx])):
                results[i] = part.reshape(-1, part.shape[-1])                            # [clips*96, H_llm]
        return results

    # ------------------------------------------------------------------------------------------ text
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [..., L] -> [..., L, H_llm]
        return llm.embed(self.llm, input_ids.to(self.device))
