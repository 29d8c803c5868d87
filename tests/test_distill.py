"""Distillation against known answers: progressive distillation's closed-form target, the consistency
boundary condition, students that recover the closed-form probability-flow map of a 1-D Gaussian,
guidance baked into a student on a labelled mixture, and the families' bad-input refusals.

Why the tolerances are so tight: with an exact (mixture) teacher, a linear-in-parameters student
and a fixed batch, each distillation regression has a target that is a deterministic function of
the student's input (no label noise), so the least-squares student interpolates it whatever the
batch; one Newton step in float64 solves these quadratics to rounding. What remains is a deterministic
discretization error (the teacher's few ODE / DDIM steps vs the exact flow), computed here in closed
form and used as the tolerance.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from scorelab.cli import main
from scorelab.data.mixture import GaussianMixture, random_mixture
from scorelab.distill import (
    ConsistencyFunction,
    boundary,
    consistency_grid,
    consistency_loss,
    consistency_sample,
    ict_discretization,
    ict_index_probabilities,
    nested_grid,
    nested_times,
    noise_level,
    ode_step,
    pd_loss,
    pd_target,
    pd_weight,
    pseudo_huber,
)
from scorelab.guidance import ClassifierFreeGuidance
from scorelab.metrics import sliced_wasserstein
from scorelab.paths import make_path
from scorelab.random import generators_for_seeds
from scorelab.samplers import SAMPLERS
from scorelab.targets import Denoiser, Prediction

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


# --------------------------------------------------------------------------------------
# Progressive distillation: the closed-form target
# --------------------------------------------------------------------------------------
class _Fixed:
    """A 'student' whose x-prediction at every input is the given tensor."""

    def __init__(self, path, x0):
        self.path, self.x0 = path, x0

    def predict(self, x, t, **_):
        c = self.path.coefficients(torch.as_tensor(t, dtype=F64)).to(x)
        return Prediction(x, c, self.x0, (x - c.alpha * self.x0) / c.sigma)


@pytest.mark.parametrize("name, opts", [("vp", {}), ("rf", {}), ("ve", {"sigma_max": 20.0})])
def test_pd_target_is_two_teacher_ddim_steps_through_one_student_step(name, opts):
    """x~ = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t): one DDIM step from
    z_t predicting x~ lands where the exact teacher's two DDIM steps t -> t' -> s land (library sampler)."""
    path = make_path(name, **opts)
    mix = random_mixture(3, 4, seed=1)
    teacher = mix.denoiser(path)
    z = path.prior_std * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    ts = nested_times(path, u)
    for i in (0, 2):  # an interior step and the step onto the clean time
        t, t_mid, s = ts[i], ts[i + 1], ts[i + 2]
        x_tilde, z_s = pd_target(teacher, z, t, t_mid, s)
        two = SAMPLERS["ddim"](teacher, z, torch.stack([t, t_mid, s]))
        one = SAMPLERS["ddim"](_Fixed(path, x_tilde), z, torch.stack([t, s]))
        scale = float(two.abs().max())
        torch.testing.assert_close(z_s, two, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(one, two, rtol=0, atol=1e-10 * scale)


def test_nested_grids_contain_the_coarser_ones():
    for name in ("vp", "rf", "ve", "edm"):
        path = make_path(name)
        for kind in ("uniform", "logsnr", "karras"):
            g8, g4 = nested_grid(path, 8, kind), nested_grid(path, 4, kind)
            assert g8[0] == path.t_max and g8[-1] == path.t_clean
            torch.testing.assert_close(g8[::2], g4, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# The consistency boundary condition
# --------------------------------------------------------------------------------------
class _Loud(nn.Module):
    """A network with huge outputs: at the boundary they must not matter at all."""

    def forward(self, x, t, **_):
        return 1e6 * torch.sin(37 * x + t.reshape(-1, *([1] * (x.ndim - 1))))


@pytest.mark.parametrize("name", ["edm", "ve", "vp", "rf"])
def test_skip_scalings_at_sigma_min_are_exact_and_f_is_the_identity(name):
    path = make_path(name)
    t_eps, s_min = boundary(path, 0.002)
    t = torch.full((5,), t_eps, dtype=F64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    den = Denoiser(_Loud(), path, "x0", precond="edm", sigma_data=0.5, sigma_min=s_min)
    c = path.coefficients(t).to(x)
    _, c_skip, c_out = den.scalings(c)
    assert bool((c_out == 0).all())  # exactly: sigma - s_min alpha == 0 (boundary() picks s_min so)
    for inner_kind in ("x0", "velocity"):  # the core's edm form, and the wrapper around any denoiser
        inner = den if inner_kind == "x0" else Denoiser(_Loud(), path, "velocity")
        f = ConsistencyFunction(inner, s_min)
        out = f(x, t)
        if path.name in ("edm", "ve"):  # alpha = 1: c_skip = 1 and f(x, t_eps) = x bit for bit
            assert bool((c_skip == 1).all())
            assert torch.equal(out, x)
        else:  # in x~ = x / alpha: c_skip alpha = 1 and f = x / alpha, to the rounding of one division
            torch.testing.assert_close(c_skip * c.alpha, torch.ones_like(c_skip), rtol=4e-16, atol=0)
            torch.testing.assert_close(out, x / c.alpha, rtol=4e-16, atol=0)
    # away from the boundary the network counts
    assert not torch.allclose(den(x, t * 10 + 0.1), x)


def test_pseudo_huber_and_ict_schedule():
    a, b = torch.zeros(2, 4, dtype=F64), torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 0]], dtype=F64)
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.tensor([5.0, 0.0], dtype=F64))
    torch.testing.assert_close(pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0], dtype=F64))
    # N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2(s1/s0) + 1)): 8 stages for 10 -> 1280
    K = 8000
    assert [ict_discretization(k, K) for k in (0, 999, 1000, 6999, 7000, 7999)] == [11, 11, 21, 641, 1281, 1281]
    s = noise_level(make_path("edm"), consistency_grid(make_path("edm"), 11))
    p = ict_index_probabilities(s)
    assert p.shape == (10,) and abs(float(p.sum()) - 1) < 1e-12 and int(p.argmax()) not in (0, 9)


# --------------------------------------------------------------------------------------
# Linear students recover the probability-flow map of a 1-D Gaussian
# --------------------------------------------------------------------------------------
M, S = 0.3, 0.5  # data N(M, S^2)


def _gauss():
    return GaussianMixture([1.0], [[M]], [S])


def _exact_map(path, t_from, t_to):
    """Slope and intercept of the PF-ODE map x_{t_from} -> x_{t_to} for N(M, S^2) data:
    x_to = alpha_to M + (x - alpha_from M) sqrt(v_to / v_from), v = alpha^2 S^2 + sigma^2."""
    c0, c1 = (path.coefficients(torch.tensor(float(t), dtype=F64)) for t in (t_from, t_to))
    v0, v1 = c0.alpha**2 * S**2 + c0.sigma**2, c1.alpha**2 * S**2 + c1.sigma**2
    a = float(torch.sqrt(v1 / v0))
    return a, float(c1.alpha * M - a * c0.alpha * M)


def _affine(fn):
    """(slope, intercept) of an affine map of (B, 1) tensors."""
    y = fn(torch.tensor([[0.0], [1.0]], dtype=F64))
    return float(y[1, 0] - y[0, 0]), float(y[0, 0])


class _TimeTable(nn.Module):
    """F(x, tau) = a(tau) x + b(tau) with one (a, b) per known time: a linear student. ``ab`` (2, n) is a
    plain tensor so that :func:`_newton` can differentiate the loss with respect to it."""

    def __init__(self, path, times):
        super().__init__()
        self.keys = path.c_noise(torch.as_tensor(times, dtype=F64))
        self.ab = torch.zeros(2, len(self.keys), dtype=F64)

    def forward(self, x, tau, **_):
        i = (tau.reshape(-1, 1) - self.keys.reshape(1, -1)).abs().argmin(1)
        return self.ab[0, i, None] * x + self.ab[1, i, None]


def _newton(net, loss_of) -> float:
    """Minimise ``loss_of()``, a quadratic in ``net.ab``, exactly: one Newton step with the exact Hessian
    (pseudo-inverse: the times a round never visits have no curvature and stay as they are)."""
    p0 = net.ab.detach().clone()

    def f(p):
        net.ab = p
        return loss_of()

    g = torch.autograd.functional.jacobian(f, p0).reshape(-1)
    H = torch.autograd.functional.hessian(f, p0, vectorize=True).reshape(g.numel(), g.numel())
    net.ab = (p0.reshape(-1) - torch.linalg.pinv(H, rtol=1e-12, hermitian=True) @ g).reshape(p0.shape)
    return float(loss_of().detach())


@pytest.mark.parametrize("name, kind, grid", [("edm", "v", "logsnr"), ("rf", "x0", "uniform")])
def test_progressive_distillation_to_one_step_recovers_the_ode_map(name, kind, grid):
    """Rounds 64 -> 32 -> ... -> 1 with a linear student (x- or v-prediction, truncated-SNR weights).
    Each round's student interpolates its teacher's two DDIM steps exactly, so the 1-step student is
    the 64-step DDIM map of the exact teacher; its distance to the exact map is that composition's
    discretization error (computed: 2.5e-4 on EDM / log-SNR, 1.1e-2 on RF / uniform, first order in
    1 / steps), plus rounding (1e-9)."""
    path = make_path(name)
    gauss = _gauss()
    start = 64
    times = nested_grid(path, start, grid)
    net = _TimeTable(path, times[:-1])
    teacher = gauss.denoiser(path)
    x0 = gauss.sample(256, generator=torch.Generator().manual_seed(0))
    N = start // 2
    while N >= 1:
        student = Denoiser(net, path, kind)
        loss = _newton(net, lambda: pd_loss(student, teacher, x0, N, torch.Generator().manual_seed(1), grid=grid).mean())
        assert loss < 1e-24
        teacher = Denoiser(copy.deepcopy(net).requires_grad_(False), path, kind)  # this round's student teaches the next
        N //= 2
    student = Denoiser(net, path, kind)
    t_max = torch.tensor([path.t_max], dtype=F64)
    learned = _affine(lambda x: student.predict(x, t_max.expand(x.shape[0])).x0)
    ddim = _affine(lambda x: SAMPLERS["ddim"](gauss.denoiser(path), x, times))
    exact = _exact_map(path, path.t_max, path.t_clean)
    disc = max(abs(p - q) for p, q in zip(ddim, exact))
    assert disc < 0.015  # the derived tolerance is informative (slope 0.5)
    for p, q, r in zip(learned, ddim, exact):
        assert abs(p - q) < 1e-9
        assert abs(p - r) <= disc + 1e-9


@pytest.mark.parametrize("name, solver", [("edm", "heun"), ("rf", "ddim")])
def test_consistency_distillation_recovers_the_ode_map(name, solver):
    """CD with the exact teacher, one teacher step (Heun or DDIM) per interval of an N = 40 grid and a
    linear consistency function (skip scalings with f(x, t_eps) = x~). With the target network equal
    to the previous solution (the EMA's limit), the N - 1 fixed-point sweeps below are exact
    dynamic programming from the boundary: f(., t_N) is then the composition of the N - 1 teacher
    steps. Tolerance: that composition's (computed) distance to the exact map x_T -> x~_{t_eps}
    (relative to the slope: 1% for Heun, 7% for DDIM on this grid; both shrink with N)."""
    path = make_path(name)
    gauss = _gauss()
    teacher = gauss.denoiser(path)
    N = 40
    grid = consistency_grid(path, N)
    net = _TimeTable(path, grid)
    inner = Denoiser(net, path, "x0", precond="edm", sigma_data=0.5)
    t_eps, s_min = boundary(path, 0.002)
    f = ConsistencyFunction(inner, s_min)
    x0 = gauss.sample(256, generator=torch.Generator().manual_seed(0))
    for _ in range(N - 1):
        target = ConsistencyFunction(Denoiser(copy.deepcopy(net).requires_grad_(False), path, "x0", precond="edm"), s_min)
        _newton(net, lambda: consistency_loss(f, x0, grid, torch.Generator().manual_seed(1), teacher=teacher,
                                              target=target, solver=solver, distance="l2").mean())
    T = grid[-1:].expand(2)
    learned = _affine(lambda x: f(x, T))
    one_step = _affine(lambda x: consistency_sample(f, x, grid[-1:]))
    alpha_eps = float(path.coefficients(torch.tensor(t_eps, dtype=F64)).alpha)

    def composed(x):
        for n in range(N - 1, 0, -1):
            x = ode_step(teacher, x, grid[n].expand(x.shape[0]), grid[n - 1].expand(x.shape[0]), solver)
        return x / alpha_eps

    chain = _affine(composed)
    a, b = _exact_map(path, grid[-1], t_eps)
    exact = (a / alpha_eps, b / alpha_eps)
    scale = abs(exact[0])  # x_T -> x~ has slope ~ S / s_max: compare relative to it
    disc = max(abs(p - q) for p, q in zip(chain, exact)) / scale
    assert disc < 0.08  # the derived tolerance is informative
    for p, q, r, s in zip(learned, chain, exact, one_step):
        assert abs(p - q) < 1e-9 * scale and abs(s - p) < 1e-12
        assert abs(p - r) <= (disc + 1e-9) * scale


# --------------------------------------------------------------------------------------
# Guidance baked into a student
# --------------------------------------------------------------------------------------
class _HatStudent(nn.Module):
    """x0_hat(x, t, y): piecewise linear in x on a fine knot grid, one table per (time, class); linear
    in its parameters, so :meth:`newton` can minimise a squared loss on its outputs exactly."""

    def __init__(self, path, times, classes, lo=-5.0, hi=5.0, knots=201):
        super().__init__()
        self.path, self.keys = path, path.c_noise(torch.as_tensor(times, dtype=F64))
        self.lo, self.h, self.K, self.C = lo, (hi - lo) / (knots - 1), knots, classes
        self.theta = nn.Parameter(torch.zeros(len(times), classes, knots, dtype=F64))
        self.last = None

    def features(self, x, tau, y):
        """Flat parameter indices (B, 2) and weights (B, 2) of each output."""
        i = (tau.reshape(-1, 1) - self.keys.reshape(1, -1)).abs().argmin(1)
        u = ((x[:, 0] - self.lo) / self.h).clamp(0, self.K - 1 - 1e-9)
        k = u.floor().long()
        w = u - k
        base = (i * self.C + y) * self.K + k
        return torch.stack([base, base + 1], 1), torch.stack([1 - w, w], 1)

    def forward(self, x, tau, y=None):
        self.last = (x.detach(), tau.detach(), y)
        idx, wt = self.features(x, tau, y)
        return (self.theta.reshape(-1)[idx] * wt).sum(1, keepdim=True)

    def newton(self, loss_of, weight_of_t, smooth: float = 1e-6) -> None:
        """Minimise ``loss_of() = mean_b w_b (out_b - target_b)^2`` (targets fixed) plus a tiny
        second-difference penalty ``smooth max(H) |D theta|^2 / 2`` (a smoothing spline: knots no example
        reaches continue the fitted line instead of staying at 0), exactly: gradient by autograd,
        Hessian ``(2 / B) sum_b w_b phi_b phi_b^T`` from the recorded inputs, one Newton step."""
        self.theta.grad = None
        loss_of().backward()
        x, tau, y = self.last
        idx, wt = self.features(x, tau, y)
        w = weight_of_t(tau) / x.shape[0] * 2  # (B,)
        P = self.theta.numel()
        rows = idx[:, :, None].expand(-1, 2, 2).reshape(-1)
        cols = idx[:, None, :].expand(-1, 2, 2).reshape(-1)
        vals = (w[:, None, None] * wt[:, :, None] * wt[:, None, :]).reshape(-1)
        H = torch.zeros(P, P, dtype=F64).index_put_((rows, cols), vals, accumulate=True)
        D = torch.zeros(self.K - 2, self.K, dtype=F64)
        r = torch.arange(self.K - 2)
        D[r, r], D[r, r + 1], D[r, r + 2] = 1.0, -2.0, 1.0
        pen = smooth * float(H.diagonal().max()) * torch.block_diag(*[D.T @ D] * (P // self.K))
        with torch.no_grad():
            th = self.theta.reshape(-1)
            step = torch.linalg.solve(H + pen + 1e-14 * torch.eye(P, dtype=F64), self.theta.grad.reshape(-1) + pen @ th)
            self.theta -= step.reshape(self.theta.shape)


def test_guidance_distilled_at_w_reproduces_the_guided_teacher():
    """Two-class 1-D mixture, exact teacher under CFG w = 2 ((1 + w) D_y - w D_null, null = the whole
    mixture), progressive distillation 4 -> 2 -> 1 steps of a student that takes only (x, t, y).
    Floor: sliced W2 between two independent n-sample sets of the teacher's guided 4-step samples.
    The student's samples from seeds A are within 1.5 x floor of the teacher's from seeds B, because
    (triangle inequality, W2 <= the paired RMS distance of any coupling) SW2(student_A, teacher_B) <=
    rms(student_A - teacher_A) + SW2(teacher_A, teacher_B), and we assert the paired RMS <= floor / 2.
    Unguided samples are many floors away, so the check has power."""
    mix = GaussianMixture([1.0, 1.0], [[-1.0], [1.0]], [0.35, 0.35], labels=[0, 1])
    path = make_path("vp")
    w = 2.0
    guided = ClassifierFreeGuidance(mix.denoiser(path), w, null_label=-1)
    times = nested_grid(path, 4)
    net = _HatStudent(path, times[:-1], 2)
    teacher = guided
    x0, comp = mix.sample(8192, generator=torch.Generator().manual_seed(0), return_component=True)
    cond = {"y": mix.labels[comp]}
    for N in (2, 1):
        student = Denoiser(net, path, "x0")
        net.newton(lambda: pd_loss(student, teacher, x0, N, torch.Generator().manual_seed(N), cond=cond).mean(),
                   lambda t: pd_weight(path.coefficients(t)))
        teacher = Denoiser(copy.deepcopy(net).requires_grad_(False), path, "x0")
    n = 4000
    y = torch.arange(n) % 2

    def draw(den, steps, first):
        x = path.prior_sample((n, 1), generator=generators_for_seeds(range(first, first + n)), dtype=F64)
        with torch.no_grad():
            return SAMPLERS["ddim"](den, x, nested_grid(path, steps), cond={"y": y})

    t_a, t_b = draw(guided, 4, 0), draw(guided, 4, n)
    s_a = draw(Denoiser(net, path, "x0"), 1, 0)  # one pass per sample: the student never calls a null branch
    unguided = draw(ClassifierFreeGuidance(mix.denoiser(path), 0.0, null_label=-1), 4, n)

    def sw2(p, q):
        return float(sliced_wasserstein(p, q, generator=torch.Generator().manual_seed(0)))

    floor = sw2(t_a, t_b)
    rms = float((s_a - t_a).pow(2).sum(1).mean().sqrt())
    assert rms <= floor / 2, (rms, floor)
    assert sw2(s_a, t_b) <= 1.5 * floor
    assert sw2(unguided, t_b) > 5 * floor


# --------------------------------------------------------------------------------------
# The families through the command line
# --------------------------------------------------------------------------------------
def _write(root: Path, name: str, d: dict) -> str:
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _train(root: Path, name: str, data: dict, model: dict, steps: int, **train) -> int:
    cfg = {"name": name, "seed": 0, "data": data, "model": model,
           "train": {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup": 2, "log_every": 5, "ckpt_every": 0,
                     "sample_every": 0, "ema_decay": 0.9, "device": "cpu", "threads": 1, "precision": "fp32", **train}}
    return main(["train", _write(root, name, cfg), "--runs", str(root / "runs"), "--no-progress"])


POINTS = {"name": "8gaussians", "options": {"n": 512}}
TEACHER = {"family": "diffusion", "path": "rf", "prediction": "velocity", "net": "mlp",
           "net_options": {"width": 32, "depth": 1}, "sampler": "euler", "sampling_steps": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny teachers (unconditional; class-conditional with label dropout) and three students:
    a guided progressive one (8 -> 4 -> 2 steps), a consistency-distilled one and a consistency-trained one."""
    root = tmp_path_factory.mktemp("distill")
    r = root / "runs"
    cond = {**POINTS, "class_conditional": True}
    # 40 steps at lr 1e-2: far enough from the zero-initialised net that every round has a real loss
    assert _train(root, "uncond", POINTS, TEACHER, 40, lr=1e-2) == 0
    assert _train(root, "cond", cond, {**TEACHER, "label_dropout": 0.2}, 40, lr=1e-2) == 0
    assert _train(root, "pd", cond, {"family": "progressive", "teacher": str(r / "cond"), "start_steps": 8, "final_steps": 2,
                                     "round_steps": 3, "guidance": 2.0}, 8) == 0
    assert _train(root, "cd", POINTS, {"family": "consistency", "teacher": str(r / "uncond"), "n_steps": 6,
                                       "solver": "ddim"}, 4) == 0
    assert _train(root, "ct", POINTS, {"family": "consistency_training", "net": "mlp",
                                       "net_options": {"width": 16, "depth": 1}, "n_start": 2, "n_end": 8}, 6) == 0
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_teachers_are_one_line(runs, capsys):
    import shutil

    root, r = runs, runs / "runs"
    pd = {"family": "progressive", "start_steps": 4, "final_steps": 1}
    capsys.readouterr()
    # a teacher of another data shape (points teacher, image student)
    assert _train(root, "shape", {"name": "fmnist-embedded"}, {**pd, "teacher": str(r / "uncond")}, 2) == 2
    assert "trained on data of shape (2,)" in _err(capsys)
    # guidance from an unconditional teacher
    assert _train(root, "g", POINTS, {**pd, "teacher": str(r / "uncond"), "guidance": 2.0}, 2) == 2
    assert "is unconditional" in _err(capsys)
    # an eps teacher cannot become a few-step student (the same weights, read as eps)
    shutil.copytree(r / "uncond", root / "eps")
    cfg = yaml.safe_load((root / "eps" / "config.yaml").read_text())
    cfg["model"]["prediction"] = "eps"
    (root / "eps" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert _train(root, "e", POINTS, {**pd, "teacher": str(root / "eps")}, 2) == 2
    assert "predicts eps" in _err(capsys)
    # a student whose data is not conditioned like its teacher's net
    assert _train(root, "c", POINTS, {**pd, "teacher": str(r / "cond")}, 2) == 2
    assert "data.class_conditional: true" in _err(capsys)


def test_students_sample_what_they_were_distilled_for_and_refuse_the_rest(runs, capsys, tmp_path):
    from scorelab.runs import open_run

    pd, cd, ct = (str(runs / "runs" / r) for r in ("pd", "cd", "ct"))
    out = str(tmp_path / "s.npz")
    capsys.readouterr()
    # the example: a guided student, 2 steps, one pass per step
    assert main(["sample", pd, "--class", "3", "--cfg", "2", "--steps", "2", "--n", "8", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out)["cfg"] == 2.0
    run = open_run(pd)
    calls = []
    h = run.modules["net_2"].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    run.family.sample(run.modules, 8, y=torch.full((8,), 3), steps=2, cfg=2.0)
    h.remove()
    assert calls == [8, 8]  # 2 evaluations of the batch, not 4 (no unconditional branch)
    for args, words in (
        ([pd, "--steps", "8", "--class", "1"], "distilled for at most 4 steps"),
        ([pd, "--steps", "3"], "sample with 4, 2 steps"),
        ([pd, "--cfg", "3", "--class", "1"], "samples at that weight only"),
        ([cd, "--steps", "6"], "samples with 1..5 steps"),
        ([cd, "--cfg", "2"], "needs a class-conditional model"),
        ([ct, "--steps", "9"], "samples with 1..8 steps"),
        ([ct, "--cfg", "2"], "--cfg does not apply to consistency_training runs"),
    ):
        assert main(["sample", *args, "--n", "4", "--out", out]) == 2, args
        assert words in _err(capsys), args
    for args, words in (  # eval refuses the same requests before sampling anything
        ([pd, "--steps", "8"], "distilled for at most 4 steps"),
        ([cd, "--cfg", "2"], "needs a class-conditional model"),
        ([ct, "--steps", "9"], "samples with 1..8 steps"),
    ):
        assert main(["eval", *args, "--n", "4"]) == 2, args
        assert words in _err(capsys), args
    for r, steps in ((cd, "5"), (ct, "8"), (pd, "4")):
        assert main(["sample", r, "--steps", steps, "--n", "4", "--out", out]) == 0
    # the CD target network is its own checkpointed module, an EMA of the student (not the student)
    from scorelab.train.checkpoint import load_checkpoint

    t, _ = load_checkpoint(Path(cd) / "checkpoint.safetensors")
    keys = [k for k in t if k.startswith("model.target.net.")]
    assert keys and any(not torch.equal(t[k], t[k.replace("model.target.", "model.net.")]) for k in keys)


def test_progressive_rounds_resume_bit_exactly(runs, tmp_path):
    """Rounds, the kept-equal students of later rounds and their records resume as if never stopped
    (a round boundary at step 3 falls inside the split)."""
    from scorelab.train.checkpoint import load_checkpoint

    model = {"family": "progressive", "start_steps": 8, "final_steps": 1, "round_steps": 2,
             "teacher": str(runs / "runs" / "uncond")}
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    root_a.mkdir(), root_b.mkdir()
    assert _train(root_a, "s", POINTS, model, 6) == 0
    assert _train(root_b, "s", POINTS, model, 3) == 0
    mid, _ = load_checkpoint(root_b / "runs" / "s" / "checkpoint.safetensors")  # step 3: in round 2
    for k in (k for k in mid if k.startswith("model.net_1.net.")):  # the 1-step student waits, equal to the current one
        assert torch.equal(mid[k], mid[k.replace("net_1", "net_2", 1)]), k
    assert any(not torch.equal(mid[k], mid[k.replace("net_4", "net_2", 1)]) for k in mid if k.startswith("model.net_4.net."))
    assert main(["train", "--resume", str(root_b / "runs" / "s"), "--train.steps", "6", "--no-progress"]) == 0
    ta, ma = load_checkpoint(root_a / "runs" / "s" / "checkpoint.safetensors")
    tb, mb = load_checkpoint(root_b / "runs" / "s" / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 6 and set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert {k: int(ta[f"model.net_{k}.trained"]) for k in (4, 2, 1)} == {4: 2, 2: 2, 1: 2}  # round r trained its own
