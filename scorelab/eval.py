"""Evaluation chosen by the family's capabilities and the dataset's domain.

``evaluate(run)`` compares what a run generates with a **held-out** reference set and says which:

* the reference is the dataset's test split, or, for data without one (``npz``, ``folder``), the
  seeded ``data.holdout`` share that :func:`scorelab.data.load_split` keeps out of training;
* images are compared in the features of a classifier of their own domain: the shipped
  Fashion-MNIST LeNet for ``fmnist`` data; for any other labelled image data a LeNet trained once
  on the run's own training split and cached (``~/.cache/scorelab/features``); for unlabelled
  images a LeNet with fixed random weights (random features still separate distributions, but the
  numbers are not comparable with trained-feature FIDs, and the output says so);
* points are compared by sliced Wasserstein-2 in data space.

A family adds numbers of its own through :meth:`scorelab.families.base.Family.evaluate` (a
classifier's accuracy over noise levels, a VAE's active units, an autoencoder's reconstructions),
given an :class:`EvalContext`. Every long phase (sampling, features, statistics) shows progress.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .data import load_split
from .quantize import to_model

__all__ = ["Reference", "Features", "EvalContext", "reference_set", "domain_features", "evaluate", "evaluate_nll"]


def _bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------------------
# The reference set and the features
# --------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Held-out raw examples: ``x`` uint8 images or float points, ``y`` labels or None."""

    x: Tensor
    y: Tensor | None
    description: str  # e.g. "the 1000 test images of fmnist-embedded"


def reference_set(cfg, n: int = 0) -> Reference:
    """The first ``n`` (0: all) examples of the held-out split of the run's data."""
    from .data import has_split
    from .train.trainer import dataset_tensors

    ds = load_split(cfg.data.name, "test", holdout=cfg.data.holdout, **cfg.data.options)
    x, y = dataset_tensors(ds)
    if n and n < len(x):
        x, y = x[:n], (y[:n] if y is not None else None)
    kind = "images" if x.ndim == 4 else "points"
    if has_split(cfg.data.name):
        where = f"test split of {cfg.data.name}"
    else:
        where = f"held-out {cfg.data.holdout:.0%} of {cfg.data.name} (seeded, never trained on)"
    return Reference(x, y, f"{len(x)} {kind} of the {where}")


@dataclass
class Features:
    """A feature extractor for FID-style metrics: ``module.features(x)`` on model-space images."""

    module: torch.nn.Module
    name: str  # what the features are, for the output


def _fingerprint(*tensors: Tensor, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def domain_features(cfg, data, progress: bool = True) -> Features | None:
    """The feature extractor for ``data`` (a :class:`~scorelab.families.base.DataSpec`), or None for points.

    Labelled image data other than Fashion-MNIST get a LeNet trained on the run's training split,
    once: it is cached under ``cache_dir("features")`` by a fingerprint of the data and reused.
    """
    from .machine import cache_dir
    from .metrics import _default_classifier
    from .nets.classifier import LeNet, LeNetConfig, fit_lenet
    from .train.trainer import dataset_tensors

    if not data.images:
        return None
    c, h, w = data.shape
    if data.domain == "fmnist" and data.shape == (1, 28, 28):
        clf = _default_classifier("fmnist")
        acc = clf.metadata.get("test_accuracy")
        return Features(clf, f"shipped Fashion-MNIST LeNet (penultimate layer; {acc:.1%} test accuracy)")
    if h != w or h < 8:
        return None
    train = load_split(cfg.data.name, "train", holdout=cfg.data.holdout, **cfg.data.options)
    x, y = dataset_tensors(train)
    lcfg = LeNetConfig(in_channels=c, image_size=h, n_classes=max(int(data.num_classes or 0), 1))
    if y is None or not data.num_classes:
        torch.manual_seed(0)
        return Features(LeNet(lcfg).eval().requires_grad_(False),
                        "a LeNet with fixed random weights (seed 0): the data has no labels to train one on, so "
                        "these FIDs compare runs on this data only, not with trained-feature numbers")
    fp = _fingerprint(x, y, extra=json.dumps(lcfg.__dict__, sort_keys=True))
    path = cache_dir("features") / f"lenet-{data.domain}-{fp}.safetensors"
    from safetensors.torch import load_file, save_file

    model = LeNet(lcfg)
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return Features(model.eval().requires_grad_(False), f"a LeNet trained on this data's training split "
                                                                   f"({len(x)} images; cached {path})")
        except Exception:  # noqa: BLE001 - a corrupt cache entry is retrained, never fatal
            pass
    print(f"eval: training a feature classifier on the {len(x)} training images (once; cached in {path.parent})",
          file=sys.stderr)
    model = fit_lenet(lcfg, to_model(x), y, epochs=4 if len(x) <= 20000 else 2, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
    except OSError as e:
        print(f"eval: could not cache the feature classifier ({e})", file=sys.stderr)
    return Features(model, f"a LeNet trained on this data's training split ({len(x)} images)")


# --------------------------------------------------------------------------------------
# What a family's evaluate() gets
# --------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """The evaluation's inputs for :meth:`Family.evaluate`: the reference set, features, seed, progress."""

    run: object  # the opened run (scorelab.runs.Run)
    ref: Reference
    seed: int = 0
    progress: bool = True
    _features: Features | None = None
    _loaded: bool = False
    _real_feats: Tensor | None = None
    notes: list = field(default_factory=list)

    def reference(self, labels: bool = False):
        """Raw held-out examples (and their labels with ``labels=True``)."""
        return (self.ref.x, self.ref.y) if labels else self.ref.x

    @property
    def features(self) -> Features | None:
        if not self._loaded:
            self._features = domain_features(self.run.cfg, self.run.data, self.progress)
            self._loaded = True
        return self._features

    def bar(self, total: int, desc: str, unit: str = "img"):
        return _bar(total, desc, self.progress, unit)

    def image_metrics(self, fake: Tensor) -> dict:
        """FID, KID, precision / recall of model-space images ``fake`` against the reference set, in
        the domain features (``{}`` with a note when the domain has none)."""
        from .metrics import DomainMetrics

        f = self.features
        if f is None:
            self.notes.append("no feature extractor for this image shape: FID/KID/precision/recall skipped")
            return {}
        dm = DomainMetrics(f.module)
        with self.bar(2, "features", unit="set") as bar:
            if self._real_feats is None:
                self._real_feats = dm.features(to_model(self.ref.x), "real_images")
            bar.update(1)
            fake_f = dm.features(fake, "fake_images")
            bar.update(1)
        t0 = time.perf_counter()
        with self.bar(1, "statistics (FID, KID, precision/recall)", unit="set") as bar:
            out = dm.evaluate_features(fake_f, self._real_feats)
            bar.update(1)
        out["statistics_seconds"] = round(time.perf_counter() - t0, 2)
        return out


def _sample_with_progress(run, n: int, seed: int, bar, options: dict, y: Tensor | None = None) -> Tensor:
    fam, bs = run.family, run.family.sample_batch_size(**options)
    parts = []
    for i in range(0, n, bs):
        k = min(bs, n - i)
        yi = None if y is None else y[i : i + k]
        parts.append(fam.sample(run.modules, k, seed=seed + i, y=yi, **options))  # seed + i: the same samples as one call
        bar.update(k)
    return torch.cat(parts)


def evaluate(run, *, n: int = 1000, n_real: int = 0, seed: int = 0, progress: bool = True, y: Tensor | None = None,
             **sample_options) -> dict:
    """Metrics of ``run`` against its held-out reference set, by what the family can do.

    Generative families: ``n`` samples (``sample_options`` as for ``Family.sample``) scored by
    FID / KID / precision / recall in the domain features (images) or sliced W2 (points). Every
    family adds :meth:`Family.evaluate`. The result names what was compared with what.
    """
    from .metrics import sliced_wasserstein

    fam = run.family
    caps = fam.capabilities()
    ref = reference_set(run.cfg, n_real)
    ctx = EvalContext(run, ref, seed=seed, progress=progress)
    result = {"run": str(run.path), "family": fam.name, "step": run.step, "compared_with": ref.description}
    if caps.generate:
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        t0 = time.perf_counter()
        with ctx.bar(n, "sampling") as bar:
            x = _sample_with_progress(run, n, seed, bar, sample_options, y)
        result.update({"n": n, **{k: v for k, v in sample_options.items() if isinstance(v, (int, float, str))},
                       "sampling_seconds": round(time.perf_counter() - t0, 3)})
        if not torch.isfinite(x).all():
            raise ValueError(f"the model generated non-finite values ({int((~torch.isfinite(x)).sum())} entries): "
                             "the weights are broken (diverged training?)")
        if fam.data.images:
            result.update(ctx.image_metrics(x))
            if ctx.features is not None:
                result["features"] = ctx.features.name
        else:
            real = ref.x.to(torch.float32)
            result["sliced_w2"] = float(sliced_wasserstein(x.flatten(1), real.flatten(1), generator=torch.Generator().manual_seed(0)))
            result["features"] = "data space (sliced Wasserstein-2 over 256 random directions)"
    result.update(fam.evaluate(run.modules, ctx))
    if ctx.notes:
        result["notes"] = ctx.notes
    return result


def evaluate_nll(run, *, methods=None, n: int = 256, n_slow: int = 16, seed: int = 0, batch_size: int = 64,
                 progress: bool = True, **options) -> dict:
    """Negative log-likelihood of the first ``n`` held-out examples by each method (default: all of
    the family's), with standard errors and the time each took. Slow methods (``nll_slow``, e.g. the
    probability-flow ODE: about a second per image on a 2-core CPU) run on the first ``n_slow``
    of them unless ``n_slow = 0`` (then on all ``n``)."""
    fam = run.family
    caps = fam.capabilities()
    caps.require("nll", fam.name, bool(caps.nll))
    methods = tuple(methods or caps.nll)
    for m in methods:
        if m not in caps.nll:
            raise ValueError(f"--nll-method {m!r} is not one of {fam.name}'s: {', '.join(caps.nll)}")
    fam.check_options("nll", options, caps.nll_options)
    ref = reference_set(run.cfg, n)
    x = ref.x
    y = ref.y if (ref.y is not None and fam.data.conditional_classes) else None
    result = {"run": str(run.path), "family": fam.name, "step": run.step, "n": len(x), "compared_with": ref.description}
    for m in methods:
        k = min(len(x), n_slow) if (m in caps.nll_slow and n_slow) else len(x)
        t0 = time.perf_counter()
        with _bar(k, f"nll {m}", progress) as bar:
            out = fam.nll(run.modules, x[:k], method=m, seed=seed, y=None if y is None else y[:k], batch_size=batch_size,
                          progress=bar.update, **options)
        dt = time.perf_counter() - t0
        tot = out.pop("total")
        units = out.pop("units")
        if not torch.isfinite(tot).all():
            raise ValueError(f"nll {m} is not finite for {int((~torch.isfinite(tot)).sum())} examples: the weights are broken")
        entry = {"units": units, "n": k, "mean": round(float(tot.mean()), 5),
                 "stderr": round(float(tot.std() / max(len(tot), 2) ** 0.5), 5) if len(tot) > 1 else None,
                 "exact": m in caps.nll_exact, "seconds": round(dt, 2)}
        entry.update({k: round(float(v.mean()), 5) for k, v in out.items()})
        result[m] = entry
    return result
