"""The reference backend (the oracle) against a step-by-step float64 computation."""

from __future__ import annotations

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.functional import effective_momentum

from helpers import hand_ac_norm, hand_correlation, make_affines, random_input

SHAPES = [(5, 3), (2, 4, 7), (2, 3, 4, 5), (2, 3, 3, 4, 5)]


def _params(channels, seed):
    w, b, wt, bt = make_affines(channels, seed, torch.float64)
    return w, b, wt.requires_grad_(), bt.requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_training_forward_and_running_stats(shape, temperature):
    channels = shape[1]
    x = random_input(shape, 1, torch.float64, mean=2.0, std=3.0)
    w, b, wt, bt = _params(channels, 2)
    rm = torch.randn(channels, dtype=torch.float64)
    rv = 0.5 + torch.rand(channels, dtype=torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    out = acn.ac_norm(x, rm, rv, w, b, wt, bt, training=True, momentum=0.1,
                      temperature=temperature, backend="reference")
    z, mean, var = hand_ac_norm(x, w, b, wt, bt, temperature=temperature)
    torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10)
    # Two updates per step with the unbiased variance, as the authors' code.
    n = x.numel() // channels
    unbiased = var * n / (n - 1)
    m = 0.1
    exp_rm = (1 - m) * ((1 - m) * rm0 + m * mean) + m * mean
    exp_rv = (1 - m) * ((1 - m) * rv0 + m * unbiased) + m * unbiased
    torch.testing.assert_close(rm, exp_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, exp_rv, rtol=1e-12, atol=1e-12)
    m_eff = effective_momentum(m)
    torch.testing.assert_close(rm, (1 - m_eff) * rm0 + m_eff * mean, rtol=1e-12, atol=1e-12)


def test_single_update_option():
    x = random_input((4, 3, 6), 3, torch.float64)
    w, b, wt, bt = _params(3, 4)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    acn.ac_norm(x, rm, rv, w, b, wt, bt, momentum=0.3, backend="reference", double_update=False)
    _, mean, var = hand_ac_norm(x, w, b, wt, bt)
    torch.testing.assert_close(rm, 0.3 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.7 + 0.3 * var * 24 / 23, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_uses_running_stats(shape):
    channels = shape[1]
    x = random_input(shape, 5, torch.float64)
    w, b, wt, bt = _params(channels, 6)
    rm = torch.randn(channels, dtype=torch.float64)
    rv = 0.5 + torch.rand(channels, dtype=torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    out = acn.ac_norm(x, rm, rv, w, b, wt, bt, training=False, backend="reference")
    z, _, _ = hand_ac_norm(x, w, b, wt, bt, mean=rm0, var=rv0)
    torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("activation,slope", [("relu", 0.01), ("leaky_relu", 0.2)])
def test_activation(activation, slope):
    x = random_input((3, 4, 5), 7, torch.float64)
    w, b, wt, bt = _params(4, 8)
    out = acn.ac_norm(x, None, None, w, b, wt, bt, activation=activation,
                      negative_slope=slope, backend="reference")
    z, _, _ = hand_ac_norm(x, w, b, wt, bt)
    expected = torch.where(z > 0, z, z * (0.0 if activation == "relu" else slope))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_target_affine_only():
    x = random_input((4, 5, 6), 9, torch.float64).requires_grad_()
    w, b, wt, bt = _params(5, 10)
    w.requires_grad_(True)  # even a trainable source gets nothing
    out = acn.ac_norm(x, None, None, w, b, wt, bt, backend="reference")
    grad = random_input(out.shape, 11, torch.float64)
    out.backward(grad)
    assert w.grad is None
    # d gamma_t = (I + S)^T dW with dW = sum(grad * x_hat), by hand.
    xd = x.detach()
    x_hat = (xd - xd.mean((0, 2), keepdim=True)) / torch.sqrt(xd.var((0, 2), unbiased=False, keepdim=True) + 1e-5)
    d_w = (grad * x_hat).sum((0, 2))
    d_b = grad.sum((0, 2))
    eye_s = torch.eye(5, dtype=torch.float64) + hand_correlation(w, b, wt, bt)
    torch.testing.assert_close(wt.grad, eye_s.t() @ d_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bt.grad, eye_s.t() @ d_b, rtol=1e-10, atol=1e-10)
