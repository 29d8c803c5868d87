"""Distilled students: progressive distillation, consistency distillation, consistency training.

Three families on the maths of :mod:`scorelab.distill` (seed 001, "Diffusion Distillation"):

* ``progressive`` (Salimans & Ho 2022): ``model.teacher`` names a trained ``diffusion`` or ``vdm``
  run (opened through :func:`scorelab.runs.build_family`, frozen). The student starts as a copy of
  the teacher's network, with the teacher's path, prediction kind and preconditioning. Round ``r``
  trains a student of ``start_steps / 2^(r+1)`` DDIM steps on two DDIM steps of its teacher (round
  1: the teacher run; later rounds: the previous round's student), down to ``final_steps``.
  **Schedule over trainer steps**: round ``r`` runs for trainer steps ``[r R, (r + 1) R)`` with
  ``R = round_steps`` (0: ``train.steps`` split evenly); the last round runs on to ``train.steps``.
  Each round's student is its own module (``net_8``, ``net_4``, ...): all are in the one optimizer
  (only the current one gets gradients, so each round starts with fresh Adam moments) and all are
  EMA-averaged by the trainer; the students of the rounds still to come are kept equal to the
  current one after every step, so each student's EMA follows the same trajectory as one network
  trained through the rounds would, and freezes when its round ends. ``sample --steps k`` uses the
  ``k``-step student (one per round; more steps than the first round's are refused).
* ``consistency`` (Song et al. 2023, CD): the student (again a copy of the teacher) is a consistency
  function (:class:`~scorelab.distill.ConsistencyFunction`: skip scalings with
  ``f(x, t_eps) = x`` exactly) trained against an EMA target network (module ``target``, not
  optimised, updated in :meth:`training_step` as ``mu target + (1 - mu) net``, checkpointed) with
  one teacher ODE step (Heun or DDIM) between adjacent times of an ``N``-point grid.
* ``consistency_training`` (Song & Dhariwal 2023, iCT): no teacher; a network of its own on a path
  of its own (default ``edm``), ``N`` doubling over training, log-normal interval sampling,
  ``1 / (s_{n+1} - s_n)`` weights, pseudo-Huber, and no EMA on the target.

Guidance baked in: with ``guidance: w`` a class-conditional teacher trained with label dropout is
distilled under classifier-free guidance ``(1 + w) D_y - w D_null`` at that fixed ``w``; the student
takes the class label only, so one student pass replaces the teacher's two (``scorelab sample
STUDENT --class 3 --cfg 2 --steps 2`` costs 2 network passes, not 4). Rows whose label is dropped
(``label_dropout``) learn the teacher's unconditional model (guidance leaves the null label as it is).

Bad requests are one line each (exit 2 from the CLI): a teacher of another data shape (checked by
the run API), a teacher predicting ``eps`` / ``score`` (a few-step student needs an x0, v or
velocity network: Salimans & Ho 2022, §4), ``guidance`` with an unconditional teacher, ``--cfg`` on
a student distilled without guidance (or at another weight), ``--steps`` beyond what it was
distilled for.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..distill import (
    CM_WEIGHTINGS,
    DISTANCES,
    NESTED_GRIDS,
    PD_WEIGHTINGS,
    SOLVERS,
    ConsistencyFunction,
    boundary,
    consistency_grid,
    consistency_loss,
    consistency_sample,
    ict_discretization,
    ict_index_probabilities,
    multistep_indices,
    nested_grid,
    nested_times,
    noise_level,
    pd_loss,
)
from ..random import rand, randn
from ..targets import Denoiser
from ..train.config import ConfigError
from .base import Capabilities, CapabilityError, Family, register

__all__ = ["StudentNet", "ProgressiveConfig", "ProgressiveFamily", "ConsistencyConfig", "ConsistencyFamily",
           "ConsistencyTrainingConfig", "ConsistencyTrainingFamily", "TEACHER_FAMILIES"]

TEACHER_FAMILIES = ("diffusion", "vdm")  # families with a denoiser a student can be distilled from
FEW_STEP_KINDS = ("x0", "v", "velocity")  # network outputs that stay well conditioned at one step


class StudentNet(nn.Module):
    """A student network and the record of its distillation, both checkpointed (and EMA-copied: the
    buffers are integers, which the trainer's EMA copies exactly).

    ``steps``: the sampling steps it was distilled for (progressive) or the size ``N`` of its
    consistency grid. ``trained``: the optimisation steps it received.
    """

    def __init__(self, net: nn.Module, steps: int):
        super().__init__()
        self.net = net  # the network F
        self.register_buffer("steps", torch.tensor(int(steps), dtype=torch.long))
        self.register_buffer("trained", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.net(x, t, **cond)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _positive_int(cfg, name: str, lo: int = 1) -> None:
    v = getattr(cfg, name)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"model.{name} must be an integer >= {lo}, got {v!r}")


def _check_common(cfg) -> None:
    """Fields shared by the three configs: guidance, label_dropout, monitor."""
    g = getattr(cfg, "guidance", 0.0)
    _check(math.isfinite(g) and g >= 0, f"model.guidance must be a number >= 0 (the CFG weight w; 0: none), got {g}")
    _check(0 <= cfg.label_dropout < 1, f"model.label_dropout must be in [0, 1), got {cfg.label_dropout}")
    for name in ("monitor_every", "monitor_samples"):
        if hasattr(cfg, name):
            _positive_int(cfg, name, lo=0)


def _cond(family: Family, batch: dict, ctx, dropout: float) -> dict:
    """``{"y": labels}`` of a conditional student (``{}`` otherwise); with ``ctx`` each label becomes
    the null label with probability ``dropout`` (from the run's noise stream)."""
    k = family.data.conditional_classes
    if not k:
        return {}
    y = batch["y"].clone()
    if ctx is not None and dropout > 0:
        drop = rand(y.shape, generator=ctx.generator, device=y.device) < dropout  # (B,): one draw per example
        y[drop] = k
    return {"y": y}


class _Student(Family):
    """What the three families share: labels, guidance checks, the monitor, capabilities."""

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.declared, conditional=bool(self.data.conditional_classes))

    def _sample_cond(self, y: Tensor | None, n: int, device) -> dict:
        if not self.data.conditional_classes:
            return {}
        return {"y": (y if y is not None else self.null_labels(n)).to(device)}

    def _check_cfg(self, cfg, y) -> None:
        """``--cfg W``: only the weight distilled into the student (``model.guidance``), with labels."""
        if cfg is None:
            return
        w = float(getattr(self.cfg, "guidance", 0.0))
        if not self.data.conditional_classes:
            raise CapabilityError(f"--cfg needs a class-conditional model: this {self.name} student (and its teacher) "
                                  "is unconditional")
        if w == 0:
            raise CapabilityError(f"--cfg: this {self.name} student was distilled without guidance (model.guidance 0); "
                                  "distil one at a weight with --model.guidance W")
        if abs(float(cfg) - w) > 1e-9:
            raise CapabilityError(f"--cfg {cfg:g}: this student has guidance w = {w:g} distilled into it and samples "
                                  f"at that weight only (omit --cfg or pass --cfg {w:g})")
        if y is None:
            raise CapabilityError("guidance needs the class(es) to steer toward: add --class K")

    # --- teacher ------------------------------------------------------------------------
    def _check_teacher(self) -> None:
        t = self.refs["teacher"]
        tf = t.family
        kind = tf.cfg.prediction
        precond = tf.preconditioning()[0]
        _check(kind in FEW_STEP_KINDS or precond == "edm",
               f"model.teacher: {t.path} predicts {kind}: a few-step student starts as a copy of its teacher and needs "
               f"an {', '.join(FEW_STEP_KINDS)} network (from eps the x0 estimate amplifies errors by sigma/alpha at "
               "the first step; Salimans & Ho 2022, §4): train the teacher with model.prediction v (or velocity)")
        k_t, k_s = t.data.conditional_classes, self.data.conditional_classes
        w = float(self.cfg.guidance)
        if w > 0:
            _check(k_t > 0, f"model.guidance {w:g}: the teacher {t.path} is unconditional; classifier-free guidance needs a "
                            "class-conditional teacher trained with label dropout")
            _check(float(getattr(tf.cfg, "label_dropout", 0.0)) > 0,
                   f"model.guidance {w:g}: the teacher {t.path} was trained without label dropout, so it has no "
                   "unconditional branch to guide with")
        _check(k_t == k_s, f"model.teacher: {t.path} is {'conditioned on ' + str(k_t) + ' classes' if k_t else 'unconditional'}"
                           f" but this run's data is {'conditioned on ' + str(k_s) + ' classes' if k_s else 'not'}: "
                           f"set data.class_conditional: {'true' if k_t else 'false'} (the student is a copy of its net)")

    def _teacher_parts(self) -> None:
        t = self.refs["teacher"]
        tf = t.family
        self.path = tf.path_of(t.modules)  # the teacher's forward process (VDM: its learned schedule, frozen)
        self.kind = tf.cfg.prediction  # the student outputs what the teacher does (it starts as a copy)
        self.precond, self.sigma_data = tf.preconditioning()

    def _teacher_denoiser(self):
        """The teacher run's denoiser in float32 (the targets are differences of its outputs), guided at
        ``model.guidance`` when set (labels arrive through ``cond``)."""
        t = self.refs["teacher"]
        den = t.family.denoiser(t.modules, net_dtype=torch.float32, autocast=None)
        w = float(self.cfg.guidance)
        if w > 0:
            from ..guidance import ClassifierFreeGuidance

            den = ClassifierFreeGuidance(den, w, form="w")
        return den

    def _copy_teacher_net(self, steps: int) -> StudentNet:
        net = copy.deepcopy(self.refs["teacher"].modules["net"]).requires_grad_(True).train()
        return StudentNet(net, steps)

    def frozen(self) -> dict[str, nn.Module]:
        if "teacher" not in self.refs:
            return {}
        return {f"teacher_{k}": m for k, m in self.refs["teacher"].modules.items()}

    # --- monitor ------------------------------------------------------------------------
    def monitor_every(self) -> int:
        return int(getattr(self.cfg, "monitor_every", 0) or 0)

    @torch.no_grad()
    def monitor(self, modules, ctx) -> dict:
        """``fid`` (28x28 Fashion-MNIST, shipped LeNet features) or ``sliced_w2`` (points) of
        ``monitor_samples`` one-step samples of seeds ``ctx.seed ..`` against the training examples
        ``ctx.x``. Few samples bias FID upwards: compare it along a run, not with eval's."""
        n = self.cfg.monitor_samples
        fake = self.sample(modules, n, seed=ctx.seed, steps=1)
        if self.data.images:
            if not (self.data.domain == "fmnist" and self.data.shape == (1, 28, 28)):
                return {}
            from ..metrics import DomainMetrics, _default_classifier, fid_from_features
            from ..quantize import to_model

            dm = DomainMetrics(_default_classifier("fmnist"))
            cache = self.__dict__.setdefault("_monitor_real", {})
            if "f" not in cache:
                cache["f"] = dm.features(to_model(ctx.x), "real_images")
            return {"fid_1step": fid_from_features(cache["f"], dm.features(fake, "fake_images"))}
        from ..metrics import sliced_wasserstein

        real = ctx.x.to(torch.float32)
        return {"sliced_w2_1step": float(sliced_wasserstein(fake.flatten(1), real.flatten(1),
                                                             generator=torch.Generator().manual_seed(0)))}


# --------------------------------------------------------------------------------------
# Progressive distillation
# --------------------------------------------------------------------------------------
@dataclass
class ProgressiveConfig:
    family: str = "progressive"  # registry name of this family
    teacher: str = ""  # run folder of the teacher (a diffusion or vdm run), e.g. --model.teacher runs/fmnist-rf
    start_steps: int = 16  # DDIM steps of the teacher in round 1 (its student takes half)
    final_steps: int = 1  # steps of the last round's student (start_steps / final_steps: a power of two >= 2)
    round_steps: int = 0  # trainer steps per round (0: train.steps split evenly: set it when resuming with more steps); the last round runs to train.steps
    grid: str = "uniform"  # nested time grid t(i/N) of every round: uniform logsnr karras (scorelab.distill.nested_times)
    grid_options: dict = field(default_factory=dict)  # {rho: 7} for karras
    weighting: str = "truncated_snr"  # x-loss weight: truncated_snr max(SNR, 1) | snr_plus_one 1 + SNR (Salimans & Ho 2022, §4)
    guidance: float = 0.0  # CFG weight w distilled into the student (needs a class-conditional teacher with label dropout; 0: none)
    label_dropout: float = 0.1  # share of rows given the null label (conditional teachers): the student also learns the unconditional model

    def __post_init__(self):
        _check(isinstance(self.teacher, str), "model.teacher must be a run folder")
        _positive_int(self, "start_steps", 2)
        _positive_int(self, "final_steps", 1)
        _positive_int(self, "round_steps", 0)
        ratio = self.start_steps / self.final_steps
        _check(self.start_steps % self.final_steps == 0 and ratio >= 2 and float(ratio).is_integer()
               and (int(ratio) & (int(ratio) - 1)) == 0,
               f"model.start_steps / model.final_steps must be a power of two >= 2 (each round halves the steps), "
               f"got {self.start_steps} / {self.final_steps}")
        _check(self.grid in NESTED_GRIDS, f"model.grid {self.grid!r} is unknown: expected one of {', '.join(NESTED_GRIDS)}")
        _check(isinstance(self.grid_options, dict) and set(self.grid_options) <= {"rho"},
               f"model.grid_options takes only rho (the karras grid's exponent), got {self.grid_options!r}")
        _check(self.weighting in PD_WEIGHTINGS, f"model.weighting {self.weighting!r} is unknown: expected one of {', '.join(PD_WEIGHTINGS)}")
        _check_common(self)

    @property
    def member_steps(self) -> list[int]:
        """Steps of each round's student: start/2, start/4, ..., final."""
        out, k = [], self.start_steps // 2
        while k >= self.final_steps:
            out.append(k)
            k //= 2
        return out


def _member(k: int) -> str:
    return f"net_{k}"


@register
class ProgressiveFamily(_Student):
    """Progressive distillation of a diffusion / vdm teacher (see the module docstring)."""

    name = "progressive"
    Config = ProgressiveConfig
    references = {"teacher": TEACHER_FAMILIES}
    declared = Capabilities(generate=True, sample_options=("steps", "cfg", "callback"))

    def build(self) -> None:
        self._check_teacher()
        self._teacher_parts()
        self.steps_list = self.cfg.member_steps
        self.students = {_member(k): self._copy_teacher_net(k) for k in self.steps_list}
        self.rho = float(self.cfg.grid_options.get("rho", 7.0))
        self._round_steps = self.cfg.round_steps

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.students)

    def optimizers(self, train):
        rounds = len(self.steps_list)
        self._round_steps = self.cfg.round_steps or max(1, train.steps // rounds)
        reached = min(rounds, (train.steps - 1) // self._round_steps + 1)
        if reached < rounds:
            left = ", ".join(str(k) for k in self.steps_list[reached:])
            print(f"progressive: train.steps {train.steps} ends in round {reached} of {rounds} (model.round_steps "
                  f"{self._round_steps}): the {left}-step students stay untrained until a resume with more train.steps",
                  file=sys.stderr)
        return {"main": self.optimizer_from_train(train, tuple(self.students))}

    def round_of(self, step: int) -> int:
        """The 0-based round of trainer step ``step``."""
        return min(step // self._round_steps, len(self.steps_list) - 1)

    def student_denoiser(self, net: nn.Module, autocast=None, net_dtype=None) -> Denoiser:
        return Denoiser(net, self.path, self.kind, net_dtype=net_dtype, precond=self.precond, sigma_data=self.sigma_data,
                        autocast=autocast)

    def training_step(self, modules, batch: dict, ctx) -> dict:
        r = self.round_of(ctx.step)
        k = self.steps_list[r]
        student = modules[_member(k)]
        if r == 0:
            teacher = self._teacher_denoiser()
        else:  # the previous round's student, guidance already in it
            teacher = self.student_denoiser(modules[_member(self.steps_list[r - 1])], net_dtype=torch.float32)
        den = self.student_denoiser(student, autocast=ctx.autocast_dtype, net_dtype=torch.float32)
        x = batch["x"]
        times = nested_times(self.path, torch.arange(2 * k + 1, dtype=torch.float64) / (2 * k), self.cfg.grid, self.rho)
        loss = pd_loss(den, teacher, x, k, ctx.generator, weighting=self.cfg.weighting, times=times,
                       cond=_cond(self, batch, ctx, self.cfg.label_dropout)).mean()
        with torch.no_grad():
            student.trained.add_(1)  # before the step: the trainer's EMA copies it in ctx.optimize
        gn = ctx.optimize(loss, "main")
        with torch.no_grad():
            src = list(student.net.parameters())
            for later in self.steps_list[r + 1:]:  # the rounds to come start from this student
                for p, q in zip(modules[_member(later)].net.parameters(), src):
                    p.copy_(q)
        return {"loss": loss.detach(), "grad_norm": gn, "round": r + 1, "student_steps": k}

    # --- sampling -----------------------------------------------------------------------
    def sample_batch_size(self, **options) -> int:
        return 256 if self.data.images else 4096

    def resolve_steps(self, modules, steps: int | None) -> int:
        """The student of ``steps`` (default: the most distilled one that was trained); one-line refusals."""
        trained = [k for k in self.steps_list if int(modules[_member(k)].trained) > 0]
        if steps is None:
            return trained[-1] if trained else self.steps_list[0]
        steps = int(steps)
        listed = ", ".join(str(k) for k in self.steps_list)
        if steps > self.steps_list[0]:
            raise CapabilityError(f"--steps {steps}: this progressive student was distilled for at most {self.steps_list[0]} "
                                  f"steps (its rounds' students: {listed}); sample the teacher for more")
        if steps not in self.steps_list:
            raise CapabilityError(f"--steps {steps}: progressive students sample with {listed} steps (one student per round)")
        if steps not in trained:
            done = ", ".join(str(k) for k in trained) or "none"
            raise CapabilityError(f"--steps {steps}: the run stopped before its {steps}-step round (trained students: {done})")
        return steps

    @torch.no_grad()
    def sample_batch(self, modules, generators, y, steps=None, cfg=None, callback=None) -> Tensor:
        """DDIM with the ``steps``-step student on its nested grid from ``x_T ~ path.prior_sample``: ``steps`` passes."""
        from ..samplers import SAMPLERS

        self._check_cfg(cfg, y)
        k = self.resolve_steps(modules, steps)
        net = modules[_member(k)]
        dev = self.device_of(modules)
        x = self.path.prior_sample((len(generators), *self.data.shape), generator=generators, dtype=torch.float32).to(dev)
        den = self.student_denoiser(net, autocast=self.autocast_dtype)
        ts = nested_grid(self.path, k, self.cfg.grid, self.rho)
        return SAMPLERS["ddim"](den, x, ts, generator=None, callback=callback, cond=self._sample_cond(y, x.shape[0], dev))


# --------------------------------------------------------------------------------------
# Consistency models
# --------------------------------------------------------------------------------------
class _Consistency(_Student):
    """Sampling, grids and the consistency function shared by CD and CT."""

    def _setup_grid(self) -> None:
        self.t_eps, self.s_min = boundary(self.path, self.cfg.sigma_min)
        self._grids: dict[int, Tensor] = {}

    def grid(self, n: int) -> Tensor:
        """The ``n``-point consistency grid (ascending times, ``t_eps`` first), cached."""
        g = self._grids.get(n)
        if g is None:
            g = self._grids[n] = consistency_grid(self.path, n, self.cfg.sigma_min, self.cfg.sigma_max, self.cfg.rho)
        return g

    def consistency(self, net: nn.Module, autocast=None, net_dtype=None) -> ConsistencyFunction:
        inner = Denoiser(net, self.path, self.kind, net_dtype=net_dtype, precond=self.precond, sigma_data=self.sigma_data,
                         autocast=autocast)
        return ConsistencyFunction(inner, self.s_min, self.sigma_data)

    def _distance_c(self) -> float | None:
        return self.cfg.huber_c or None

    def sample_batch_size(self, **options) -> int:
        return 256 if self.data.images else 4096

    @torch.no_grad()
    def sample_batch(self, modules, generators, y, steps=None, cfg=None, callback=None) -> Tensor:
        """Multistep consistency sampling with ``steps`` (default ``sampling_steps``) times of the grid the
        model was trained on (:func:`~scorelab.distill.multistep_indices`): ``steps`` network passes."""
        self._check_cfg(cfg, y)
        net = modules["net"]
        n_grid = int(net.steps)
        k = int(steps or self.cfg.sampling_steps)
        if not 1 <= k <= n_grid - 1:
            raise CapabilityError(f"--steps {k}: this {self.name} model was trained on an N = {n_grid} grid and samples "
                                  f"with 1..{n_grid - 1} steps")
        ts = self.grid(n_grid)[multistep_indices(n_grid, k)]
        dev = self.device_of(modules)
        sigma_T = float(self.path.coefficients(ts[:1]).sigma)
        x = sigma_T * randn((len(generators), *self.data.shape), generator=generators, dtype=torch.float32).to(dev)
        f = self.consistency(net, autocast=self.autocast_dtype)
        gens = [g for g in generators] if generators is not None else None
        return consistency_sample(f, x, ts, gens, cond=self._sample_cond(y, x.shape[0], dev), callback=callback)


@dataclass
class ConsistencyConfig:
    family: str = "consistency"  # registry name of this family
    teacher: str = ""  # run folder of the teacher (a diffusion or vdm run), e.g. --model.teacher runs/fmnist-rf
    n_steps: int = 18  # N: points t_1 = t_eps < ... < t_N of the discretization (Song et al. 2023: 18 on CIFAR-10)
    sigma_min: float = 0.002  # boundary noise level s = sigma/alpha (raised to the teacher path's smallest)
    sigma_max: float = 80.0  # largest noise level (lowered to the teacher path's largest)
    rho: float = 7.0  # Karras grid exponent of the discretization
    solver: str = "heun"  # teacher ODE step between adjacent times: heun (2 passes) ddim (1)
    target_ema: float = 0.95  # mu of the target network theta- <- mu theta- + (1 - mu) theta (Song et al.: 0.95)
    distance: str = "pseudo_huber"  # pseudo_huber (sqrt(|a-b|^2 + c^2) - c; LPIPS cannot be had here) | l2
    huber_c: float = 0.0  # pseudo-Huber c (0: 0.00054 sqrt(dim), Song & Dhariwal 2023)
    weighting: str = "uniform"  # lambda(t_n): uniform (CD) | ict 1 / (s_{n+1} - s_n)
    sigma_data: float = 0.5  # EDM data std of the skip scalings when the teacher has no preconditioning
    guidance: float = 0.0  # CFG weight w distilled into the student (needs a class-conditional teacher with label dropout; 0: none)
    label_dropout: float = 0.1  # share of rows given the null label (conditional teachers)
    sampling_steps: int = 1  # default steps of `scorelab sample` (multistep consistency sampling)
    monitor_every: int = 0  # steps between one-step FID / sliced-W2 rows in metrics.jsonl (0: none)
    monitor_samples: int = 500  # samples (seeds 0..n-1) per monitor row

    def __post_init__(self):
        _check(isinstance(self.teacher, str), "model.teacher must be a run folder")
        _check_cm(self)
        _positive_int(self, "n_steps", 2)
        _check(self.solver in SOLVERS, f"model.solver {self.solver!r} is unknown: expected one of {', '.join(SOLVERS)}")
        _check(0 <= self.target_ema < 1, f"model.target_ema must be in [0, 1), got {self.target_ema}")
        _check(self.sampling_steps <= self.n_steps - 1,
               f"model.sampling_steps {self.sampling_steps} needs n_steps > {self.sampling_steps} (got {self.n_steps})")


def _check_cm(cfg) -> None:
    _check(cfg.sigma_min > 0 and cfg.sigma_max > cfg.sigma_min and math.isfinite(cfg.sigma_max),
           f"model: need 0 < sigma_min < sigma_max, got {cfg.sigma_min}, {cfg.sigma_max}")
    _check(cfg.rho > 0, f"model.rho must be > 0, got {cfg.rho}")
    _check(cfg.distance in DISTANCES, f"model.distance {cfg.distance!r} is unknown: expected one of {', '.join(DISTANCES)}")
    _check(cfg.huber_c >= 0, f"model.huber_c must be >= 0 (0: 0.00054 sqrt(dim)), got {cfg.huber_c}")
    _check(cfg.weighting in CM_WEIGHTINGS, f"model.weighting {cfg.weighting!r} is unknown: expected one of {', '.join(CM_WEIGHTINGS)}")
    _check(cfg.sigma_data > 0, f"model.sigma_data must be > 0, got {cfg.sigma_data}")
    _positive_int(cfg, "sampling_steps", 1)
    _check_common(cfg)


@register
class ConsistencyFamily(_Consistency):
    """Consistency distillation of a diffusion / vdm teacher (see the module docstring)."""

    name = "consistency"
    Config = ConsistencyConfig
    references = {"teacher": TEACHER_FAMILIES}
    declared = Capabilities(generate=True, sample_options=("steps", "cfg", "callback"))

    def build(self) -> None:
        self._check_teacher()
        self._teacher_parts()
        if self.precond == "none":
            self.sigma_data = self.cfg.sigma_data
        self._setup_grid()
        self.grid(self.cfg.n_steps)  # a bad grid fails now, not at the first step
        self.net = self._copy_teacher_net(self.cfg.n_steps)
        self.target = copy.deepcopy(self.net).requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "target": self.target}

    def optimizers(self, train):
        return {"main": self.optimizer_from_train(train, ("net",))}

    def training_step(self, modules, batch: dict, ctx) -> dict:
        net, target = modules["net"], modules["target"]
        f = self.consistency(net, autocast=ctx.autocast_dtype, net_dtype=torch.float32)
        f_target = self.consistency(target, autocast=ctx.autocast_dtype, net_dtype=torch.float32)
        loss = consistency_loss(f, batch["x"], self.grid(self.cfg.n_steps), ctx.generator, teacher=self._teacher_denoiser(),
                                target=f_target, solver=self.cfg.solver, distance=self.cfg.distance,
                                huber_c=self._distance_c(), weighting=self.cfg.weighting,
                                cond=_cond(self, batch, ctx, self.cfg.label_dropout)).mean()
        with torch.no_grad():
            net.trained.add_(1)  # before the step: the trainer's EMA copies it in ctx.optimize
        gn = ctx.optimize(loss, "main")
        mu = self.cfg.target_ema
        with torch.no_grad():
            for p, q in zip(target.parameters(), net.parameters()):
                p.lerp_(q, 1 - mu)
            for b, c in zip(target.buffers(), net.buffers()):
                b.copy_(c)
        return {"loss": loss.detach(), "grad_norm": gn}


@dataclass
class ConsistencyTrainingConfig:
    family: str = "consistency_training"  # registry name of this family
    path: str = "edm"  # forward process of the model (any continuous path; EDM: t is sigma)
    path_options: dict = field(default_factory=dict)  # e.g. {sigma_max: 80}
    net: str = "unet"  # network registry name: unet mlp dit
    net_options: dict = field(default_factory=dict)  # the net's config fields
    sigma_min: float = 0.002  # boundary noise level s = sigma/alpha (Song et al. 2023)
    sigma_max: float = 80.0  # largest noise level
    rho: float = 7.0  # Karras grid exponent
    sigma_data: float = 0.5  # EDM data std of the skip scalings (c_in, c_skip, c_out)
    n_start: int = 10  # s0: intervals of the first grid (Song & Dhariwal 2023: 10)
    n_end: int = 1280  # s1: the most intervals (iCT: 1280)
    doubling_steps: int = 0  # K': trainer steps between doublings (0: train.steps / (log2(s1 / s0) + 1), iCT)
    p_mean: float = -1.1  # log-normal interval sampling: mean of ln s (iCT)
    p_std: float = 2.0  # and its standard deviation (iCT)
    distance: str = "pseudo_huber"  # pseudo_huber | l2
    huber_c: float = 0.0  # pseudo-Huber c (0: 0.00054 sqrt(dim))
    weighting: str = "ict"  # lambda(t_n): ict 1 / (s_{n+1} - s_n) | uniform
    label_dropout: float = 0.0  # share of null labels of a class-conditional model
    sampling_steps: int = 1  # default steps of `scorelab sample`
    monitor_every: int = 0  # steps between one-step FID / sliced-W2 rows in metrics.jsonl (0: none)
    monitor_samples: int = 500  # samples (seeds 0..n-1) per monitor row

    def __post_init__(self):
        from ..nets.registry import NETS
        from ..paths import PATHS, make_path

        _check(self.path in PATHS and self.path != "ddpm",
               f"model.path {self.path!r} is unknown or discrete: expected one of {', '.join(p for p in PATHS if p != 'ddpm')}")
        try:
            make_path(self.path, **self.path_options)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        _check(self.net in NETS, f"model.net {self.net!r} is unknown: expected one of {', '.join(NETS)}")
        _check_cm(self)
        _positive_int(self, "n_start", 1)
        _positive_int(self, "n_end", 1)
        _check(self.n_end >= self.n_start, f"model.n_end {self.n_end} must be >= model.n_start {self.n_start}")
        _positive_int(self, "doubling_steps", 0)
        _check(self.p_std > 0, f"model.p_std must be > 0, got {self.p_std}")


@register
class ConsistencyTrainingFamily(_Consistency):
    """Improved consistency training (iCT) from scratch (see the module docstring)."""

    name = "consistency_training"
    Config = ConsistencyTrainingConfig
    declared = Capabilities(generate=True, sample_options=("steps", "callback"))

    def build(self) -> None:
        from ..nets.registry import build_net
        from ..paths import make_path

        self.path = make_path(self.cfg.path, **self.cfg.path_options)
        self.kind, self.precond, self.sigma_data = "x0", "edm", self.cfg.sigma_data
        self._setup_grid()
        self.grid(self.cfg.n_start + 1)
        try:
            net = build_net(self.cfg.net, self.cfg.net_options, self.data.shape, self.data.conditional_classes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None
        self.net = StudentNet(net, self.cfg.n_start + 1)
        self._total = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self, train):
        self._total = train.steps
        return {"main": self.optimizer_from_train(train, ("net",))}

    def grid_size(self, step: int) -> int:
        """``N`` at trainer step ``step`` (:func:`~scorelab.distill.ict_discretization`)."""
        return ict_discretization(step, max(self._total, 1), self.cfg.n_start, self.cfg.n_end, self.cfg.doubling_steps)

    def training_step(self, modules, batch: dict, ctx) -> dict:
        net = modules["net"]
        n = self.grid_size(ctx.step)
        times = self.grid(n)
        probs = ict_index_probabilities(noise_level(self.path, times), self.cfg.p_mean, self.cfg.p_std)
        f = self.consistency(net, autocast=ctx.autocast_dtype, net_dtype=torch.float32)
        loss = consistency_loss(f, batch["x"], times, ctx.generator, distance=self.cfg.distance, huber_c=self._distance_c(),
                                weighting=self.cfg.weighting, probs=probs,
                                cond=_cond(self, batch, ctx, self.cfg.label_dropout)).mean()
        with torch.no_grad():  # before the step: the trainer's EMA copies these in ctx.optimize
            net.trained.add_(1)
            net.steps.fill_(n)
        gn = ctx.optimize(loss, "main")
        return {"loss": loss.detach(), "grad_norm": gn, "grid_size": n}
