"""Networks only (no diffusion maths): every denoiser is ``net(x, tau, y=None) -> same shape as x``.

``tau: (B,)`` is an order-one time input computed by the caller (``path.c_noise(t)``, applied by
:class:`~scorelab.targets.Denoiser`); nets know neither the path nor the precision.
``y: (B,)`` long labels in ``0..num_classes``; ``num_classes`` is the learned null label.
"""

from .embeddings import (
    GaussianFourierEmbedding,
    LabelEmbedding,
    NetConfigBase,
    SinusoidalEmbedding,
    TimeEmbedding,
    sinusoidal_embedding,
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
    "MLP",
    "MLPConfig",
    "UNet",
    "UNetConfig",
]
