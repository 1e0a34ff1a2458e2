"""BLIP-2 style BERT QFormer (docs/model.md, "Reference architecture"), plain torch with the official
parameter names.

96 learned queries (kept outside, see `model.py`) are LayerNorm-ed (no word/position embedding), attend to
each other (and to optional instruction tokens appended after them) bidirectionally, cross-attend to the
visual tokens in layers `i % cross_attention_freq == 0`, and go through the query FFN; instruction tokens
use the text FFN. Only the query outputs are used downstream.

Batching (docs/model.md, quirk Q15): instructions of different lengths are **right**-padded and masked, and
each row's text positions start at 0, so a request's result does not depend on its batch-mates (the reference
left-pads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videochat.model.config import QFormerConfig


class SelfOrCrossAttention(nn.Module):
    """`attention.self.{query,key,value}` (BertSelfAttention) of the official naming."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x [B, Nq, H], kv [B, Nk, W], mask [B, Nk] bool (True = attend) or None -> [B, Nq, H]
        b = x.shape[0]
        q = self.query(x).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(kv).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(kv).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.head_dim ** -0.5)
        return out.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim)


class AddNorm(nn.Module):
    """`*.output.{dense,LayerNorm}`: post-norm residual `LN(residual + dense(x))`."""

    def __init__(self, in_dim: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class AttentionBlock(nn.Module):
    """`attention` / `crossattention`: `.self` (q/k/v) + `.output` (dense + LayerNorm)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.self = SelfOrCrossAttention(cfg, kv_width)
        self.output = AddNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, kv, mask), x)  # [B, Nq, H]


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, H] -> [B, N, I]
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        self.crossattention = AttentionBlock(cfg, cfg.encoder_width) if cfg.has_cross_attention(layer_idx) else None
        self.intermediate, self.output = Intermediate(cfg), AddNorm(cfg.intermediate_size, cfg)              # text
        self.intermediate_query, self.output_query = Intermediate(cfg), AddNorm(cfg.intermediate_size, cfg)  # queries

    def forward(self, h: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor | None,
                num_queries: int) -> torch.Tensor:
        # h [B, Q + Lt, H]; visual [B, Nv, W]; mask [B, Q + Lt] bool or None -> [B, Q + Lt, H]
        h = self.attention(h, h, mask)
        q, t = h[:, :num_queries], h[:, num_queries:]
        if self.crossattention is not None:
            q = self.crossattention(q, visual, None)  # all visual tokens valid (no mask)
        q = self.output_query(self.intermediate_query(q), q)
        if t.shape[1] == 0:
            return q
        t = self.output(self.intermediate(t), t)
        return torch.cat([q, t], dim=1)


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.word_embeddings_rows, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=True)

    def forward(self, queries: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        # queries [B, Q, H]; input_ids [B, Lt] or None -> [B, Q + Lt, H]
        if input_ids is None or input_ids.shape[1] == 0:
            return self.LayerNorm(queries)
        pos = self.position_ids[:, : input_ids.shape[1]]          # text positions start at 0, not at Q
        text = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.LayerNorm(torch.cat([queries, text.to(queries.dtype)], dim=1))


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """`qformer.bert.*` of the checkpoint (the LM head `qformer.cls` does not exist)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = QFormerEncoder(cfg)

    def forward(self, queries: torch.Tensor, visual: torch.Tensor, input_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """queries [B, Q, H]; visual [B, Nv, W]; input_ids/text_mask [B, Lt] (right-padded, mask True = token)
        -> last hidden state [B, Q + Lt, H] (queries first)."""
        num_queries = queries.shape[1]
        h = self.embeddings(queries, input_ids)
        mask = None
        if input_ids is not None and input_ids.shape[1] > 0 and text_mask is not None and not bool(text_mask.all()):
            ones = torch.ones(h.shape[0], num_queries, dtype=torch.bool, device=h.device)
            mask = torch.cat([ones, text_mask.to(device=h.device, dtype=torch.bool)], dim=1)
        for layer in self.encoder.layer:
            h = layer(h, visual, mask, num_queries)
        return h
