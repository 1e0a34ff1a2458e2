"""InternVideo2-1B vision transformer, the "clean" inference variant (docs/model.md, "Reference architecture").

Pre-norm blocks with RMSNorm, qk-norm over all heads jointly, layer scale and exact GELU. The cls token is
kept and no final norm is applied: the output is that of block `depth + x_vis_return_idx` (39 of 40).
Parameter names follow the official checkpoint (`vision_encoder.*`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videochat.model.config import VisionConfig


class RMSNorm(nn.Module):
    """Official RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.embed_dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.norm_eps)  # over all heads flattened
        self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)  # q,k,v split first, then heads
        q, k, v = qkv.unbind(2)                                          # [B, N, H, hd] each
        q = self.q_norm(q.reshape(b, n, d)).view(b, n, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(b, n, d)).view(b, n, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = nn.Parameter(torch.ones(d))
        self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden_dim)
        self.ls2 = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, T, H, W] -> [B, T*h*w, D]
        x = self.proj(x)                       # [B, D, T, h, w]
        x = x.flatten(3).permute(0, 2, 3, 1)   # [B, T, h*w, D]  frame-major, then row-major patches
        return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionEncoder(nn.Module):
    """`[B, 3, T, 224, 224]` -> `[B, 1 + T*256, D]` (T == 1 uses `img_pos_embed`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.embed_dim, cfg.num_patches_per_frame
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_frames // cfg.tubelet_size * p, d))
        self.img_pos_embed = nn.Parameter(torch.zeros(1, 1 + p, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))

    def position_embedding(self, frames: int) -> torch.Tensor:  # -> [1, 1 + T*256, D]
        if frames == 1:
            return self.img_pos_embed
        t = frames // self.cfg.tubelet_size
        t0 = self.cfg.num_frames // self.cfg.tubelet_size
        if t == t0:
            return self.pos_embed
        # Other frame counts: linear temporal interpolation of the stored per-frame slices (official
        # `expand_pos_embed`; the reference moves it to CUDA unconditionally, here it stays on the device).
        cls_pos, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = pos.shape[-1]
        pos = pos.reshape(1, t0, -1, d).permute(0, 2, 3, 1).reshape(-1, d, t0)         # [L, D, t0]
        pos = F.interpolate(pos.float(), size=t, mode="linear").to(pos.dtype)           # [L, D, t]
        pos = pos.reshape(1, -1, d, t).permute(0, 3, 1, 2).reshape(1, -1, d)            # [1, t*L, D]
        return torch.cat([cls_pos, pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, T, H, W] -> [B, 1 + T*h*w, D]
        frames = x.shape[2]
        x = self.patch_embed(x.to(self.cls_token.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.position_embedding(frames)
        if pos.shape[1] != x.shape[1]:
            raise ValueError(f"vision encoder: {x.shape[1]} tokens but position embedding has {pos.shape[1]} "
                             f"(only {self.cfg.img_size}x{self.cfg.img_size} views are supported)")
        x = x + pos
        for block in self.blocks:
            x = block(x)
        return x
