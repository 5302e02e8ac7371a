"""Helpers the tests share: seeded parameters and inputs, a from-scratch
float64 model of AC-Norm, BatchNorm's tolerances, and the rule for tests of
the compiled modules (skip, or fail where CI says they must be testable)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Set where the compiled CUDA module must be testable (CI builds it): its
# absence is then a failure, not a skip.
EXPECT_CUDA_EXTENSION = os.environ.get("ACNORM_EXPECT_CUDA_EXTENSION", "0") == "1"
# The same for the compiled windowed C x C step, acnorm_fused._cpu.
EXPECT_CPU_EXTENSION = os.environ.get("ACNORM_EXPECT_CPU_EXTENSION", "0") == "1"

# Tolerances of BatchNorm itself per input dtype: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def make_affines(channels: int, seed: int, dtype: torch.dtype = torch.float32, spread: float = 0.3):
    """Source affine and a target affine drifted away from it, as after some finetuning."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.5 + torch.rand(channels, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(channels, generator=g, dtype=torch.float64)
    weight_target = weight + spread * torch.randn(channels, generator=g, dtype=torch.float64)
    bias_target = bias + spread * torch.randn(channels, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (weight, bias, weight_target, bias_target))


def make_layer(cls, channels: int, seed: int, dtype=torch.float32, **kwargs):
    """An AC-Norm layer with seeded source/target affines and running statistics."""
    layer = cls(channels, **kwargs).to(dtype)
    w, b, wt, bt = make_affines(channels, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        layer.weight_target.copy_(wt)
        layer.bias_target.copy_(bt)
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(channels, generator=g))
            layer.running_var.copy_(0.5 + torch.rand(channels, generator=g))
    return layer


def random_input(shape, seed: int, dtype=torch.float32, mean: float = 0.0, std: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def hand_correlation(weight, bias, weight_target, bias_target, eps=1e-5, temperature=1.0):
    """Signatures, softmax affinity and sparsification, with Python floats and loops (float64)."""
    ws, bs, wt, bt = ([float(v) for v in t.detach()] for t in (weight, bias, weight_target, bias_target))
    c = len(ws)
    y_s = [bs[j] / (abs(ws[j]) + eps) for j in range(c)]
    y_t = [bt[i] / (abs(wt[i]) + eps) for i in range(c)]
    s = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        logits = [-abs(y_t[i] - y_s[j]) / temperature for j in range(c)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        row = [e / total for e in exps]
        for j in range(c):
            s[i, j] = row[j] if row[j] >= row[i] else 0.0
    return s


def hand_ac_norm(x, weight, bias, weight_target, bias_target, eps=1e-5, temperature=1.0,
                 mean=None, var=None):
    """AC-Norm in float64: two BatchNorms with shared statistics, summed.

    Batch statistics (biased variance) unless ``mean``/``var`` are given.
    Returns (z, batch_mean, batch_var).
    """
    x = x.to(torch.float64)
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    batch_mean = x.mean(dims)
    batch_var = ((x - batch_mean.view(view)) ** 2).mean(dims)
    use_mean = batch_mean if mean is None else mean.to(torch.float64)
    use_var = batch_var if var is None else var.to(torch.float64)
    x_hat = (x - use_mean.view(view)) / torch.sqrt(use_var.view(view) + eps)
    s = hand_correlation(weight, bias, weight_target, bias_target, eps, temperature)
    gt, btt = weight_target.detach().to(torch.float64), bias_target.detach().to(torch.float64)
    g_tr, b_tr = s @ gt, s @ btt
    z = (x_hat * gt.view(view) + btt.view(view)) + (x_hat * g_tr.view(view) + b_tr.view(view))
    return z, batch_mean, batch_var


def assert_close(actual, expected, dtype=None, scale: float = 1.0):
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=rtol * scale, atol=atol * scale
    )


def skip_or_fail(reason: str, expected: bool = EXPECT_CUDA_EXTENSION):
    """Skip, or fail where ``expected`` (by default ACNORM_EXPECT_CUDA_EXTENSION=1)
    says the compiled module must be testable."""
    if expected:
        pytest.fail(reason)
    pytest.skip(reason)


def import_csrc_toolkit():
    """``csrc/toolkit.py``, which builds the compiled modules."""
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        import toolkit
    finally:
        sys.path.pop(0)
    return toolkit
