"""Autoregressive image networks (networks only; likelihood and samplers: :mod:`scorelab.autoregressive`).

An image ``x: (B, C, H, W)`` is a sequence of ``C H W`` subpixels with 256 values each (seed 001,
"Autoregressive Models of Images"). Both networks return 256-way logits per subpixel,
``(B, 256, C, H, W)``, where the logits of subpixel ``s`` depend only on the subpixels before ``s``
in the model's order, so ``p(x) = prod_s softmax(logits_s)[x_s]`` is an exact, normalized likelihood.
Inputs are model-space values ``x = k / 127.5 - 1`` (:func:`scorelab.quantize.to_model`).

**GatedPixelCNN** (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders"), order: raster over pixels, then channels ``0..C-1`` within a pixel. Two stacks with
``n = kernel_size // 2``::

    vertical   conv (n+1) x k over rows <= i (all columns within n): v_pre (B, 2F, H, W)
               v_out = tanh(v_pre[:F] + c_v) * sigmoid(v_pre[F:] + c_v')
    horizontal conv 1 x (n+1) over columns <= j of row i, plus 1x1(down_shift(v_pre)):
               h_pre = hconv(h) + 1x1(v_pre shifted down one row)      (rows < i only)
               h_out = h + 1x1(tanh(h_pre[:F] + c_h) * sigmoid(h_pre[F:] + c_h'))
               skip  = 1x1(gated)
    head       SiLU(sum of skips) -> 1x1 -> SiLU -> 1x1 -> 256 C logits   (SiLU for van den Oord's ReLU:
               no unit of the head is ever dead, i.e. has an exactly zero gradient for all inputs)

The vertical stack may see the current row because it reaches the horizontal stack only through
the one-row down shift; the horizontal stack covers the current row to the left. Together they see
every earlier pixel within the receptive field (no blind spot, unlike the masked 3x3 stack of the
original PixelCNN), which grows by ``n`` columns / rows per layer. Masks on the horizontal
stack's current-pixel tap and on every 1x1 of the horizontal path split the ``F`` features into
``C`` groups (feature ``j`` belongs to channel group ``j C // F``): **mask A** (first layer) lets
group ``g`` see input channels ``< g`` of the current pixel, **mask B** (later layers, head) groups
``<= g``; the output logits of channel ``c`` come from group ``c``. The first layer has no
residual connection (its input is the image itself, which would leak the current subpixel).
The default (``PixelCNNConfig()``: F = 32, 8 layers, kernel 5) has 0.32M parameters; a pixel sees
16 columns to its left in its row and, in the 17 rows above, 16 columns either side.
Class conditioning: a label embedding, projected per layer, is added to every gate; an optional
spatial map ``cond: (B, cond_channels, H, W)`` (the tile model's context) is added through 1x1
convolutions. Neither breaks causality: they do not depend on ``x``.

**TilePixelCNN**, the seed's answer to "a 1024x1024 image is 3M subpixels": the image is a
sequence of ``T = (H/k)(W/k)`` tiles of ``k x k`` pixels in raster order, and

    p(x) = prod_t p(tile_t | tile_<t),   context_t = Transformer_causal(start, e(tile_0), ..., e(tile_{t-1}))_t

with ``e`` a linear embedding of a tile's ``C k^2`` values plus learned tile positions (and the
label embedding), and a causal (lower-triangular) self-attention stack, so ``context_t`` sees
exactly the tiles before ``t``: the whole past, at every depth. The context is mapped linearly to
a ``(cond_channels, k, k)`` map that conditions the tile's pixel model (``head``):

* ``"autoregressive"`` (default): a small GatedPixelCNN over the ``k x k`` tile with the context
  map as its spatial condition, so ``p(tile_t | tile_<t) = prod_s p(x_s | x_<s in tile, tile_<t)``.
  Exact and with no independence assumption: it keeps the dependence between neighbouring pixels of
  a tile, which a factorized tile cannot model (a factorized tile puts independent per-pixel noise
  on e.g. an edge that falls inside a tile). Sampling costs one context evaluation per tile and
  ``C k^2`` evaluations of the small head on one ``k x k`` tile: the expensive, whole-image network
  runs ``T = H W / k^2`` times instead of ``C H W`` times.
* ``"independent"``: the pixels of a tile are independent given the context (a per-pixel MLP on
  the context map): still an exact normalized likelihood, and one network evaluation per tile.

The order of the subpixels is: tiles in raster order, pixels of a tile in raster order, channels.
The default (``TilePixelCNNConfig()``: 28x28, 4x4 tiles, 3 transformer blocks of width 128, a
3-layer head of width 32) has 0.71M parameters (0.65M with the independent head); measured
sampling speeds are in :mod:`scorelab.autoregressive`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import Mlp
from .embeddings import LabelEmbedding, NetConfigBase, _check

__all__ = [
    "NUM_LEVELS",
    "TILE_HEADS",
    "PixelCNNConfig",
    "TilePixelCNNConfig",
    "MaskedConv2d",
    "GatedLayer",
    "GatedPixelCNN",
    "TilePixelCNN",
    "feature_groups",
    "group_mask",
    "raster_mask",
    "down_shift",
]

NUM_LEVELS = 256  # values per subpixel
TILE_HEADS = ("autoregressive", "independent")


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------
def feature_groups(n_features: int, n_groups: int) -> Tensor:
    """Channel group of each of ``n_features`` features: ``j * n_groups // n_features`` (contiguous blocks)."""
    return torch.arange(n_features) * n_groups // n_features


def group_mask(in_groups: Tensor, out_groups: Tensor, mask_type: str) -> Tensor:
    """``(out, in)`` 0/1 connections at the current pixel: A: ``out_g > in_g``; B: ``out_g >= in_g``."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    o, i = out_groups[:, None], in_groups[None, :]
    return ((o > i) if mask_type == "A" else (o >= i)).float()


def raster_mask(in_groups: Tensor, out_groups: Tensor, kernel_size: int, mask_type: str) -> Tensor:
    """The original PixelCNN mask of a ``k x k`` kernel centred on the current pixel: ``(out, in, k, k)``.

    Taps above the centre row and left of the centre in its row: 1; the centre: :func:`group_mask`;
    the rest (the future): 0. (The gated stacks below use cropped kernels instead; this is the
    generic raster-order mask A / B.)
    """
    k = kernel_size
    m = torch.zeros(len(out_groups), len(in_groups), k, k)
    m[:, :, : k // 2] = 1
    m[:, :, k // 2, : k // 2] = 1
    m[:, :, k // 2, k // 2] = group_mask(in_groups, out_groups, mask_type)
    return m


def down_shift(v: Tensor) -> Tensor:
    """Shift ``(B, C, H, W)`` down by one row (row 0 becomes zeros): row ``i`` then holds row ``i - 1``."""
    return F.pad(v, (0, 0, 1, 0))[:, :, :-1]


class MaskedConv2d(nn.Conv2d):
    """``Conv2d`` with a fixed 0/1 ``mask`` on its weight and explicit zero padding ``(left, right, top, bottom)``.

    The masked weight ``weight * mask`` is used in every call, so masked taps contribute exactly
    zero to the output and receive exactly zero gradient from it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding=(0, 0, 0, 0), mask: Tensor | None = None):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        self.pad = tuple(padding)  # (left, right, top, bottom) zeros added before the convolution
        m = torch.ones_like(self.weight) if mask is None else mask.to(self.weight.dtype).expand_as(self.weight).clone()
        self.register_buffer("mask", m, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def _masked_1x1(in_groups: Tensor, out_groups: Tensor, mask_type: str = "B") -> MaskedConv2d:
    return MaskedConv2d(len(in_groups), len(out_groups), 1, mask=group_mask(in_groups, out_groups, mask_type)[:, :, None, None])


def _gate(a: Tensor) -> Tensor:
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


# --------------------------------------------------------------------------------------
# Gated PixelCNN
# --------------------------------------------------------------------------------------
@dataclass
class PixelCNNConfig:
    """Config of :class:`GatedPixelCNN`."""

    in_channels: int = 1  # image channels C (one 256-way softmax per channel of a pixel)
    channels: int = 32  # F: features of each stack (divisible by in_channels: one group per channel)
    layers: int = 8  # gated layers; the first uses mask A, the rest mask B
    kernel_size: int = 5  # k (odd): vertical (k//2 + 1) x k, horizontal 1 x (k//2 + 1) kernels
    head_channels: int = 0  # hidden width of the output head (0: channels); divisible by in_channels
    num_classes: int = 0  # class labels (0: unconditional); y = num_classes is the null label
    label_dim: int = 32  # width of the label embedding
    cond_channels: int = 0  # channels of an optional spatial condition map (B, cond_channels, H, W) (0: none)

    from_dict = classmethod(NetConfigBase.from_dict.__func__)  # plain dict (YAML) -> config; unknown keys are an error
    to_dict = NetConfigBase.to_dict  # config -> plain dict that from_dict reads back

    def __post_init__(self):
        for name in ("in_channels", "channels", "layers", "kernel_size", "label_dim"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be a positive integer")
        for name in ("head_channels", "num_classes", "cond_channels"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be a non-negative integer")
        _check(self, "kernel_size", self.kernel_size % 2 == 1 and self.kernel_size >= 3, "must be odd and >= 3")
        _check(self, "channels", self.channels % self.in_channels == 0, f"must be divisible by in_channels={self.in_channels}")
        _check(self, "head_channels", self.head_channels % self.in_channels == 0,
               f"must be divisible by in_channels={self.in_channels}")


class GatedLayer(nn.Module):
    """One gated layer of both stacks: ``(v, h) -> (v_out, h_out, skip)``, each ``(B, F, H, W)`` (module docstring).

    ``first``: the input is the image (``in_channels = C``), mask A, no residual connection.
    """

    def __init__(self, in_channels: int, features: int, image_channels: int, kernel_size: int, first: bool,
                 label_dim: int = 0, cond_channels: int = 0):
        super().__init__()
        n, F_ = kernel_size // 2, features
        fg = feature_groups(F_, image_channels)
        in_groups = torch.arange(image_channels) if first else fg
        gate_groups = torch.cat([fg, fg])  # tanh half and sigmoid half share the groups
        self.first = first  # mask A and no residual
        self.v_conv = MaskedConv2d(in_channels, 2 * F_, (n + 1, kernel_size), (n, n, n, 0))  # rows i-n..i
        hmask = torch.ones(2 * F_, in_channels, 1, n + 1)
        hmask[:, :, 0, n] = group_mask(in_groups, gate_groups, "A" if first else "B")  # the current pixel's tap
        self.h_conv = MaskedConv2d(in_channels, 2 * F_, (1, n + 1), (n, 0, 0, 0), hmask)  # columns j-n..j
        self.v_to_h = nn.Conv2d(2 * F_, 2 * F_, 1)  # fed with rows < i only (down shift): no mask needed
        self.h_out = _masked_1x1(fg, fg)
        self.skip = _masked_1x1(fg, fg)
        self.label = nn.Linear(label_dim, 4 * F_) if label_dim else None
        self.cond = nn.Conv2d(cond_channels, 4 * F_, 1) if cond_channels else None

    def forward(self, v: Tensor, h: Tensor, label: Tensor | None = None, cond: Tensor | None = None):
        v_pre = self.v_conv(v)  # (B, 2F, H, W): sees rows <= i
        h_pre = self.h_conv(h) + self.v_to_h(down_shift(v_pre))  # (B, 2F, H, W): row i left of j (+ mask), rows < i
        if self.label is not None and label is not None:
            cv, ch = self.label(label)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        if self.cond is not None and cond is not None:
            cv, ch = self.cond(cond).chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        v_out = _gate(v_pre)
        gated = _gate(h_pre)  # (B, F, H, W)
        h_out = self.h_out(gated) if self.first else h + self.h_out(gated)
        return v_out, h_out, self.skip(gated)


class GatedPixelCNN(nn.Module):
    """``x: (B, C, H, W) [, y: (B,), cond: (B, cond_channels, H, W)] -> logits (B, 256, C, H, W)``.

    Van den Oord et al. 2016 (module docstring); any ``H, W`` (fully convolutional).
    """

    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        self.config = config
        C, F_ = config.in_channels, config.channels
        self.labels = LabelEmbedding(config.num_classes, config.label_dim) if config.num_classes else None
        ld = config.label_dim if config.num_classes else 0
        self.layers = nn.ModuleList(
            GatedLayer(C if i == 0 else F_, F_, C, config.kernel_size, first=(i == 0), label_dim=ld, cond_channels=config.cond_channels)
            for i in range(config.layers)
        )
        fg = feature_groups(F_, C)
        hc = config.head_channels or F_
        hg = feature_groups(hc, C)
        self.head1 = _masked_1x1(fg, hg)
        self.head2 = _masked_1x1(hg, torch.arange(C).repeat_interleave(NUM_LEVELS))  # logit (c, v) at index c 256 + v

    def forward(self, x: Tensor, y: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"GatedPixelCNN expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if self.labels is None and y is not None:
            raise ValueError("this PixelCNN is unconditional (num_classes = 0) but got labels y")
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(f"cond must be given exactly when cond_channels > 0 (cond_channels={cfg.cond_channels})")
        label = self.labels(y, x.shape[0], x.device).to(x.dtype) if self.labels is not None else None
        v = h = x
        skips = 0
        for layer in self.layers:
            v, h, s = layer(v, h, label, cond)
            skips = skips + s
        out = self.head2(F.silu(self.head1(F.silu(skips))))  # (B, C 256, H, W)
        B, _, H, W = out.shape
        return out.view(B, cfg.in_channels, NUM_LEVELS, H, W).transpose(1, 2)  # (B, 256, C, H, W)


# --------------------------------------------------------------------------------------
# Tile model
# --------------------------------------------------------------------------------------
@dataclass
class TilePixelCNNConfig:
    """Config of :class:`TilePixelCNN` (module docstring)."""

    in_channels: int = 1  # image channels C
    image_size: int | tuple = 28  # H = W, or (H, W); both divisible by tile_size
    tile_size: int = 4  # k: tiles of k x k pixels (28x28 -> 7x7 = 49 tiles)
    d_model: int = 128  # width of the causal transformer over tiles
    context_layers: int = 3  # transformer blocks (pre-LN, causal self-attention + MLP)
    heads: int = 4  # attention heads (divide d_model)
    mlp_ratio: float = 4.0  # transformer MLP width / d_model
    cond_channels: int = 16  # channels of the per-tile context map (B, cond_channels, k, k) fed to the head
    head: str = "autoregressive"  # tile pixel model: "autoregressive" (gated PixelCNN in the tile) or "independent"
    head_channels: int = 32  # F of the within-tile gated PixelCNN (or the width of the independent MLP)
    head_layers: int = 3  # gated layers of the within-tile head (enough to see the whole tile: >= k - 1 for kernel 3)
    head_kernel: int = 3  # kernel size of the within-tile head
    num_classes: int = 0  # class labels (0: unconditional); a label embedding (width d_model) is added to every tile token

    from_dict = classmethod(NetConfigBase.from_dict.__func__)
    to_dict = NetConfigBase.to_dict

    def __post_init__(self):
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        for name in ("in_channels", "tile_size", "d_model", "context_layers", "heads", "cond_channels", "head_channels",
                     "head_layers", "head_kernel"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be a positive integer")
        _check(self, "num_classes", isinstance(self.num_classes, int) and self.num_classes >= 0, "must be a non-negative integer")
        _check(self, "head", self.head in TILE_HEADS, f"must be one of {TILE_HEADS}")
        _check(self, "heads", self.d_model % self.heads == 0, f"must divide d_model={self.d_model}")
        _check(self, "mlp_ratio", self.mlp_ratio > 0, "must be positive")
        _check(self, "head_kernel", self.head_kernel % 2 == 1 and self.head_kernel >= 3, "must be odd and >= 3")
        _check(self, "head_channels", self.head_channels % self.in_channels == 0, f"must be divisible by in_channels={self.in_channels}")
        s = self.image_size
        _check(self, "image_size", (isinstance(s, int) and s >= 1) or (isinstance(s, tuple) and len(s) == 2
               and all(isinstance(v, int) and v >= 1 for v in s)), "must be a positive integer or (H, W)")
        H, W = self.hw
        _check(self, "tile_size", H % self.tile_size == 0 and W % self.tile_size == 0,
               f"must divide the image size {H}x{W}")

    @property
    def hw(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles per column and per row ``(H/k, W/k)``."""
        H, W = self.hw
        return H // self.tile_size, W // self.tile_size

    @property
    def num_tiles(self) -> int:
        r, c = self.grid
        return r * c


class CausalBlock(nn.Module):
    """Pre-LN transformer block with causal self-attention: ``x: (B, N, D) -> (B, N, D)``; token ``n`` sees ``<= n``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, N, hd)
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()  # (N, N): True = attend
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)  # (B, nh, N, hd)
        x = x + self.proj(h.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class TilePixelCNN(nn.Module):
    """``x: (B, C, H, W) [, y] -> logits (B, 256, C, H, W)`` in tile order (module docstring).

    The sampler :func:`scorelab.autoregressive.sample_tiles` uses :meth:`tile_contexts`,
    :meth:`tile_logits`, :meth:`to_tiles` and the config's ``grid`` / ``tile_size`` / ``head``.
    """

    def __init__(self, config: TilePixelCNNConfig):
        super().__init__()
        self.config = config
        C, k, d = config.in_channels, config.tile_size, config.d_model
        T = config.num_tiles
        self.embed = nn.Linear(C * k * k, d)  # a tile's C k^2 model-space values -> token
        self.start = nn.Parameter(torch.zeros(d))  # token of "no tile yet" (input of tile 0's context)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)  # learned tile positions
        self.labels = LabelEmbedding(config.num_classes, d) if config.num_classes else None
        self.blocks = nn.ModuleList(CausalBlock(d, config.heads, config.mlp_ratio) for _ in range(config.context_layers))
        self.norm = nn.LayerNorm(d)
        self.to_map = nn.Linear(d, config.cond_channels * k * k)  # context_t -> (cond_channels, k, k)
        if config.head == "autoregressive":
            self.head = GatedPixelCNN(PixelCNNConfig(in_channels=C, channels=config.head_channels, layers=config.head_layers,
                                                     kernel_size=config.head_kernel, cond_channels=config.cond_channels))
        else:
            hc = config.head_channels
            self.head = nn.Sequential(nn.Conv2d(config.cond_channels, hc, 1), nn.SiLU(), nn.Conv2d(hc, hc, 1), nn.SiLU(),
                                      nn.Conv2d(hc, C * NUM_LEVELS, 1))

    # ---- tiling -------------------------------------------------------------------------
    def to_tiles(self, x: Tensor) -> Tensor:
        """``(B, *F, H, W) -> (B, T, *F, k, k)``, tiles in raster order."""
        k = self.config.tile_size
        R, Cc = self.config.grid
        lead = x.shape[:-2]
        x = x.reshape(*lead, R, k, Cc, k)
        nl = len(lead)
        x = x.permute(0, nl, nl + 2, *range(1, nl), nl + 1, nl + 3)  # (B, R, Cc, *F, k, k)
        return x.reshape(lead[0], R * Cc, *lead[1:], k, k)

    def from_tiles(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_tiles`: ``(B, T, *F, k, k) -> (B, *F, H, W)``."""
        k = self.config.tile_size
        R, Cc = self.config.grid
        B, feat = t.shape[0], t.shape[2:-2]
        nf = len(feat)
        t = t.reshape(B, R, Cc, *feat, k, k)
        t = t.permute(0, *range(3, 3 + nf), 1, 3 + nf, 2, 4 + nf)  # (B, *F, R, k, Cc, k)
        H, W = self.config.hw
        return t.reshape(B, *feat, H, W)

    # ---- the two parts --------------------------------------------------------------------
    def tile_contexts(self, x: Tensor, y: Tensor | None = None, n_tiles: int | None = None) -> Tensor:
        """Contexts of the first ``n_tiles`` tiles (default all): ``(B, n, d_model)``; context ``t`` depends
        only on tiles ``< t`` of ``x: (B, C, H, W)`` (later pixels of ``x`` may hold anything)."""
        T = self.config.num_tiles
        n = T if n_tiles is None else n_tiles
        if not 1 <= n <= T:
            raise ValueError(f"n_tiles must lie in 1..{T}, got {n_tiles}")
        B = x.shape[0]
        tiles = self.to_tiles(x)[:, : n - 1].flatten(2)  # (B, n-1, C k^2): the tiles before the last
        tok = torch.cat([self.start.expand(B, 1, -1).to(x.dtype), self.embed(tiles)], dim=1)  # (B, n, d)
        tok = tok + self.pos[:n].to(x.dtype)
        if self.labels is not None:
            tok = tok + self.labels(y, B, x.device).to(x.dtype)[:, None]
        elif y is not None:
            raise ValueError("this TilePixelCNN is unconditional (num_classes = 0) but got labels y")
        for block in self.blocks:
            tok = block(tok)
        return self.norm(tok)

    def tile_logits(self, tiles: Tensor, context: Tensor) -> Tensor:
        """Logits of the pixels of tiles ``(N, C, k, k)`` given their contexts ``(N, d_model)``: ``(N, 256, C, k, k)``.

        Autoregressive head: pixel ``s`` of a tile sees the tile's pixels before ``s`` and the context;
        independent head: the context only (``tiles`` is then unused)."""
        N, k, C = context.shape[0], self.config.tile_size, self.config.in_channels
        cond = self.to_map(context).view(N, self.config.cond_channels, k, k)
        if self.config.head == "autoregressive":
            return self.head(tiles, cond=cond)
        return self.head(cond).view(N, C, NUM_LEVELS, k, k).transpose(1, 2)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != cfg.hw:
            raise ValueError(f"TilePixelCNN expects x of shape (B, {cfg.in_channels}, {cfg.hw[0]}, {cfg.hw[1]}), got {tuple(x.shape)}")
        B, T = x.shape[0], cfg.num_tiles
        ctx = self.tile_contexts(x, y)  # (B, T, d)
        logits = self.tile_logits(self.to_tiles(x).flatten(0, 1), ctx.flatten(0, 1))  # (B T, 256, C, k, k)
        return self.from_tiles(logits.view(B, T, *logits.shape[1:]))  # (B, 256, C, H, W)
