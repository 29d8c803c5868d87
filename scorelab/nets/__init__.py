"""Networks only (no diffusion maths): every denoiser is ``net(x, t, y=None) -> same shape as x``.

``t: (B,)`` is in the path's own units; each net maps it to an order-one ``tau`` with its config's
``time_input`` / ``time_scale`` (see :mod:`scorelab.nets.embeddings` and :func:`time_options`).
``y: (B,)`` long labels in ``0..num_classes``; ``num_classes`` is the learned null label.
"""

from .embeddings import (
    GaussianFourierEmbedding,
    LabelEmbedding,
    NetConfigBase,
    SinusoidalEmbedding,
    TimeEmbedding,
    sinusoidal_embedding,
    time_options,
)
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

__all__ = [
    "GaussianFourierEmbedding",
    "LabelEmbedding",
    "NetConfigBase",
    "SinusoidalEmbedding",
    "TimeEmbedding",
    "sinusoidal_embedding",
    "time_options",
    "MLP",
    "MLPConfig",
    "UNet",
    "UNetConfig",
]
