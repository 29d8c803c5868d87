"""Diffusion Transformer (DiT; Peebles & Xie 2023) for images ``x: (B, C, H, W)``.

Layout (``p = patch_size``, ``D = hidden``, ``N = (H/p)(W/p)`` tokens)::

    patchify   conv p x p, stride p: (B, C, H, W) -> (B, D, H/p, W/p) -> tokens (B, N, D) + pos
    blocks     depth x DiTBlock(tokens, c [, context])
    final      LN -> modulate(shift, scale from c) -> Linear(D, p^2 C) -> unpatchify -> (B, C, H, W)

Conditioning vector ``c = TimeEmbedding(t) (+ LabelEmbedding(y) with conditioning="adaln")``, (B, D).

adaLN-Zero block (Peebles & Xie, Sec. 3.2), with ``mod(u) = LN(u) (1 + scale) + shift`` and all
shifts, scales and gates produced per block by one ``Linear(SiLU(c))`` that starts at zero::

    x = x + gate_msa * SelfAttn(mod_msa(x))
    x = x + gate_ca  * CrossAttn(mod_ca(x), context, mask)     (conditioning="cross" only)
    x = x + gate_mlp * MLP(mod_mlp(x))

Zero gates make every block the identity at initialisation, and the zero final linear makes the
untrained net output exactly 0. Attention is ``F.scaled_dot_product_attention``.

Cross-attention (``conditioning="cross"``): the label reaches the net only through the context, a
sequence of embeddings the image tokens attend to; ``t`` still enters through adaLN. Built-in
context: the class NAME of ``y``, tokenised by :class:`ClassNameTokenizer` (words or characters
of the lower-cased ``class_names``; default names ``"class 0"``, ``"class 1"``, ...), embedded
with a learned token table + learned positions + ``text_layers`` small pre-LN transformer layers:
``(B, L, D)`` with a padding mask ``(B, L)`` (True = real token). The null label (``y =
num_classes`` or ``y=None``) maps to a single learned null token. Users with their own encoder
pass ``net(x, t, context=(B, L, context_dim), context_mask=(B, L) bool)`` instead of ``y``
(``context_dim`` defaults to ``hidden``; another width is projected by a learned linear).

Precision is the caller's (``train.precision``): the time frequencies and the returned output stay
in x's dtype under any autocast.

Speed on CPU (training steps, 28x28x1, batch 128, bf16, AdamW; measured on the shared 2-core
machine under load ~5.5, so only the ratios mean much): UNet default 1.19M params 27 img/s;
DiT patch 4 / hidden 128 / depth 4 (1.26M, the ``fmnist-dit`` preset) 34 img/s, with
``conditioning="cross"`` (1.92M) 31 img/s; patch 4 / hidden 192 / depth 6 (4.16M) 19 img/s;
patch 2 / hidden 128 / depth 4 (196 tokens) 19 img/s. bf16 was ~3x float32 for the preset size.
Those loaded-machine ratios did not hold on a quiet machine: in ``benchmarks/guidance.py`` (each
net alone, 4.5 minutes) the preset DiT made 669 training steps against the UNet's 1047, i.e.
0.64x its throughput.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, NetConfigBase, TimeEmbedding, _check, sinusoidal_embedding

__all__ = ["DiTConfig", "DiT", "DiTBlock", "ClassNameTokenizer", "sincos_pos_embedding_2d"]

CONDITIONINGS = ("adaln", "cross")
POS_EMBEDDINGS = ("sincos", "learned")
TOKEN_LEVELS = ("word", "char")


@dataclass
class DiTConfig(NetConfigBase):
    """Config of :class:`DiT` (time/label fields from :class:`NetConfigBase`)."""

    in_channels: int = 1  # image channels C of x: (B, C, H, W); the output has the same channels
    image_size: int = 0  # side of the square images (0: any H, W divisible by patch_size, inferred at forward)
    patch_size: int = 2  # p x p pixels -> one token
    hidden: int = 128  # token width D
    depth: int = 4  # number of transformer blocks
    heads: int = 4  # attention heads (hidden % heads == 0)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * hidden
    pos_embedding: str = "sincos"  # "sincos": fixed 2-D sin-cos (any size); "learned": a table started at sin-cos (needs image_size)
    freq_dim: int = 0  # sinusoidal / Fourier time features (0: hidden)
    conditioning: str = "adaln"  # "adaln": c = t_emb + y_emb; "cross": y via cross-attention to the class name's tokens
    class_names: tuple = ()  # name of each class for conditioning="cross" (empty: "class 0", "class 1", ...)
    token_level: str = "word"  # tokenise class names into lower-case "word"s or "char"acters
    max_tokens: int = 16  # longest class-name token sequence (longer names are truncated)
    text_layers: int = 1  # pre-LN transformer layers over the class-name tokens (0: embeddings only)
    context_dim: int = 0  # width of an explicit `context` passed to forward (0: hidden)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.class_names, list):
            self.class_names = tuple(self.class_names)
        for name in ("in_channels", "patch_size", "hidden", "depth", "heads", "max_tokens"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and v >= 1, "must be a positive integer")
        for name in ("image_size", "freq_dim", "text_layers", "context_dim"):
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and v >= 0, "must be a non-negative integer")
        _check(self, "hidden", self.hidden % self.heads == 0, f"must be divisible by heads={self.heads}")
        _check(self, "freq_dim", self.freq_dim % 2 == 0, "must be even")
        _check(self, "image_size", self.image_size % self.patch_size == 0, f"must be divisible by patch_size={self.patch_size}")
        _check(self, "mlp_ratio", self.mlp_ratio > 0 and round(self.mlp_ratio * self.hidden) >= 1, "must be positive")
        _check(self, "pos_embedding", self.pos_embedding in POS_EMBEDDINGS, f"must be one of {POS_EMBEDDINGS}")
        _check(self, "pos_embedding", self.pos_embedding != "learned" or self.image_size > 0,
               "'learned' needs image_size > 0 (the table has a fixed number of tokens)")
        _check(self, "conditioning", self.conditioning in CONDITIONINGS, f"must be one of {CONDITIONINGS}")
        _check(self, "token_level", self.token_level in TOKEN_LEVELS, f"must be one of {TOKEN_LEVELS}")
        _check(self, "class_names", all(isinstance(n, str) and n.strip() for n in self.class_names),
               "must be non-empty strings")
        _check(self, "class_names", not self.class_names or not self.num_classes or len(self.class_names) == self.num_classes,
               f"must hold num_classes={self.num_classes} names")

    @property
    def names(self) -> tuple[str, ...]:
        """Class names used by the tokenizer: ``class_names`` or ``"class k"`` (none if num_classes=0)."""
        if not self.num_classes:
            return ()
        return self.class_names or tuple(f"class {k}" for k in range(self.num_classes))


# --------------------------------------------------------------------------------------
# Class-name tokenizer
# --------------------------------------------------------------------------------------
class ClassNameTokenizer:
    """A tiny deterministic tokenizer whose vocabulary is the tokens of a fixed list of names.

    ``tokens(name)``: lower-cased words (runs of letters/digits; every other non-space character
    is its own token: ``"T-shirt/top" -> ["t", "-", "shirt", "/", "top"]``) or characters.
    Ids: 0 = padding, 1 = null (the unconditional label), 2 = unknown, 3.. = the sorted vocabulary.
    ``table`` (num_names + 1, L) and ``mask`` (num_names + 1, L) hold every name's ids and valid
    positions, ``L = min(max_tokens, longest name)``; row ``num_names`` is the null label: one null token.
    """

    PAD, NULL, UNK = 0, 1, 2
    SPECIALS = ("<pad>", "<null>", "<unk>")

    def __init__(self, names, level: str = "word", max_tokens: int = 16):
        if level not in TOKEN_LEVELS:
            raise ValueError(f"ClassNameTokenizer: level must be one of {TOKEN_LEVELS}, got {level!r}")
        self.level = level  # "word" or "char"
        self.max_tokens = max_tokens  # longer names are truncated
        self.names = tuple(names)  # one per class
        vocab = sorted({tok for n in self.names for tok in self.tokens(n)})
        self.itos = list(self.SPECIALS) + vocab  # id -> token
        self.stoi = {s: i for i, s in enumerate(self.itos)}  # token -> id
        ids = [self.encode(n) for n in self.names] + [[self.NULL]]
        L = max(len(r) for r in ids)
        self.table = torch.tensor([r + [self.PAD] * (L - len(r)) for r in ids], dtype=torch.long)  # (K+1, L)
        self.mask = self.table != self.PAD  # (K+1, L) True = real token

    def __len__(self) -> int:
        return len(self.itos)

    def tokens(self, name: str) -> list[str]:
        name = name.lower()
        if self.level == "char":
            return list(name)
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", name)

    def encode(self, name: str) -> list[int]:
        """Token ids of ``name`` (at most ``max_tokens``; unknown tokens -> UNK)."""
        return [self.stoi.get(s, self.UNK) for s in self.tokens(name)][: self.max_tokens]

    def decode(self, ids) -> list[str]:
        """Tokens of ``ids`` with padding dropped: ``decode(encode(n)) == tokens(n)[:max_tokens]``."""
        return [self.itos[int(i)] for i in ids if int(i) != self.PAD]


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
def sincos_pos_embedding_2d(h: int, w: int, dim: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos positions (MAE / DiT): ``[emb_dim/2(row), emb_dim/2(col)]`` -> (h w, dim), row-major."""
    rows = torch.arange(h, device=device).repeat_interleave(w).float()  # (h w,)
    cols = torch.arange(w, device=device).repeat(h).float()  # (h w,)
    d1 = dim // 2
    return torch.cat([sinusoidal_embedding(rows, d1), sinusoidal_embedding(cols, dim - d1)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x (1 + scale) + shift``; x: (B, N, D), shift/scale: (B, 1, D)."""
    return x * (1 + scale) + shift


def _ln(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    """Multi-head attention of ``x: (B, N, D)`` to ``kv: (B, L, D)`` (self-attention if kv is None) -> (B, N, D).

    ``mask: (B, L)`` bool, True = attend (every row needs at least one True).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads  # number of heads; head width = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        kv = x if kv is None else kv
        L, nh = kv.shape[1], self.heads
        q = self.q(x).view(B, N, nh, D // nh).transpose(1, 2)  # (B, nh, N, hd)
        k, v = self.kv(kv).view(B, L, 2, nh, D // nh).permute(2, 0, 3, 1, 4)  # (B, nh, L, hd) each
        m = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # (B, nh, N, hd)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Sequential):
    """Linear(D, m) -> GELU(tanh) -> Linear(m, D)."""

    def __init__(self, dim: int, ratio: float):
        m = round(dim * ratio)
        super().__init__(nn.Linear(dim, m), nn.GELU(approximate="tanh"), nn.Linear(m, dim))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x: (B, N, D), c: (B, D) [, context (B, L, D), mask (B, L)] -> (B, N, D)``.

    ``[shift, scale, gate] x {msa, (ca), mlp} = Linear(SiLU(c))``, zero at initialisation, so the
    block starts as the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool = False):
        super().__init__()
        self.cross = cross  # add a gated cross-attention sublayer to the context
        self.norm1, self.attn = _ln(dim), Attention(dim, heads)
        if cross:
            self.norm_ca, self.cross_attn = _ln(dim), Attention(dim, heads)
        self.norm2, self.mlp = _ln(dim), Mlp(dim, mlp_ratio)
        self.n_mod = 9 if cross else 6
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        mods = self.ada(c)[:, None].chunk(self.n_mod, dim=-1)  # n_mod x (B, 1, D)
        x = x + mods[2] * self.attn(_modulate(self.norm1(x), mods[0], mods[1]))
        if self.cross:
            if context is None:
                raise ValueError("DiTBlock(cross=True) needs a context")
            x = x + mods[8] * self.cross_attn(_modulate(self.norm_ca(x), mods[6], mods[7]), context, mask)
        return x + mods[5] * self.mlp(_modulate(self.norm2(x), mods[3], mods[4]))


class TextLayer(nn.Module):
    """Pre-LN transformer encoder layer over name tokens: ``x (B, L, D), mask (B, L)`` -> (B, L, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), None, mask)
        return x + self.mlp(self.norm2(x))


class ClassNameEncoder(nn.Module):
    """Labels -> context: every class name's tokens embedded once, then indexed by ``y``.

    ``forward(y: (B,)) -> (context (B, L, D), mask (B, L))``; ``y = num_classes`` is the null label
    (a single learned null token).
    """

    def __init__(self, names, dim: int, heads: int, mlp_ratio: float, level: str, max_tokens: int, layers: int):
        super().__init__()
        self.tokenizer = ClassNameTokenizer(names, level, max_tokens)
        self.register_buffer("ids", self.tokenizer.table, persistent=False)  # (K+1, L)
        self.register_buffer("mask", self.tokenizer.mask, persistent=False)  # (K+1, L)
        L = self.ids.shape[1]
        self.tok = nn.Embedding(len(self.tokenizer), dim)
        self.pos = nn.Parameter(torch.zeros(1, L, dim))
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(TextLayer(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def table(self) -> Tensor:
        """Context of every label 0..K: (K+1, L, D)."""
        h = self.tok(self.ids) + self.pos  # (K+1, L, D)
        for layer in self.layers:
            h = layer(h, self.mask)
        return self.norm(h)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.table()[y], self.mask[y]  # (B, L, D), (B, L)


class FinalLayer(nn.Module):
    """``Linear(LN(x) (1 + scale) + shift)`` with (shift, scale) from SiLU(c); both linears start at 0."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = _ln(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)
        for p in (*self.ada[1].parameters(), *self.linear.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(_modulate(self.norm(x), shift, scale))  # (B, N, out)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------
class DiT(nn.Module):
    """``net(x: (B, C, H, W), t: (B,), y: (B,) | None, context=None, context_mask=None) -> (B, C, H, W)``.

    ``y``: labels in ``0..num_classes`` (``num_classes`` = null; None = null for every example).
    ``context`` (conditioning="cross" only): explicit ``(B, L, context_dim)`` embeddings from the
    user's own encoder, with ``context_mask: (B, L)`` bool (True = real token; default all True);
    exclusive with ``y``. See the module docstring.
    """

    def __init__(self, cfg: DiTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else DiTConfig(**overrides)
        self.cfg = cfg
        D, p = cfg.hidden, cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels, D, p, stride=p)
        self.pos = None
        if cfg.pos_embedding == "learned":
            self.pos = nn.Parameter(sincos_pos_embedding_2d(cfg.image_size // p, cfg.image_size // p, D)[None].clone())  # (1, N, D)
        self.time_embed = TimeEmbedding(D, cfg.freq_dim or D, cfg.time_embedding, cfg.fourier_scale)
        cross = cfg.conditioning == "cross"
        self.label_embed = LabelEmbedding(cfg.num_classes, D) if cfg.num_classes and not cross else None
        self.names = None
        self.context_proj = None
        if cross:
            self.names = ClassNameEncoder(cfg.names, D, cfg.heads, cfg.mlp_ratio, cfg.token_level, cfg.max_tokens, cfg.text_layers)
            if cfg.context_dim and cfg.context_dim != D:
                self.context_proj = nn.Linear(cfg.context_dim, D)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio, cross) for _ in range(cfg.depth))
        self.final = FinalLayer(D, p * p * cfg.in_channels)
        self._init_weights()

    def _init_weights(self):
        # DiT: xavier-uniform linears (the patch conv as a linear), zero biases; adaLN and final linear stay 0
        for blk in [*self.blocks, *(self.names.layers if self.names is not None else [])]:
            for m in blk.modules():
                if isinstance(m, nn.Linear) and not (isinstance(blk, DiTBlock) and m is blk.ada[1]):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.bias)

    def _context(self, B: int, y, context, context_mask, device):
        if context is not None:
            if y is not None:
                raise ValueError("give either y or context, not both")
            want = self.cfg.context_dim or self.cfg.hidden
            if context.ndim != 3 or context.shape[0] != B or context.shape[2] != want:
                raise ValueError(f"context must have shape ({B}, L, {want}), got {tuple(context.shape)}")
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            if context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
                raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])}")
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("context_mask: every example needs at least one True (attended) position")
            ctx = self.context_proj(context) if self.context_proj is not None else context
            return ctx, context_mask
        null = self.cfg.num_classes
        if y is None:
            y = torch.full((B,), null, dtype=torch.long, device=device)
        if y.shape != (B,) or y.dtype.is_floating_point or (B and (int(y.min()) < 0 or int(y.max()) > null)):
            raise ValueError(f"y must be ({B},) integer labels in 0..{null} ({null} = null), got {tuple(y.shape)} {y.dtype}")
        return self.names(y.long())

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        B, C, H, W = x.shape
        p = cfg.patch_size
        if C != cfg.in_channels or H % p or W % p or (cfg.image_size and (H, W) != (cfg.image_size,) * 2):
            size = f"{cfg.image_size}, {cfg.image_size}" if cfg.image_size else "H, W"
            raise ValueError(f"DiT expects x: (B, {cfg.in_channels}, {size}) with sides divisible by patch_size={p}, got {tuple(x.shape)}")
        if t.numel() == 1:
            t = t.reshape(1).expand(B)
        c = self.time_embed(t)  # (B, D)
        ctx = mask = None
        if self.names is not None:
            ctx, mask = self._context(B, y, context, context_mask, x.device)  # (B, L, D), (B, L)
        elif context is not None:
            raise ValueError("context given but conditioning is 'adaln' (set conditioning='cross')")
        elif self.label_embed is not None:
            c = c + self.label_embed(y, B, x.device)
        elif y is not None:
            raise ValueError("y given but the net is unconditional (num_classes=0)")
        h, w = H // p, W // p
        tok = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, D), N = h w row-major
        pos = self.pos if self.pos is not None else sincos_pos_embedding_2d(h, w, cfg.hidden, x.device)[None]
        tok = tok + pos.to(tok.dtype)
        for blk in self.blocks:
            tok = blk(tok, c, ctx, mask)
        out = self.final(tok, c)  # (B, N, p p C)
        out = out.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return out.to(x.dtype).contiguous()  # (B, C, H, W)
