"""Pictures: image grids, 2-D scatter plots, loss curves and interpolation strips (PNG).

Matplotlib runs with the Agg backend (no screen needed); image grids are written with PIL. Every
file is written to a temporary name in its folder and renamed, so an interruption or a full disk
never leaves a half-written picture or array.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .quantize import to_uint8

__all__ = ["image_grid", "save_image_grid", "save_scatter", "plot_loss_curve", "save_samples", "atomic_save", "atomic_path"]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path`` (same suffix); rename it onto ``path`` on success.

    Any OSError (a full disk, a read-only folder) removes the temporary and is raised again with
    ``filename`` the final ``path``, so the message names the file the user asked for."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only folder...: one error naming the user's file, not the temporary
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images ``x: (N, C, H, W)`` in ``[-1, 1]`` into one uint8 array (H', W', C) or (H', W')."""
    x = x.detach().to("cpu", torch.float32)
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    u8 = to_uint8(x).numpy()
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = u8[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def save_image_grid(x: Tensor, path, nrow: int | None = None, scale: int = 2) -> Path:
    """Write ``x: (N, C, H, W)`` in ``[-1, 1]`` as a PNG grid, upscaled ``scale``x (nearest)."""
    from PIL import Image

    g = image_grid(x, nrow)
    img = Image.fromarray(g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp)
    return Path(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_scatter(x: Tensor, path, reference: Tensor | None = None, title: str = "") -> Path:
    """Scatter of 2-D points ``x: (N, 2)``, optionally over reference points (grey)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        r = reference.detach().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
    p = x.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


_BOOKKEEPING = ("step", "lr", "it_s", "ex_s", "elapsed")


def plot_loss_curve(metrics_jsonl, path, max_panels: int = 9) -> Path | None:
    """Every metric of a run's ``metrics.jsonl`` against step, one panel each (losses first, log
    scale when positive; bookkeeping such as lr and throughput left out). A single logged point is
    drawn as a marker, so even a short run has a picture."""
    p = Path(metrics_jsonl)
    if not p.is_file():
        return None
    series: dict[str, tuple[list, list]] = {}
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in r.items():
            if k in _BOOKKEEPING or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            series.setdefault(k, ([], []))
            series[k][0].append(r.get("step", 0))
            series[k][1].append(v)
    if not series:
        return None
    keys = sorted(series, key=lambda k: (not k.startswith("loss"), k.startswith("grad"), list(series).index(k)))[:max_panels]
    plt = _plt()
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        steps, vals = series[k]
        ax.plot(steps, vals, lw=1.2, marker="o" if len(vals) < 3 else None)
        if min(vals) > 0 and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)


def save_samples(x: Tensor, path, reference: Tensor | None = None, nrow: int | None = None, title: str = "") -> Path:
    """Images (N, C, H, W) as a grid, points (N, 2) as a scatter."""
    if x.ndim == 4:
        return save_image_grid(x, path, nrow)
    if x.ndim == 2 and x.shape[1] == 2:
        return save_scatter(x, path, reference, title)
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}")


def atomic_save(x: Tensor, path, labels: Tensor | None = None, nrow: int | None = None, title: str = "") -> Path:
    """Samples ``x`` as a ``.npz`` (``samples``, ``labels``) or a picture (:func:`save_samples`), atomically."""
    path = Path(path)
    if path.suffix == ".npz":
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, samples=x.numpy(), labels=(labels.numpy() if labels is not None else np.zeros(0)))
        return path
    return save_samples(x, path, nrow=nrow, title=title)
