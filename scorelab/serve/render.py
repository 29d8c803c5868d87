"""Samples as PNG bytes for the browser: image grids (:func:`scorelab.viz.image_grid`) and, for
points, a scatter rasterised with numpy (fast enough to redraw at every streamed sampler step).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["png", "samples_png", "scatter_array", "point_bounds", "grid_rows"]

SCATTER_SIZE = 384  # pixels of the square scatter plot


def png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def point_bounds(points: Tensor, margin: float = 0.1) -> tuple[float, float]:
    """A square range ``(lo, hi)`` holding the first two coordinates of ``points: (N, D)`` with a margin."""
    p = points.detach().to(torch.float64)[:, :2]
    p = p[torch.isfinite(p).all(1)]
    if not len(p):
        return -1.0, 1.0
    lo, hi = float(p.min()), float(p.max())
    pad = max(hi - lo, 1e-6) * margin
    return lo - pad, hi + pad


def scatter_array(points: Tensor, bounds: tuple[float, float], reference: Tensor | None = None,
                  size: int = SCATTER_SIZE) -> np.ndarray:
    """A white (size, size, 3) uint8 picture: ``reference`` points grey, ``points`` blue (first two
    coordinates; a 1-D point is drawn on the horizontal axis), axes through 0, the range and the
    number of points outside it written in the corner."""
    from PIL import Image, ImageDraw

    img = np.full((size, size, 3), 255, dtype=np.uint8)
    lo, hi = bounds
    scale = (size - 1) / (hi - lo)

    def pix(p: Tensor) -> tuple[np.ndarray, np.ndarray]:
        q = p.detach().to(torch.float64).cpu()
        if q.ndim == 1:
            q = q[:, None]
        if q.shape[1] == 1:
            q = torch.cat([q, torch.zeros_like(q)], 1)
        q = q[:, :2].numpy()
        q = q[np.isfinite(q).all(1)]
        cx = np.round((q[:, 0] - lo) * scale).astype(np.int64)
        cy = np.round((hi - q[:, 1]) * scale).astype(np.int64)
        keep = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
        return cx[keep], cy[keep], int((~keep).sum())

    zero = round((0 - lo) * scale), round(hi * scale)
    if 0 <= zero[0] < size:
        img[:, zero[0]] = (225, 225, 225)
    if 0 <= zero[1] < size:
        img[zero[1], :] = (225, 225, 225)

    def dots(p: Tensor, colour, radius: int) -> int:
        cx, cy, outside = pix(p)
        for dx in range(-radius, radius + 1):
            for dy in range(-radius, radius + 1):
                x, y = np.clip(cx + dx, 0, size - 1), np.clip(cy + dy, 0, size - 1)
                img[y, x] = colour
        return outside

    if reference is not None:
        dots(reference, (200, 200, 200), 1)
    outside = dots(points, (31, 119, 180), 1)
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, size - 1, size - 1], outline=(160, 160, 160))
    note = f"[{lo:.3g}, {hi:.3g}]^2" + (f"; {outside} of {len(points)} outside" if outside else "")
    d.text((4, size - 14), note, fill=(90, 90, 90))
    return np.asarray(im)


def samples_png(x: Tensor, *, nrow: int | None = None, scale: int = 1, bounds: tuple[float, float] | None = None,
                reference: Tensor | None = None) -> bytes:
    """PNG of samples in model space: images ``(N, C, H, W)`` in [-1, 1] as a grid (``nrow`` per row,
    upscaled ``scale``x, nearest), points ``(N, D)`` as a scatter over ``bounds`` (default: their own)."""
    from ..viz import image_grid

    x = x.detach().float().cpu()
    if x.ndim == 4:
        g = image_grid(x.clamp(-1, 1), nrow)
        if scale > 1:
            g = np.repeat(np.repeat(g, scale, axis=0), scale, axis=1)
        return png(g)
    if x.ndim in (1, 2):
        return png(scatter_array(x, bounds or point_bounds(x), reference))
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}")


def grid_rows(n: int, classes: int) -> int | None:
    """Images per row: one row per requested class when several are given, else a square grid."""
    if classes > 1:
        return math.ceil(n / classes)
    return None
