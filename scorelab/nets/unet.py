"""U-Net denoiser for images ``x: (B, C, H, W)`` (Ronneberger et al. 2015; DDPM / ADM variant).

Layout (``L = len(channel_mult)`` levels, ``c_i = base_channels * channel_mult[i]``)::

    stem      [patchify p x p: (C, H, W) -> (C p^2, H/p, W/p)] -> conv3x3 -> c_0
    down i    num_res_blocks[i] x ResBlock(c_i) [+ Attention if i in attention_levels],
              each output kept as a skip; then conv3x3 stride 2 (not on the last level), kept too
    middle    ResBlock, [Attention if mid_attention], ResBlock                    at c_{L-1}
    up i      (num_res_blocks[i] + 1) x ResBlock(concat(h, skip) -> c_i) [+ Attention],
              then nearest upsampling to the skip's size + conv3x3 (not on level 0)
    head      GroupNorm -> SiLU -> conv3x3 -> C p^2 channels [-> unpatchify] -> (C, H, W)
              or, with p > 1 and pixel_channels = k > 0:
              ... conv3x3 -> k p^2 channels -> unpatchify -> conv3x3 at full resolution -> (C, H, W)

``ResBlock(x, e) = skip(x) + conv(drop(SiLU(mod(GN(conv(SiLU(GN(x)))), e))))`` with the scale-shift
conditioning ``mod(u, e) = u (1 + scale(e)) + shift(e)`` of Dhariwal & Nichol 2021, where
``e = SiLU(TimeEmbedding(t) + LabelEmbedding(y))``. Attention is multi-head self-attention over the
``H_i W_i`` positions of a level. Upsampling goes to the skip's exact size, so odd sizes work
(28 -> 14 -> 7 -> 4 and back). The last conv of every block, every attention projection and the
head start at zero (``zero_init``): the untrained net outputs 0.

Speed on CPU (``benchmarks/net_speed.py``: training steps on the 2-core AVX-512/AMX machine,
28x28x1, batch 128). A step is ~75% 3x3 convolutions (their backward costs 2-3x their forward),
so the levers are fewer convolution FLOPs and bfloat16:

* ``patch_size=2`` (patchify stem: 2x2 pixels -> one cell) runs the whole U-Net on 14x14 for
  28x28 images: 4x fewer FLOPs at the same parameter count, 2.7x the img/s.
* bfloat16 autocast (oneDNN/AMX convolutions and matmuls) gave 1.7-2.3x the img/s of float32 on
  that AMX machine and is ~14x slower than float32 on an AVX2-only AMD EPYC: the net holds no
  precision switch; ``train.precision: auto`` measures it where it runs (the time frequencies and
  the returned output stay float32 either way).
* ``num_res_blocks=1`` (1 block down, 2 up per level): 1.5x the img/s of 2 blocks, and at equal
  wall time it trained at least as well.
* ``channels_last=True`` speeds up oneDNN convolutions, but PyTorch's CPU GroupNorm is ~10x
  slower on NHWC tensors; even with ``norm="layer"`` (per-pixel LayerNorm) it was 10% slower
  than NCHW + GroupNorm. Off by default. Attention on the 14x14 grid costs 13%.
* ``torch.compile`` did not speed up a step measurably and takes minutes to compile.

Defaults (``UNetConfig()`` == ``UNetConfig.default_fmnist()``): base 32, levels (1, 2, 2), one
block per level down (two up), attention on the 4x4 grid and in the middle, patch 2:
1.19M parameters, ~475 img/s, 7x ``diffusers.UNet2DModel`` with the same layout on pixels
(1.62M parameters, float32) and 5x it under bfloat16 autocast. It gave recognisable
Fashion-MNIST samples after 220 s of training. With ``patch_size=2`` early samples show a faint
2-pixel grid texture; ``pixel_channels=8`` (a full-resolution output conv, -8% img/s) did not
remove it visibly, so it is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, NetConfigBase, TimeEmbedding, _check

__all__ = ["UNetConfig", "UNet"]


@dataclass
class UNetConfig(NetConfigBase):
    """Config of :class:`UNet` (time/label fields from :class:`NetConfigBase`)."""

    in_channels: int = 1  # image channels C of x: (B, C, H, W)
    out_channels: int = 0  # output channels (0: same as in_channels)
    base_channels: int = 32  # channels c_0 of the first level
    channel_mult: tuple = (1, 2, 2)  # c_i = base_channels * channel_mult[i]; len = number of levels
    num_res_blocks: int | tuple = 1  # residual blocks per level on the way down (int or one per level)
    attention_levels: tuple = (2,)  # level indices (0 = finest) with self-attention after each block
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    head_dim: int = 32  # channels per attention head (heads = channels // head_dim)
    dropout: float = 0.0  # dropout before the second conv of every residual block
    norm: str = "group"  # "group": GroupNorm(groups); "layer": LayerNorm over the channels of each pixel
    groups: int = 32  # GroupNorm groups (capped at the channel count; must divide every c_i)
    emb_dim: int = 0  # width of the time (+ label) embedding (0: 4 * base_channels)
    freq_dim: int = 0  # sinusoidal / Fourier time features (0: base_channels)
    patch_size: int = 2  # patchify stem: p x p pixels -> one grid cell (H and W divisible by p)
    pixel_channels: int = 0  # with patch_size > 1: unpatchify to this many channels, then a full-resolution conv3x3 (0: none)
    zero_init: bool = True  # start the last layer of each residual/attention branch and the head at zero
    channels_last: bool = False  # NHWC activations and weights (faster oneDNN convolutions on CPU)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.channel_mult, list):
            self.channel_mult = tuple(self.channel_mult)
        if isinstance(self.attention_levels, list):
            self.attention_levels = tuple(self.attention_levels)
        if isinstance(self.num_res_blocks, list):
            self.num_res_blocks = tuple(self.num_res_blocks)
        for name in ("in_channels", "base_channels", "head_dim", "groups", "patch_size"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and v >= 1, "must be a positive integer")
        for name in ("out_channels", "emb_dim", "freq_dim", "pixel_channels"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and v >= 0, "must be a non-negative integer (0: default)")
        _check(self, "freq_dim", self.freq_dim % 2 == 0, "must be even")
        _check(self, "channel_mult", isinstance(self.channel_mult, tuple) and len(self.channel_mult) >= 1
               and all(isinstance(m, int) and m >= 1 for m in self.channel_mult), "must be a non-empty tuple of positive integers")
        L = len(self.channel_mult)
        nrb = self.num_res_blocks
        _check(self, "num_res_blocks", (isinstance(nrb, int) and nrb >= 1) or (isinstance(nrb, tuple) and len(nrb) == L
               and all(isinstance(n, int) and n >= 1 for n in nrb)), f"must be a positive integer or {L} of them (one per level)")
        _check(self, "attention_levels", isinstance(self.attention_levels, tuple)
               and all(isinstance(i, int) and 0 <= i < L for i in self.attention_levels), f"must hold level indices in 0..{L - 1}")
        _check(self, "dropout", 0.0 <= self.dropout < 1.0, "must lie in [0, 1)")
        _check(self, "norm", self.norm in ("group", "layer"), "must be 'group' or 'layer'")
        for c in self.channels if self.norm == "group" else ():
            _check(self, "groups", c % min(self.groups, c) == 0, f"must divide every level's channel count {self.channels}")
        if self.attention_levels or self.mid_attention:
            att = [self.channels[i] for i in self.attention_levels] + ([self.channels[-1]] if self.mid_attention else [])
            _check(self, "head_dim", all(c % self.head_dim == 0 for c in att), f"must divide the channels of attention levels {att}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels c_i of each level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        n = self.num_res_blocks
        return n if isinstance(n, tuple) else (n,) * len(self.channel_mult)

    @classmethod
    def default_fmnist(cls, **overrides) -> "UNetConfig":
        """The default for 28x28x1 (Fashion-MNIST) on a CPU (= the field defaults; see benchmarks/net_speed.py)."""
        return cls(**{"in_channels": 1, **overrides})


class PixelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel: (B, C, H, W) -> same (free of copies in channels_last)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(c: int, groups: int) -> nn.Module:
    """GroupNorm(min(groups, c)) if groups > 0, else per-pixel LayerNorm."""
    return nn.GroupNorm(min(groups, c), c, eps=1e-6) if groups > 0 else PixelLayerNorm(c, eps=1e-6)


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """``skip(x) + conv2(drop(SiLU(mod(GN(conv1(SiLU(GN(x)))), e))))``; x: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float, zero_init: bool):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.mod = nn.Linear(emb_dim, 2 * c_out)  # e -> (scale, shift)
        self.norm2 = _norm(c_out, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if zero_init:
            _zero(self.conv2)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.mod(e)[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H W positions, residual; x: (B, C, H, W) -> same."""

    def __init__(self, c: int, head_dim: int, groups: int, zero_init: bool):
        super().__init__()
        self.heads = c // head_dim
        self.norm = _norm(c, groups)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        if zero_init:
            _zero(self.proj)

    def forward(self, x: Tensor, e: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C), N = H W
        q, k, v = self.qkv(h).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd)
        if H * W <= 64:  # small grids: explicit softmax(q k^T / sqrt(hd)) v is ~4x faster than CPU SDPA
            h = torch.softmax((q @ k.transpose(-1, -2)) * (C // self.heads) ** -0.5, dim=-1) @ v
        else:
            h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))  # (B, N, C)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=fmt)


class Downsample(nn.Module):
    """conv3x3 stride 2: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to ``size`` then conv3x3: (B, C, h, w) -> (B, C, *size)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor, size) -> Tensor:
        if tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class UNet(nn.Module):
    """``net(x: (B, C, H, W), t: (B,), y: (B,) | None) -> (B, C_out, H, W)``; see the module docstring."""

    def __init__(self, cfg: UNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else UNetConfig(**overrides)
        self.cfg = cfg
        p, z = cfg.patch_size, cfg.zero_init
        g = cfg.groups if cfg.norm == "group" else 0  # 0: per-pixel LayerNorm
        chans, nblocks = cfg.channels, cfg.blocks_per_level
        emb_dim = cfg.emb_dim or 4 * cfg.base_channels
        out_ch = cfg.out_channels or cfg.in_channels
        self.time_embed = TimeEmbedding(emb_dim, cfg.freq_dim or cfg.base_channels, cfg.time_embedding, cfg.fourier_scale)
        self.label_embed = LabelEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes else None

        def block(c_in, c_out):
            return ResBlock(c_in, c_out, emb_dim, g, cfg.dropout, z)

        def attn(c):
            return Attention(c, cfg.head_dim, g, z)

        self.stem = nn.Conv2d(cfg.in_channels * p * p, chans[0], 3, padding=1)
        # down path: a flat list of modules; skips are pushed after each ResBlock(+Attention) and Downsample
        self.down = nn.ModuleList()
        skip_ch = [chans[0]]
        c = chans[0]
        for i, (ci, n) in enumerate(zip(chans, nblocks)):
            for _ in range(n):
                layers = [block(c, ci)] + ([attn(ci)] if i in cfg.attention_levels else [])
                self.down.append(nn.ModuleList(layers))
                c = ci
                skip_ch.append(c)
            if i < len(chans) - 1:
                self.down.append(Downsample(c))
                skip_ch.append(c)
        self.mid = nn.ModuleList([block(c, c)] + ([attn(c)] if cfg.mid_attention else []) + [block(c, c)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ci = chans[i]
            for _ in range(nblocks[i] + 1):
                layers = [block(c + skip_ch.pop(), ci)] + ([attn(ci)] if i in cfg.attention_levels else [])
                self.up.append(nn.ModuleList(layers))
                c = ci
            if i > 0:
                self.up.append(Upsample(c))
        assert not skip_ch
        k = cfg.pixel_channels if p > 1 else 0
        self.head = nn.Sequential(_norm(c, g), nn.SiLU(), nn.Conv2d(c, (k or out_ch) * p * p, 3, padding=1))
        self.pixel_head = nn.Conv2d(k, out_ch, 3, padding=1) if k else None  # full-resolution refinement
        if z:
            _zero(self.pixel_head if k else self.head[-1])
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        B, C, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"UNet expects x: (B, {cfg.in_channels}, H, W) with H, W divisible by patch_size={p}, got {tuple(x.shape)}")
        if t.numel() == 1:
            t = t.reshape(1).expand(B)
        e = self.time_embed(t)  # (B, emb_dim)
        if self.label_embed is not None:
            e = e + self.label_embed(y, B, x.device)
        elif y is not None:
            raise ValueError("y given but the net is unconditional (num_classes=0)")
        e = F.silu(e)
        h = F.pixel_unshuffle(x, p) if p > 1 else x  # (B, C p^2, H/p, W/p)
        if cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.stem(h)
        skips = [h]
        for m in self.down:
            if isinstance(m, Downsample):
                h = m(h)
            else:
                for layer in m:
                    h = layer(h, e)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, e)
        for m in self.up:
            if isinstance(m, Upsample):
                h = m(h, skips[-1].shape[-2:])
            else:
                h = torch.cat([h, skips.pop()], dim=1)
                for layer in m:
                    h = layer(h, e)
        h = self.head(h)  # (B, C_out p^2, H/p, W/p)  or  (B, k p^2, H/p, W/p)
        if p > 1:
            h = F.pixel_shuffle(h, p)  # (B, C_out or k, H, W)
        if self.pixel_head is not None:
            h = self.pixel_head(h)  # (B, C_out, H, W)
        return h.to(x.dtype).contiguous()  # (B, C_out, H, W)
