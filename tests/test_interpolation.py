"""Noise interpolation: end points, the spherical path's norm and angle, the linear path's norm loss."""

import math

import pytest
import torch

from scorelab.interpolation import interpolate_noise, lerp, slerp


def _pair(D=784, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["linear", "spherical"])
def test_ends_are_the_two_noises(mode):
    z0, z1 = _pair()
    z = interpolate_noise(z0.reshape(1, 28, 28), z1.reshape(1, 28, 28), 7, mode)
    assert z.shape == (7, 1, 28, 28)
    torch.testing.assert_close(z[0].reshape(-1), z0, rtol=0, atol=1e-12)
    torch.testing.assert_close(z[-1].reshape(-1), z1, rtol=0, atol=1e-12)


def test_slerp_moves_at_constant_angular_speed_on_the_sphere():
    z0, z1 = _pair()
    z1 = z1 * z0.norm() / z1.norm()  # equal norms: the path stays on the sphere of that radius
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    z = slerp(z0, z1, s)
    torch.testing.assert_close(z.norm(dim=1), z0.norm().expand(11), rtol=1e-12, atol=0)
    theta = torch.arccos(z0 @ z1 / (z0.norm() * z1.norm()))
    ang0 = torch.arccos((z @ z0 / (z.norm(dim=1) * z0.norm())).clamp(-1, 1))
    torch.testing.assert_close(ang0, s * theta, rtol=0, atol=1e-6)


def test_linear_midpoint_leaves_the_typical_shell():
    # |(z0 + z1) / 2|^2 ~ D / 2 for independent N(0, I) noises: the linear midpoint has norm
    # sqrt(D/2) (atypical for the prior), the spherical one keeps about sqrt(D)
    D = 4096
    z0, z1 = _pair(D, seed=1)
    mid_lin = lerp(z0, z1, torch.tensor([0.5]))[0]
    mid_sph = slerp(z0, z1, torch.tensor([0.5]))[0]
    assert abs(mid_lin.norm() / math.sqrt(D / 2) - 1) < 0.05
    assert abs(mid_sph.norm() / math.sqrt(D) - 1) < 0.05


def test_parallel_noises_fall_back_to_linear():
    z0, _ = _pair(16)
    z = slerp(z0, 2 * z0, torch.linspace(0, 1, 3, dtype=torch.float64))
    torch.testing.assert_close(z[1], 1.5 * z0)


def test_bad_arguments():
    z0, z1 = _pair(16)
    with pytest.raises(ValueError, match="mode"):
        interpolate_noise(z0, z1, 5, "cubic")
    with pytest.raises(ValueError, match="n >= 2"):
        interpolate_noise(z0, z1, 1)
    with pytest.raises(ValueError, match="shape"):
        interpolate_noise(z0, z1[:8], 5)
