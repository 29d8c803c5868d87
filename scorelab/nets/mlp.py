"""Residual MLP denoiser for low-dimensional data ``x: (B, D)`` (2-D toys, Gaussian mixtures).

    h_0 = W_in x
    h_{k+1} = h_k + W_2 SiLU(W_1 SiLU(mod(LN(h_k), e)))        k = 0..depth-1
    out = W_out SiLU(LN(h_depth))

``e = TimeEmbedding(t) + LabelEmbedding(y)`` and ``mod(u, e) = u (1 + scale(e)) + shift(e)`` (the
scale-shift conditioning of Dhariwal & Nichol 2021). ``W_2`` of each block and ``W_out`` start at
zero (``zero_init``) so the untrained net is the identity on ``h`` and outputs 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .embeddings import LabelEmbedding, NetConfigBase, TimeEmbedding, _check

__all__ = ["MLPConfig", "MLP"]


@dataclass
class MLPConfig(NetConfigBase):
    """Config of :class:`MLP` (time/label fields from :class:`NetConfigBase`)."""

    dim: int = 2  # data dimension D of x: (B, D)
    width: int = 256  # hidden width of every residual block
    depth: int = 4  # number of residual blocks
    emb_dim: int = 128  # width of the time (+ label) embedding
    freq_dim: int = 64  # number of sinusoidal / Fourier time features before the embedding MLP
    dropout: float = 0.0  # dropout inside each residual block
    norm: bool = True  # LayerNorm at the start of each block and before the output layer
    zero_init: bool = True  # start each block's last layer and the output layer at zero

    def __post_init__(self):
        super().__post_init__()
        for name in ("dim", "width", "depth", "emb_dim", "freq_dim"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "must be a positive integer")
        _check(self, "freq_dim", self.freq_dim % 2 == 0, "must be even")
        _check(self, "dropout", 0.0 <= self.dropout < 1.0, "must lie in [0, 1)")


class _Block(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float, norm: bool, zero_init: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.mod = nn.Linear(emb_dim, 2 * width)  # -> (scale, shift)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        scale, shift = self.mod(e).chunk(2, dim=-1)  # (B, width) each
        u = self.norm(h) * (1 + scale) + shift
        u = self.fc1(self.act(u))
        u = self.fc2(self.drop(self.act(u)))
        return h + u


class MLP(nn.Module):
    """``net(x: (B, D), t: (B,), y: (B,) | None) -> (B, D)``; see the module docstring."""

    def __init__(self, cfg: MLPConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else MLPConfig(**overrides)
        self.cfg = cfg
        self.time_embed = TimeEmbedding(cfg.emb_dim, cfg.freq_dim, cfg.time_embedding, cfg.fourier_scale)
        self.label_embed = LabelEmbedding(cfg.num_classes, cfg.emb_dim) if cfg.num_classes else None
        self.emb_act = nn.SiLU()
        self.inp = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.emb_dim, cfg.dropout, cfg.norm, cfg.zero_init) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.width) if cfg.norm else nn.Identity()
        self.out = nn.Linear(cfg.width, cfg.dim)
        if cfg.zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.cfg.dim}), got {tuple(x.shape)}")
        B = x.shape[0]
        e = self.time_embed(t.reshape(-1).expand(B) if t.numel() == 1 else t)  # (B, emb_dim)
        if self.label_embed is not None:
            e = e + self.label_embed(y, B, x.device)
        elif y is not None:
            raise ValueError("y given but the net is unconditional (num_classes=0)")
        e = self.emb_act(e)
        h = self.inp(x)  # (B, width)
        for block in self.blocks:
            h = block(h, e)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).to(x.dtype)  # (B, D)
