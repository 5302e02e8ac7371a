"""The C x C math against a hand computation of the method's definition."""

from __future__ import annotations

import pytest
import torch

import acnorm_fused as acn
from acnorm_fused.correlation import recalibrate_grad

from helpers import hand_correlation, make_affines


@pytest.mark.parametrize("channels", [1, 2, 7, 32])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_correlation_matches_hand_computation(channels, temperature, seed):
    params = make_affines(channels, seed, torch.float64)
    s = acn.correlation(*params, eps=1e-5, temperature=temperature)
    expected = hand_correlation(*params, eps=1e-5, temperature=temperature)
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=1e-14)


def test_correlation_structure():
    params = make_affines(16, 3, torch.float64)
    s = acn.correlation(*params)
    assert s.shape == (16, 16)
    assert torch.all(s.diagonal() > 0), "the diagonal is always kept"
    kept = s > 0
    assert torch.all(s[kept] >= s.diagonal()[:, None].expand_as(s)[kept])
    assert torch.all(s.sum(1) <= 1 + 1e-12), "rows are a sparsified softmax"
    assert 16 < int(kept.sum()) < 256, "seeded drift gives a sparse, non-diagonal S"


def test_ties_with_the_diagonal_are_kept():
    # Target signature 0 for channel 0; source signatures +1 (its own) and -1:
    # both at distance 1, so A[0, 1] == A[0, 0] and the reference keeps it.
    weight = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    bias = torch.tensor([1.0, -1.0, 5.0], dtype=torch.float64) * (1 + 1e-5)
    weight_target = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    bias_target = torch.tensor([0.0, -1.0, 5.0], dtype=torch.float64)
    s = acn.correlation(weight, bias, weight_target, bias_target)
    assert s[0, 0] == s[0, 1] > 0
    assert s[0, 2] == 0


def test_compute_dtype_is_float32_or_wider():
    for dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        s = acn.correlation(*make_affines(8, 0, dtype))
        assert s.dtype == expected
        w, b = acn.effective_affine(*make_affines(8, 0, dtype))
        assert w.dtype == b.dtype == expected


def test_autocast_does_not_lower_precision():
    params = make_affines(24, 5)
    expected = acn.effective_affine(*params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = acn.correlation(*params)
        got = acn.effective_affine(*params)
    assert s.dtype == torch.float32
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_effective_affine_and_its_gradient():
    w, b, wt, bt = make_affines(12, 2, torch.float64)
    w.requires_grad_(True)
    wt.requires_grad_(True)
    bt.requires_grad_(True)
    s = hand_correlation(w, b, wt, bt)
    eye = torch.eye(12, dtype=torch.float64)
    W, B = acn.effective_affine(w, b, wt, bt)
    torch.testing.assert_close(W, (eye + s) @ wt.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B, (eye + s) @ bt.detach(), rtol=1e-12, atol=1e-12)
    g_w, g_b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    (W * g_w + B * g_b).sum().backward()
    # Gradient to the target affine only, and none through S.
    assert w.grad is None
    torch.testing.assert_close(wt.grad, (eye + s).t() @ g_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bt.grad, (eye + s).t() @ g_b, rtol=1e-12, atol=1e-12)
    rows = recalibrate_grad(s, torch.stack((g_w, g_b)))
    torch.testing.assert_close(rows[0], wt.grad, rtol=1e-12, atol=1e-12)
