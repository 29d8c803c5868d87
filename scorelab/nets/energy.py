"""Energy-based model and plain score network for flat data ``x: (B, D)`` (seed 000 §2-3).

An energy model defines ``p_theta(x) = exp(-f_theta(x)) / Z_theta``; its score needs no ``Z``:

    s_theta(x) = grad_x log p_theta(x) = -grad_x f_theta(x)

computed by autograd in :func:`energy_score`. Score matching on ``s_theta`` then differentiates
twice (the trace of ``grad_x s_theta`` is ``-`` the Laplacian of ``f``), so the activations are
smooth (SiLU or softplus, never ReLU whose second derivative is zero almost everywhere).
:class:`ScoreNet` instead outputs the score directly, ``s_theta: R^D -> R^D`` with no time input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "EnergyNetConfig", "EnergyNet", "ScoreNet", "energy_score"]

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus}


@dataclass
class EnergyNetConfig:
    """Config of :class:`EnergyNet` and :class:`ScoreNet`."""

    dim: int = 2  # data dimension D of x: (B, D)
    width: int = 128  # hidden width of every layer
    depth: int = 3  # number of hidden layers
    activation: str = "silu"  # smooth nonlinearity: silu softplus

    def __post_init__(self):
        for name in ("dim", "width", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is unknown: expected one of {', '.join(ACTIVATIONS)}")


def _mlp(cfg: EnergyNetConfig, out_dim: int) -> nn.Sequential:
    """``D -> width -> ... -> width -> out_dim`` with ``depth`` hidden layers and smooth activations."""
    layers: list[nn.Module] = []
    d = cfg.dim
    for _ in range(cfg.depth):
        layers += [nn.Linear(d, cfg.width), ACTIVATIONS[cfg.activation]()]
        d = cfg.width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def _check_input(x: Tensor, dim: int, who: str) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{who} expects x of shape (B, {dim}), got {tuple(x.shape)}")


class EnergyNet(nn.Module):
    """``f_theta(x: (B, D)) -> (B,)`` scalar energy, ``p_theta(x) ∝ exp(-f_theta(x))``; an MLP.

    ``score(x)`` is ``-grad_x f_theta(x)``: (B, D) (see :func:`energy_score`).
    """

    def __init__(self, cfg: EnergyNetConfig | None = None, **overrides):
        super().__init__()
        self.cfg = cfg if cfg is not None else EnergyNetConfig(**overrides)
        self.net = _mlp(self.cfg, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.cfg.dim, "EnergyNet")
        return self.net(x).squeeze(-1)  # (B,)

    def score(self, x: Tensor, create_graph: bool | None = None) -> Tensor:
        return energy_score(self, x, create_graph)


class ScoreNet(nn.Module):
    """``s_theta(x: (B, D)) -> (B, D)``: a score model with no time input; an MLP."""

    def __init__(self, cfg: EnergyNetConfig | None = None, **overrides):
        super().__init__()
        self.cfg = cfg if cfg is not None else EnergyNetConfig(**overrides)
        self.net = _mlp(self.cfg, self.cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.cfg.dim, "ScoreNet")
        return self.net(x)  # (B, D)


def energy_score(energy, x: Tensor, create_graph: bool | None = None) -> Tensor:
    """``-grad_x energy(x)`` at ``x: (B, *shape)``: (B, *shape), for any ``energy: x -> (B,)``.

    ``create_graph``: keep the graph of the gradient so it can be differentiated again (to train
    through it, or to take the trace of its Jacobian in score matching). Default: whether
    gradients are enabled at the call. Under ``torch.no_grad()`` (sampling) the gradient is still
    computed and returned detached. If ``x`` already requires grad it is used as it is, so the
    result stays a function of ``x`` (score matching differentiates it with respect to ``x``).
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        f = energy(xg)
        if f.shape != (x.shape[0],):
            raise ValueError(f"energy must return shape ({x.shape[0]},), got {tuple(f.shape)}")
        (g,) = torch.autograd.grad(f.sum(), xg, create_graph=create_graph)
    return -g if create_graph else -g.detach()
