"""The seed's GAN arguments, measured: the vanishing minimax gradient and the optimal discriminator.

    python benchmarks/gan_seed.py            # about half a minute on one thread; writes benchmarks/results/gan_seed.json

Seed 001 ("Generative Adversarial Networks") argues three things; each table measures one.

1. **Vanishing gradient.** Early on, D rejects the fakes (``D(G(z)) ~ 0``) and the generator's
   gradient under the minimax loss ``log(1 - D(G(z)))`` vanishes, while the non-saturating loss
   ``-log D(G(z))`` keeps it. G stays at its initialisation while D takes Adam steps (lr 1e-3,
   betas (0.5, 0.999), batch 256 / 64); after ``k`` steps we print the mean ``D(G(z))`` over 1024 /
   256 fresh latents and the norm of the generator's gradient under both losses. Two settings: the
   2-D eight Gaussians with the MLP nets, and the embedded Fashion-MNIST subset with the DCGAN nets
   of ``scorelab.nets.gan`` (28x28x1). The ratio of the two norms follows ``D(G(z))``: per example
   the minimax gradient is the non-saturating one times ``D / (1 - D)``.
2. **Optimal discriminator.** With G fixed (``p_G = N(1.5, 0.7^2)``, data ``N(0, 1)``), a small MLP
   discriminator (``MLPDiscriminator(dim=1)``, 2 x 32 SiLU, float64) is trained by full-batch Adam
   (1500 steps, lr 1e-2 with cosine decay) on the D loss over ``n`` samples of each side; we print
   the final gradient norm, the largest ``|D(x) - D*(x)|`` on ``[-2.5, 3.5]`` (where
   ``(p_data + p_G) / 2`` exceeds 1% of its peak), its mean under ``(p_data + p_G) / 2`` (with
   ``D* = p_data / (p_data + p_G)``), and the game's value at the trained D on fresh samples next to
   ``V(D*, G)``; the errors shrink with ``n`` (sampling error, not capacity). (``tests/test_gan.py`` does the exact version: a D family that
   contains ``D*``, with a tolerance from the estimator's covariance.)
3. **The value at D* is -log 4 + 2 JSD, minimal at p_G = p_data.** For generators
   ``N(mu, 0.7^2)`` at several ``mu`` (and ``N(0, 1)`` itself): the quadrature value of
   ``V(D*, G)`` (``scorelab.gan.optimal_game``), ``-log 4 + 2 JSD``, and a Monte Carlo estimate of
   the value at the analytic ``D*`` with its standard error.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from common import header, write_json
from scorelab import gan
from scorelab.data import load_dataset
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture
from scorelab.nets.gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator

F = torch.float64


def vanishing_gradient(setting: str, checkpoints: list[int], n_eval: int, seed: int = 0) -> list[dict]:
    """Generator gradient norms under the minimax and non-saturating losses while D trains alone."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if setting == "8gaussians/mlp":
        mix = eight_gaussians_mixture()
        G, D, batch = MLPGenerator(), MLPDiscriminator(), 256
        real = lambda n: mix.sample(n, g).float()  # noqa: E731
    else:
        data = load_dataset("fmnist-embedded")
        G, D, batch = DCGANGenerator(), DCGANDiscriminator(), 64
        real = lambda n: data.sample(n, g)[0]  # noqa: E731
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    rows, step = [], 0
    for k in checkpoints:
        while step < k:
            with torch.no_grad():
                fake = G.generate(batch, g)
            d = gan.discriminator_terms(D, real(batch), fake)
            opt.zero_grad()
            d.loss.mean().backward()
            opt.step()
            step += 1
        lf = D(G.generate(n_eval, g))
        mm = float(gan.gradient_norm(gan.generator_loss(lf, "minimax").mean(), G.parameters()))
        ns = float(gan.gradient_norm(gan.generator_loss(lf, "non_saturating").mean(), G.parameters()))
        rows.append({"setting": setting, "d_steps": k, "d_fake": float(torch.sigmoid(lf.detach()).mean()),
                     "grad_minimax": mm, "grad_non_saturating": ns, "ratio": mm / ns})
    return rows


def one_d_problem(mu: float = 1.5, s: float = 0.7):
    return GaussianMixture([1.0], [[0.0]], [1.0]), GaussianMixture([1.0], [[mu]], [s])


def optimal_discriminator_rows(sizes: list[int], steps: int = 1500, seed: int = 0) -> list[dict]:
    """A small MLP D trained on n samples per side (full-batch Adam, cosine lr) vs the analytic D*."""
    p, q = one_d_problem()
    og = gan.optimal_game(p.log_prob, q.log_prob, -12, 12, 4001)
    pts, w = gan.quadrature_grid(-12, 12, 4001)
    mass = w * 0.5 * (p.log_prob(pts).exp() + q.log_prob(pts).exp())  # quadrature weights of (p + q) / 2
    d_star_pts = gan.optimal_discriminator(p.log_prob(pts), q.log_prob(pts))
    xs = torch.linspace(-2.5, 3.5, 121, dtype=F)[:, None]  # where (p + q) / 2 > 1% of its peak
    d_star = gan.optimal_discriminator(p.log_prob(xs), q.log_prob(xs))
    rows = []
    for n in sizes:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed + n)
        x, xg = p.sample(n, g), q.sample(n, g)
        D = MLPDiscriminator(dim=1, width=32, depth=2, activation="silu").double()
        opt = torch.optim.Adam(D.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            loss = gan.discriminator_terms(D, x, xg, "minimax").loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        grad = float(torch.stack([p_.grad.pow(2).sum() for p_ in D.parameters()]).sum().sqrt())
        with torch.no_grad():
            err = (torch.sigmoid(D(xs)) - d_star).abs()
            err_mass = float(((torch.sigmoid(D(pts)) - d_star_pts).abs() * mass).sum())
            m = 100000  # fresh samples for the value of the trained D
            v = gan.game_value(D(p.sample(m, g)), D(q.sample(m, g)))
        rows.append({"n_per_side": n, "grad_norm": grad, "max_abs_err": float(err.max()), "mean_abs_err": err_mass,
                     "value_trained": float(v.mean()), "value_trained_se": float(v.std()) / m**0.5,
                     "value_optimal": og.value})
    return rows


def value_rows(mus: list[float], n: int = 100000, seed: int = 0) -> list[dict]:
    """V(D*, G) by quadrature and by Monte Carlo at the analytic D*, for several generators."""
    rows = []
    for i, mu in enumerate(mus):
        p, q = one_d_problem(mu, 0.7) if mu is not None else (one_d_problem()[0],) * 2
        og = gan.optimal_game(p.log_prob, q.log_prob, -12, 12, 4001)
        g = torch.Generator().manual_seed(seed + i)
        x, xg = p.sample(n, g), q.sample(n, g)
        v = gan.game_value(gan.optimal_logit(p.log_prob(x), q.log_prob(x)), gan.optimal_logit(p.log_prob(xg), q.log_prob(xg)))
        se = float(v.std()) / n**0.5
        rows.append({"p_G": "N(0, 1) = p_data" if mu is None else f"N({mu}, 0.49)", "value_quadrature": og.value,
                     "minus_log4_plus_2jsd": og.bound, "jsd": og.jsd, "value_mc": float(v.mean()), "value_mc_se": se,
                     "z": (float(v.mean()) - og.bound) / se if se > 0 else 0.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = header("GAN seed checks: vanishing gradient, optimal discriminator, value at D*")
    t0 = time.perf_counter()

    vg = vanishing_gradient("8gaussians/mlp", [0, 10, 25, 50, 100, 200], 1024) + vanishing_gradient("fmnist/dcgan", [0, 10, 25, 50], 256)
    print("\n1. generator gradient norm while D trains alone (G at initialisation)")
    print(f"{'setting':<16} {'D steps':>7} {'D(G(z))':>10} {'|g| minimax':>12} {'|g| non-sat':>12} {'ratio':>10}")
    for r in vg:
        print(f"{r['setting']:<16} {r['d_steps']:>7} {r['d_fake']:>10.2e} {r['grad_minimax']:>12.3e} {r['grad_non_saturating']:>12.3e} {r['ratio']:>10.2e}")

    od = optimal_discriminator_rows([300, 3000])
    print("\n2. small MLP D (2 x 32) trained on n samples per side vs D* = p_data / (p_data + p_G)")
    print(f"{'n per side':>10} {'|grad|':>9} {'max|D-D*|':>10} {'E|D-D*|':>9} {'V(D, G) fresh':>18} {'V(D*, G)':>10}")
    for r in od:
        print(f"{r['n_per_side']:>10} {r['grad_norm']:>9.1e} {r['max_abs_err']:>10.4f} {r['mean_abs_err']:>9.4f} "
              f"{r['value_trained']:>10.5f}+-{r['value_trained_se']:.5f} {r['value_optimal']:>10.5f}")

    vr = value_rows([None, 0.5, 1.5, 3.0, 6.0])
    print(f"\n3. V(D*, G) = -log 4 + 2 JSD (-log 4 = {-math.log(4):.5f}); Monte Carlo n = 100000 at the analytic D*")
    print(f"{'p_G':<18} {'quadrature':>11} {'-log4+2JSD':>11} {'JSD':>8} {'Monte Carlo':>20} {'z':>6}")
    for r in vr:
        print(f"{r['p_G']:<18} {r['value_quadrature']:>11.5f} {r['minus_log4_plus_2jsd']:>11.5f} {r['jsd']:>8.5f} "
              f"{r['value_mc']:>11.5f}+-{r['value_mc_se']:.5f} {r['z']:>6.2f}")
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.1f} s")
    write_json("gan_seed.json", {"vanishing_gradient": vg, "optimal_discriminator": od, "value_at_optimum": vr,
                                 "seconds": seconds, "threads": args.threads}, machine)


if __name__ == "__main__":
    main()
