"""What a request may ask for, checked before any work starts.

Every sampling option the page shows comes from the run's family: only the names in
``Family.capabilities().sample_options`` appear (a GAN shows ``truncation`` and no sampler, an
energy model ``step_size`` and ``init_std``), each described by :data:`OPTION_SPECS` (kind,
bounds, help) with its default from the run's config. A request body is a JSON object; a field
the endpoint does not know, an option the family does not take, a value of the wrong type or out
of range, and sizes beyond :class:`Limits` are refused with a 400 and one line naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .store import ApiError

__all__ = ["Limits", "OPTION_SPECS", "option_specs", "SampleRequest", "parse_sample", "parse_interpolate", "parse_traverse",
           "api_words"]


@dataclass(frozen=True)
class Limits:
    """Request sizes the server accepts (set by ``scorelab serve --max-n / --max-steps``)."""

    n_images: int = 64  # samples per request for image runs
    n_points: int = 4096  # samples per request for point (toy) runs
    steps: int = 1000  # sampler steps per request
    strip: int = 16  # images per interpolation / traversal row
    dims: int = 16  # traversal rows
    scale: int = 8  # upscaling of image grids
    body: int = 64 * 1024  # bytes of a request body

    def max_n(self, images: bool) -> int:
        return self.n_images if images else self.n_points


# kind: choice | int | float | run. lo / hi: closed bounds (lo_open: lo excluded). default: the
# config field holding the run's default (None: off unless given).
OPTION_SPECS: dict[str, dict] = {
    "sampler": dict(kind="choice", label="sampler", default="sampler",
                    help="how the reverse process is integrated (ODE solvers, stochastic samplers)"),
    "steps": dict(kind="int", label="steps", lo=1, default="sampling_steps",
                  help="sampler steps (network evaluations grow with it)"),
    "grid": dict(kind="choice", label="time grid", default="grid", help="where the steps are placed in time / noise level"),
    "cfg": dict(kind="float", label="guidance weight w", lo=0.0, hi=50.0, default=None,
                help="classifier-free guidance: (1 + w) out_y - w out_null; needs a class"),
    "classifier": dict(kind="run", label="guiding classifier", default=None,
                       help="a noisy_classifier run on the same path (classifier guidance); needs a class"),
    "classifier_scale": dict(kind="float", label="classifier scale", lo=0.0, hi=100.0, default=None,
                             help="classifier guidance scale gamma (default 1)"),
    "step_size": dict(kind="float", label="Langevin step size", lo=0.0, lo_open=True, hi=10.0, default="step_size",
                      help="x <- x + eps/2 s(x) + sqrt(eps) z"),
    "init_std": dict(kind="float", label="start std", lo=0.0, lo_open=True, hi=100.0, default="init_std",
                     help="Langevin chains start from N(0, std^2 I)"),
    "temperature": dict(kind="float", label="temperature", lo=0.0, lo_open=True, hi=10.0, default="temperature",
                        help="sampling temperature"),
    "truncation": dict(kind="float", label="truncation psi", lo=0.0, hi=1.0, default="truncation",
                       help="pull latents toward the mean (1: none)"),
}
_COMMON = ("run", "n", "seed", "class", "scale")
SEED_MAX = 2**62  # seeds are int64 generator seeds; seed + n must stay below 2^63


def api_words(message: str) -> str:
    """A library message in the API's words: command-line flags ``--classifier-scale`` become field
    names ``'classifier_scale'``."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: "'" + m.group(1).replace("-", "_") + "'", message)


def _choices(name: str, run) -> list[str]:
    fam = run.family
    if name == "grid":
        from ..paths import GRIDS

        return list(GRIDS)
    if name == "sampler":
        if fam.capabilities().denoiser:
            from ..samplers import SAMPLERS

            return list(SAMPLERS)
        own = getattr(fam.cfg, "sampler", None)
        return [own] if own else []
    return []


def _default(name: str, run):
    field = OPTION_SPECS[name]["default"]
    if field is None:
        return None
    value = getattr(run.family.cfg, field, None)
    if value is None and name == "temperature":
        return 1.0
    return value


def page_options(run) -> list[str]:
    """The run's sample options the page and the API offer (declared by its family, in its order)."""
    caps = run.family.capabilities()
    return [o for o in caps.sample_options if o in OPTION_SPECS] if caps.generate else []


def option_specs(run, limits: Limits, classifiers: list[str]) -> list[dict]:
    """What the page draws for each option of the run: name, kind, label, help, default, bounds, choices."""
    out = []
    for name in page_options(run):
        spec = OPTION_SPECS[name]
        d = {"name": name, "kind": spec["kind"], "label": spec["label"], "help": spec["help"], "default": _default(name, run)}
        if spec["kind"] in ("int", "float"):
            d["min"] = spec.get("lo")
            d["max"] = limits.steps if name == "steps" else spec.get("hi")
            d["min_exclusive"] = bool(spec.get("lo_open"))
        if spec["kind"] == "choice":
            d["choices"] = _choices(name, run)
        if spec["kind"] == "run":
            d["choices"] = classifiers
        out.append(d)
    return out


# --------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------
def _int(body: dict, key: str, lo: int, hi: int, default=None, where: str = "", hint: str = ""):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}{where}, got {v}{hint}")
    return v


def _float(body: dict, key: str, lo: float | None, hi: float | None, lo_open: bool = False, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ApiError(400, f"'{key}' must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ApiError(400, f"'{key}' must be a finite number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ApiError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise ApiError(400, f"'{key}' must be <= {hi:g}, got {v:g}")
    return v


def _str(body: dict, key: str, choices=None):
    v = body.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ApiError(400, f"'{key}' must be a string, got {v!r}")
    if choices is not None and v not in choices:
        raise ApiError(400, f"'{key}' must be one of: {', '.join(choices)} (got {v!r})")
    return v


def check_fields(body, allowed) -> dict:
    """``body`` as a dict with only ``allowed`` keys (400 naming the first unknown one)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = tuple(allowed)
    for k in body:
        if k not in allowed:
            raise ApiError(400, f"unknown field {k!r} (this endpoint takes: {', '.join(allowed)})")
    return body


def _labels(body: dict, run, n: int, classifier=None):
    """(n,) labels, one block of rows per requested class (index or name), or None; and the class count."""
    from ..cli.common import UsageError
    from ..cli.sample import labels_for

    v = body.get("class")
    if v is None or v == "" or v == []:
        return None, 0
    values = v if isinstance(v, list) else [v]
    if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in values):
        raise ApiError(400, f"'class' must be a class index, a class name or a list of them, got {v!r}")
    if len(values) > n:
        raise ApiError(400, f"'class' lists {len(values)} classes for n = {n} samples: ask for at least one sample per class")
    try:
        y, classes = labels_for([str(c) for c in values], run, n, {"classifier": classifier} if classifier else {})
    except UsageError as e:
        raise ApiError(400, api_words(str(e))) from None
    return y, len(classes)


# --------------------------------------------------------------------------------------
# The three requests
# --------------------------------------------------------------------------------------
@dataclass
class SampleRequest:
    n: int
    seed: int
    y: object  # (n,) labels or None
    n_classes: int  # classes requested (rows of the grid when > 1)
    options: dict  # family sample options (a classifier already opened)
    scale: int
    steps: int | None  # the steps that will run (for progress), when the family has them


_LIMIT = " (the server's limit: start it with {} to change it)"


def parse_sample(body, run, store, limits: Limits) -> SampleRequest:
    """Check a ``POST /api/sample`` body against the run's family and the limits."""
    offered = page_options(run)
    check_fields(body, _COMMON + tuple(OPTION_SPECS))
    fam, caps = run.family, run.family.capabilities()
    if not caps.generate:
        raise ApiError(400, f"{fam.name} runs cannot sample")
    given = {k: body[k] for k in OPTION_SPECS if body.get(k) is not None and body.get(k) != ""}
    for k in given:
        if k not in offered:
            takes = ", ".join(offered) or "no options"
            raise ApiError(400, f"'{k}' does not apply to {fam.name} runs (they take: {takes})")
    images = fam.data.images
    n = _int(body, "n", 1, limits.max_n(images), 16 if images else 1000, f" for {'image' if images else 'point'} runs",
             _LIMIT.format("--max-n"))
    seed = _int(body, "seed", 0, SEED_MAX, 0)
    scale = _int(body, "scale", 1, limits.scale, 2)
    opts: dict = {}
    for k in given:
        spec = OPTION_SPECS[k]
        if spec["kind"] == "int":
            hi = limits.steps if k == "steps" else spec.get("hi", 10**9)
            opts[k] = _int(body, k, spec["lo"], hi, hint=_LIMIT.format("--max-steps") if k == "steps" else "")
        elif spec["kind"] == "float":
            opts[k] = _float(body, k, spec.get("lo"), spec.get("hi"), bool(spec.get("lo_open")))
        elif spec["kind"] == "choice":
            opts[k] = _str(body, k, _choices(k, run))
        elif spec["kind"] == "run":
            name = _str(body, k)
            clf = store.open(name)
            if not clf.family.capabilities().classify:
                raise ApiError(400, f"'classifier' {name!r} is a {clf.family.name} run, not a classifier run")
            opts[k] = clf
    if "classifier_scale" in opts and "classifier" not in opts:
        raise ApiError(400, "'classifier_scale' needs a 'classifier' run")
    y, n_classes = _labels(body, run, n, opts.get("classifier"))
    if ("cfg" in opts or "classifier" in opts) and y is None:
        raise ApiError(400, "guidance ('cfg' or 'classifier') needs the class to steer toward: give 'class'")
    steps = opts.get("steps", getattr(fam.cfg, "sampling_steps", None))
    return SampleRequest(n, seed, y, n_classes, opts, scale, steps if "steps" in offered else None)


def parse_interpolate(body, run, limits: Limits) -> dict:
    """Check a ``POST /api/interpolate`` body: ``seeds [a, b]``, ``n``, ``mode``, ``space``, the
    deterministic sampler's ``sampler`` / ``steps`` / ``grid`` (diffusion runs), ``class``."""
    from ..interpolation import MODES

    check_fields(body, ("run", "seeds", "n", "mode", "space", "sampler", "steps", "grid", "class", "scale"))
    fam, caps = run.family, run.family.capabilities()
    if not caps.interpolate:
        raise ApiError(400, f"{fam.name} runs cannot interpolate")
    seeds = body.get("seeds", [0, 1])
    if (not isinstance(seeds, list) or len(seeds) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds)):
        raise ApiError(400, f"'seeds' must be two integers in [0, 2^62], got {seeds!r}")
    n = _int(body, "n", 2, limits.strip, 9)
    mode = _str(body, "mode", (*MODES, "both")) or "both"
    space = _str(body, "space", caps.interpolate) or caps.interpolate[0]
    opts = {}
    for k in ("sampler", "steps", "grid"):
        if body.get(k) is not None and body.get(k) != "":
            if not caps.denoiser:
                raise ApiError(400, f"'{k}' does not apply to interpolating {fam.name} runs")
            opts[k] = (_int(body, k, 1, limits.steps) if k == "steps" else _str(body, k, _choices(k, run)))
    y, _ = _labels({"class": body.get("class")}, run, 1)
    return dict(seeds=seeds, n=n, modes=MODES if mode == "both" else (mode,), space=space, options=opts, y=y,
                scale=_int(body, "scale", 1, limits.scale, 2))


def parse_traverse(body, run, limits: Limits) -> dict:
    """Check a ``POST /api/traverse`` body: ``dims`` (rows), ``range``, ``n`` per row, ``index`` of
    the held-out example whose posterior mean fixes the other latents."""
    check_fields(body, ("run", "dims", "range", "n", "index", "scale"))
    fam, caps = run.family, run.family.capabilities()
    if not caps.traverse:
        raise ApiError(400, f"{fam.name} runs cannot draw latent traversals")
    dims = body.get("dims", list(range(8)))
    if (not isinstance(dims, list) or not 1 <= len(dims) <= limits.dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 4096 for d in dims)):
        raise ApiError(400, f"'dims' must be a list of 1 to {limits.dims} latent indices, got {dims!r}")
    return dict(dims=dims, span=_float(body, "range", 0.0, 20.0, lo_open=True, default=3.0),
                n=_int(body, "n", 2, limits.strip, 9), index=_int(body, "index", 0, 9999, 0),
                scale=_int(body, "scale", 1, limits.scale, 2))
