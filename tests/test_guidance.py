"""Guidance against analytic answers: labelled Gaussian mixtures have exact conditional and
unconditional denoisers and an exact noisy (Bayes) classifier, on every path."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from scorelab.data.mixture import GaussianMixture
from scorelab.guidance import ClassifierFreeGuidance, ClassifierGuidance, bayes_classifier
from scorelab.metrics import sliced_wasserstein
from scorelab.paths import make_path
from scorelab.samplers import sample
from scorelab.targets import KINDS, Denoiser

F = torch.float64
N = 3000  # samples per sampler run
STEPS = 20  # dpmpp_2m steps on the log-SNR grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def overlapping_mixture(std: float = 0.8) -> GaussianMixture:
    """Two classes, two modes each, interleaved on a cross so that the classes overlap."""
    means = [(-1.0, 0.0), (1.0, 0.0), (0.0, 1.2), (0.0, -1.2)]
    return GaussianMixture([1.0, 1.5, 1.0, 0.7], means, [std] * 4, labels=[0, 1, 0, 1])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(den, y: int, seed: int, n: int = N) -> torch.Tensor:
    return sample(den, (n, 2), STEPS, "dpmpp_2m", "logsnr", gen(seed), dtype=F, cond={"y": torch.full((n,), y, dtype=torch.long)})


def nearest_mode(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    return ((x[:, None, :] - mix.means[None]) ** 2).sum(-1).argmin(1)  # (n,) component index


def random_points(n: int = 64, seed: int = 5) -> torch.Tensor:
    return 1.5 * torch.randn(n, 2, generator=gen(seed), dtype=F)


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------
def test_cfg_batched_pass_equals_two_separate_passes():
    mix = overlapping_mixture()
    den = mix.denoiser(make_path("vp"))
    x, y = random_points(), torch.randint(0, 2, (64,), generator=gen(1))
    for w in (-0.5, 1.0, 3.0):
        cfg = ClassifierFreeGuidance(den, w, form="w", null_label=-1)
        nfe = den.nfe
        for t in (0.05, 0.4, 0.9):
            pred = cfg.predict(x, t, y=y)
            cond, unc = den.predict(x, t, y=y), den.predict(x, t, y=torch.full_like(y, -1))
            for kind in KINDS:
                assert_close(pred.get(kind), (1 + w) * cond.get(kind) - w * unc.get(kind), rtol=1e-12, atol=1e-12)
            assert_close(cfg(x, t, kind="eps", y=y), pred.eps, rtol=0, atol=0)
            # the guided pair is still a decomposition of x_t: x_t = alpha x0 + sigma eps
            c = pred.coefficients
            assert_close(c.alpha * pred.x0 + c.sigma * pred.eps, x, rtol=1e-12, atol=1e-12)
        assert den.nfe - nfe == 3 * 4  # per time: one batched cfg.predict, two reference passes, one cfg()


def test_cfg_one_forward_per_call_and_skip_at_w0():
    mix = overlapping_mixture()
    den = mix.denoiser(make_path("cosine"))
    x, y = random_points(), torch.zeros(64, dtype=torch.long)
    cfg = ClassifierFreeGuidance(den, 2.0, null_label=-1)
    n0 = den.nfe
    cfg.predict(x, 0.3, y=y)
    assert den.nfe - n0 == 1  # conditional and unconditional branches in ONE batched call
    calls = []
    orig = den.predict

    def spy(xx, t, **cond):
        calls.append(xx.shape[0])
        return orig(xx, t, **cond)

    den.predict = spy
    try:
        cfg.predict(x, 0.3, y=y)
        ClassifierFreeGuidance(den, 0.0, form="w", null_label=-1).predict(x, 0.3, y=y)
        ClassifierFreeGuidance(den, 1.0, form="gamma", null_label=-1).predict(x, 0.3, y=y)
    finally:
        del den.predict
    assert calls == [128, 64, 64]  # doubled batch only when the unconditional weight is non-zero
    # w = 0 is exactly the conditional denoiser
    assert_close(ClassifierFreeGuidance(den, 0.0, null_label=-1).predict(x, 0.3, y=y).x0, den.predict(x, 0.3, y=y).x0, rtol=0, atol=0)


def test_cfg_forms_agree_with_gamma_equal_one_plus_w():
    mix = overlapping_mixture()
    den = mix.denoiser(make_path("rf"))
    x, y = random_points(), torch.randint(0, 2, (64,), generator=gen(2))
    for w in (-1.0, 0.0, 0.7, 4.0):
        a = ClassifierFreeGuidance(den, w, form="w", null_label=-1)
        b = ClassifierFreeGuidance(den, 1 + w, form="gamma", null_label=-1)
        assert a.gamma == b.gamma and b.w == pytest.approx(w)
        pa, pb = a.predict(x, 0.6, y=y), b.predict(x, 0.6, y=y)
        assert_close(pa.x0, pb.x0, rtol=0, atol=0)
        assert_close(pa.eps, pb.eps, rtol=0, atol=0)
    # gamma = 0 is the unconditional model; in score form the seed-002 combination
    c = ClassifierFreeGuidance(den, 0.0, form="gamma", null_label=-1)
    assert_close(c.predict(x, 0.6, y=y).score, den.predict(x, 0.6).score, rtol=1e-12, atol=1e-12)
    g = 2.5
    s = ClassifierFreeGuidance(den, g, form="gamma", null_label=-1).predict(x, 0.6, y=y).score
    assert_close(s, g * den.predict(x, 0.6, y=y).score + (1 - g) * den.predict(x, 0.6).score, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="form"):
        ClassifierFreeGuidance(den, 1.0, form="lambda", null_label=-1)
    with pytest.raises(ValueError, match="labels"):
        ClassifierFreeGuidance(den, 1.0, null_label=-1).predict(x, 0.5)


def test_cfg_with_a_scorelab_denoiser_uses_the_null_row():
    from scorelab.nets import MLP, MLPConfig

    torch.manual_seed(0)
    net = MLP(MLPConfig(dim=2, num_classes=3, width=32, depth=2, zero_init=False)).double()
    den = Denoiser(net, make_path("vp"), "eps")
    cfg = ClassifierFreeGuidance(den, 1.5)  # null label inferred: num_classes = 3
    assert cfg.null_label == 3
    x, y = random_points(16), torch.tensor([0, 1, 2, 0] * 4)
    with torch.no_grad():
        got = cfg.predict(x, 0.4, y=y).eps
        want = 2.5 * den(x, 0.4, kind="eps", y=y) - 1.5 * den(x, 0.4, kind="eps", y=torch.full_like(y, 3))
    assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cfg_w0_samples_the_exact_conditional():
    mix = overlapping_mixture()
    den = mix.denoiser(make_path("vp"))
    x = run(ClassifierFreeGuidance(den, 0.0, null_label=-1), 0, seed=11)
    cond = mix.conditional(0)
    ref, ref2 = cond.sample(N, gen(12)), cond.sample(N, gen(13))
    # Monte Carlo floor: SW2 between two exact sample sets of the same size
    floor = max(sliced_wasserstein(cond.sample(N, gen(20 + s)), ref, 256, gen(s)).item() for s in range(3))
    sw = sliced_wasserstein(x, ref, 256, gen(0)).item()
    assert sw < 2 * floor, (sw, floor)
    # the test has power: strongly guided samples are far outside that band
    xg = run(ClassifierFreeGuidance(den, 2.0, null_label=-1), 0, seed=11)
    assert sliced_wasserstein(xg, ref, 256, gen(0)).item() > 4 * floor
    # class-mode weights: fraction nearest each mode of class 0, vs exact samples (two binomials)
    for k in (0, 2):
        p, q = (nearest_mode(mix, x) == k).double().mean().item(), (nearest_mode(mix, ref2) == k).double().mean().item()
        assert abs(p - q) < 4 * math.sqrt(2 * q * (1 - q) / N), (k, p, q)


def test_cfg_moves_mass_toward_the_requested_class_as_w_grows():
    mix = overlapping_mixture()
    den = mix.denoiser(make_path("vp"))
    zero, one = torch.tensor(1.0, dtype=F), torch.tensor(0.0, dtype=F)
    own, logpost = [], []
    for w in (0.0, 0.5, 1.0, 2.0):
        x = run(ClassifierFreeGuidance(den, w, null_label=-1), 0, seed=3)
        own.append((mix.labels[nearest_mode(mix, x)] == 0).double().mean().item())
        logpost.append(mix.class_log_posterior(x, zero, one)[:, 0].mean().item())  # mean log p(y=0 | x_0)
    # (same prior noise for every w: the differences are not Monte Carlo noise)
    assert all(a < b for a, b in zip(own[:-1], own[1:]) if a < 1.0) and own[-1] >= own[-2], own
    assert own[0] < 0.9 and own[-1] > 0.99, own
    assert all(a < b for a, b in zip(logpost[:-1], logpost[1:])), logpost


# --------------------------------------------------------------------------------------
# Classifier guidance
# --------------------------------------------------------------------------------------
def test_bayes_classifier_is_a_normalised_posterior():
    mix = overlapping_mixture()
    path = make_path("vp")
    f = bayes_classifier(mix, path)
    x = random_points()
    lp = f(x, 0.3)  # (B, 2)
    assert lp.shape == (64, 2)
    assert_close(lp.exp().sum(1), torch.ones(64, dtype=F), rtol=1e-12, atol=1e-12)
    # Bayes: log p(y | x_t) = log p(x_t | y) + log p(y) - log p(x_t)
    c = path.coefficients(torch.tensor(0.3, dtype=F))
    py0 = mix.weights[mix.labels == 0].sum()
    want = mix.conditional(0).marginal_log_prob(x, c.alpha, c.sigma) + py0.log() - mix.marginal_log_prob(x, c.alpha, c.sigma)
    assert_close(lp[:, 0], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path_name", ["vp", "rf", "ve"])
def test_classifier_guidance_with_the_bayes_classifier_is_the_conditional_score(path_name):
    mix = overlapping_mixture()
    path = make_path(path_name)
    den = mix.denoiser(path)
    x = random_points()
    y = torch.randint(0, 2, (64,), generator=gen(4))
    g1 = ClassifierGuidance(den, bayes_classifier(mix, path), 1.0)
    g0 = ClassifierGuidance(den, bayes_classifier(mix, path), 0.0)
    lo, hi = float(path.t_min), float(path.t_max)
    for u in (0.1, 0.5, 0.9):
        t = lo + u * (hi - lo)
        with torch.no_grad():  # samplers run under no_grad: the gradient must still flow
            p1 = g1.predict(x, t, y=y)
            p0 = g0.predict(x, t, y=y)
        exact = den.predict(x, t, y=y)
        assert_close(p1.score, exact.score, rtol=1e-8, atol=1e-8)
        assert_close(p1.eps, exact.eps, rtol=1e-8, atol=1e-8)
        assert_close(p1.x0, exact.x0, rtol=1e-8, atol=1e-8)
        assert_close(p0.score, den.predict(x, t).score, rtol=0, atol=0)


def test_classifier_guidance_samples_match_the_conditional_sampler():
    mix = overlapping_mixture()
    path = make_path("vp")
    den = mix.denoiser(path)
    n = 1000
    guided = run(ClassifierGuidance(den, bayes_classifier(mix, path), 1.0), 1, seed=7, n=n)
    exact = run(mix.denoiser(path), 1, seed=7, n=n)  # same prior noise, exact conditional denoiser
    assert_close(guided, exact, rtol=1e-6, atol=1e-6)
    # and a larger gamma moves mass toward class 1 (sharper class posterior)
    strong = run(ClassifierGuidance(den, bayes_classifier(mix, path), 3.0), 1, seed=7, n=n)
    one, zero = torch.tensor(1.0, dtype=F), torch.tensor(0.0, dtype=F)
    assert mix.class_log_posterior(strong, one, zero)[:, 1].mean() > mix.class_log_posterior(exact, one, zero)[:, 1].mean()


# --------------------------------------------------------------------------------------
# The noise-aware classifier family
# --------------------------------------------------------------------------------------
class _Ctx:
    """A minimal StepContext: Adam on the family's net, fp32."""

    def __init__(self, params, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam(params, lr=3e-3)

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def optimize(self, loss, name="main"):
        assert name == "main"
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return 0.0


def test_noisy_classifier_family_learns_clean_labels_and_not_noise():
    from scorelab.families import make_family
    from scorelab.train.config import ConfigError

    torch.manual_seed(0)
    mix = overlapping_mixture(std=0.4)
    x, k = mix.sample(4000, gen(0), return_component=True)
    y = mix.labels[k]
    fam = make_family({"family": "noisy_classifier", "path": "vp", "net_options": {"width": 64, "depth": 2}}, (2,), num_classes=2)
    mods = fam.modules()
    ctx = _Ctx(mods["net"].parameters())
    for step in range(150):  # a few seconds
        idx = torch.randint(0, 4000, (128,), generator=gen(step))
        out = fam.training_step(mods, {"x": x[idx].float(), "y": y[idx]}, ctx)
    assert set(out) >= {"loss", "accuracy"}
    mods["net"].eval()
    xt, yt = mix.sample(2000, gen(1), return_component=True)
    xt, yt = xt.float(), mix.labels[yt]
    # Bayes accuracy on clean data (nearest-class rule) as the reference for small t
    bayes = (mix.class_log_posterior(xt.double(), torch.tensor(1.0, dtype=F), torch.tensor(0.0, dtype=F)).argmax(1) == yt).double().mean().item()
    acc_clean = fam.accuracy(mods, xt, yt, 0.02, gen(2))
    acc_noise = fam.accuracy(mods, xt, yt, fam.path.t_max, gen(3))
    chance = max((yt == c).double().mean().item() for c in (0, 1))  # majority-class rate
    band = 4 * math.sqrt(0.25 / 2000)
    assert acc_clean > bayes - 0.05 and acc_clean > chance + 0.2, (acc_clean, bayes, chance)
    assert 1 - chance - band < acc_noise < chance + band, (acc_noise, chance)  # x_t carries no label at t_max
    # the trained classifier steers the exact unconditional denoiser toward the requested class
    # (gradient through the float32 net, inside a sampler running under no_grad)
    with torch.no_grad():
        guided = run(ClassifierGuidance(mix.denoiser(fam.path), fam.classifier(mods), 2.0), 0, seed=9, n=500)
        plain = run(mix.denoiser(fam.path), -1, seed=9, n=500)
    own = [(mix.labels[nearest_mode(mix, z)] == 0).double().mean().item() for z in (plain, guided)]
    assert own[0] < 0.7 and own[1] > 0.9, own
    with pytest.raises(NotImplementedError, match="draws no samples"):
        fam.sample(mods, 4)
    with pytest.raises(ConfigError, match="labelled dataset"):
        make_family({"family": "noisy_classifier"}, (2,), num_classes=0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_family({"family": "noisy_classifier", "label_smoothing": 1.5}, (2,), num_classes=2)


def test_noisy_classifier_conv_net_shapes_and_time_dependence():
    from scorelab.nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig

    torch.manual_seed(0)
    net = NoisyClassifier(NoisyClassifierConfig(num_classes=10, channels=(8, 16), groups=4), (1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    a, b = net(x, torch.full((3,), 0.1)), net(x, torch.full((3,), 0.9))
    assert a.shape == (3, 10) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="groups"):
        NoisyClassifierConfig(num_classes=10, channels=(8, 12), groups=8)


def test_noisy_classifier_runs_in_the_trainer_and_reopens(tmp_path):
    import yaml

    from scorelab.runs import open_run
    from scorelab.data import load_dataset
    from scorelab.families import make_family
    from scorelab.train.config import RunConfig
    from scorelab.train.trainer import Trainer

    cfg = RunConfig.from_dict({
        "name": "clf", "data": {"name": "8gaussians", "options": {"n": 2000}},
        "model": {"family": "noisy_classifier", "path": "vp", "net_options": {"width": 32, "depth": 1}, "label_smoothing": 0.1},
        "train": {"steps": 20, "batch_size": 100, "log_every": 10, "ckpt_every": 0, "sample_every": 0, "device": "cpu", "threads": 1},
    })
    ds = load_dataset(cfg.data.name, **cfg.data.options)
    fam = make_family(cfg.model, tuple(ds.shape), ds.num_classes)
    tr = Trainer(cfg, tmp_path, fam, ds, progress=False, extra_meta={"data_shape": list(ds.shape), "num_classes": ds.num_classes})
    assert tr.fit()["status"] == "done"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "accuracy" in lines[-1]
    opened = open_run(str(tmp_path))
    fam2, mods = opened.family, opened.modules
    assert fam2.num_classes == 8 and isinstance(fam2.path, type(fam.path))
    ema = tr.sampling_modules()["net"].state_dict()
    for k, v in mods["net"].state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_fmnist_classifier_preset_builds():
    from pathlib import Path

    import scorelab
    from scorelab.families import make_family
    from scorelab.train.config import RunConfig, load_yaml

    cfg = RunConfig.from_dict(load_yaml(Path(scorelab.__file__).parent / "configs" / "fmnist-classifier.yaml"))
    fam = make_family(cfg.model, (1, 28, 28), 10)
    assert fam.cfg.path == "rf" and fam.modules()["net"](torch.zeros(2, 1, 28, 28), torch.full((2,), 0.5)).shape == (2, 10)
