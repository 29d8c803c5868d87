"""Noise-aware classifiers ``f(x_t, t) -> logits (B, num_classes)`` for classifier guidance.

The classifier sees noised data ``x_t = alpha x_0 + sigma eps`` and the time ``t`` in the path's
order-one time input ``path.c_noise(t)`` (embedded as in the denoising nets: :class:`~scorelab.nets.embeddings.TimeEmbedding`).
Guidance (:class:`scorelab.guidance.ClassifierGuidance`) differentiates ``log softmax(f)[y]``
with respect to ``x_t``, so every layer is smooth (SiLU, no max-pooling).

Flat data ``x: (B, D)`` -> an MLP::

    h = Linear(D -> W)(x)                                   # (B, W)
    depth x:  h = h + Linear(SiLU(LN(h) (1 + s) + b))        # s, b = Linear(emb(t)): (B, W) each
    logits = Linear(SiLU(LN(h)))                             # (B, K)

Images ``x: (B, C, H, W)`` -> a small conv net::

    h = conv_pxp,stride p(C -> c_0)(x)                        # patch stem: (B, c_0, H/p, W/p)
    per level l:  ResBlock(c_{l-1} -> c_l, t)  then 2x average pooling (not after the last level)
        ResBlock: GN SiLU conv3x3, GN * (1 + s) + b from emb(t), SiLU conv3x3, plus a 1x1 skip
    logits = Linear(mean over H, W of SiLU(GN(h)))            # (B, K)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .embeddings import NetConfigBase, TimeEmbedding, _check

__all__ = ["NoisyClassifierConfig", "NoisyClassifier"]


@dataclass
class NoisyClassifierConfig(NetConfigBase):
    """Config of :class:`NoisyClassifier`; ``num_classes`` is the number of logits (>= 2).

    Time fields (``time_embedding``, ``fourier_scale``) as for every denoising net.
    """

    width: int = 128  # MLP (flat data): hidden width W
    depth: int = 3  # MLP: number of residual blocks
    channels: tuple = (32, 64, 64)  # conv (images): width of each resolution level
    groups: int = 8  # conv: GroupNorm groups (must divide every width)
    patch_size: int = 2  # conv: the stem is a patch_size x patch_size conv with that stride (1: a 3x3 conv at full resolution)
    emb_dim: int = 128  # width of the time embedding
    freq_dim: int = 64  # sinusoidal / Fourier time features before the embedding MLP
    dropout: float = 0.0  # dropout before the logit layer

    def __post_init__(self):
        super().__post_init__()
        _check(self, "num_classes", self.num_classes >= 2, "must be >= 2 (a classifier needs classes)")
        for name in ("width", "depth", "groups", "patch_size", "emb_dim", "freq_dim"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "must be a positive integer")
        self.channels = tuple(self.channels)
        _check(self, "channels", len(self.channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in self.channels),
               "must be a non-empty list of positive integers")
        _check(self, "groups", all(c % self.groups == 0 for c in self.channels), "must divide every entry of channels")
        _check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")


class _MLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.lin = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        s, b = self.film(emb).chunk(2, dim=-1)  # (B, W) each
        return h + self.lin(nn.functional.silu(self.norm(h) * (1 + s) + b))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        s, b = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1) each
        r = self.conv1(nn.functional.silu(self.norm1(h)))
        r = self.conv2(nn.functional.silu(self.norm2(r) * (1 + s) + b))
        return self.skip(h) + r


class NoisyClassifier(nn.Module):
    """``forward(x_t, t) -> logits (B, num_classes)``; an MLP for (D,) data, a conv net for (C, H, W).

    Args:
        config: a :class:`NoisyClassifierConfig`.
        data_shape: shape of one example without the batch: ``(D,)`` or ``(C, H, W)``.
    """

    def __init__(self, config: NoisyClassifierConfig, data_shape: tuple):
        super().__init__()
        self.config = config
        self.data_shape = tuple(data_shape)
        cfg = config
        self.time = TimeEmbedding(cfg.emb_dim, cfg.freq_dim, cfg.time_embedding, cfg.fourier_scale)
        self.dropout = nn.Dropout(cfg.dropout)
        if len(self.data_shape) == 1:
            self.kind = "mlp"
            self.inp = nn.Linear(self.data_shape[0], cfg.width)
            self.blocks = nn.ModuleList(_MLPBlock(cfg.width, cfg.emb_dim) for _ in range(cfg.depth))
            self.out_norm = nn.LayerNorm(cfg.width)
            self.head = nn.Linear(cfg.width, cfg.num_classes)
        elif len(self.data_shape) == 3:
            self.kind = "conv"
            ch = cfg.channels
            p = cfg.patch_size
            self.inp = nn.Conv2d(self.data_shape[0], ch[0], 3, padding=1) if p == 1 else nn.Conv2d(self.data_shape[0], ch[0], p, stride=p)
            self.blocks = nn.ModuleList(
                _ResBlock(ch[max(i - 1, 0)], ch[i], cfg.emb_dim, cfg.groups) for i in range(len(ch))
            )
            self.out_norm = nn.GroupNorm(cfg.groups, ch[-1])
            self.head = nn.Linear(ch[-1], cfg.num_classes)
        else:
            raise ValueError(f"NoisyClassifier needs data of shape (D,) or (C, H, W), got {self.data_shape}")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        emb = nn.functional.silu(self.time(t))  # (B, E)
        h = self.inp(x.to(self.head.weight.dtype))
        if self.kind == "mlp":
            for blk in self.blocks:
                h = blk(h, emb)  # (B, W)
            h = nn.functional.silu(self.out_norm(h))
        else:
            for i, blk in enumerate(self.blocks):
                h = blk(h, emb)  # (B, c_i, H_i, W_i)
                if i < len(self.blocks) - 1:
                    h = nn.functional.avg_pool2d(h, 2)
            h = nn.functional.silu(self.out_norm(h)).mean(dim=(2, 3))  # (B, c_last)
        return self.head(self.dropout(h))  # (B, K)
