"""The C x C part of AC-Norm: channel signatures, the sparse correlation S and
the re-calibrated (effective) affine.

Every backend and the AC-Corr score use these functions, so the method's
definition lives here only. All of it runs in float32, or float64 when the
parameters are float64, whatever the parameter dtype, and with autocast off:
the matrix is tiny and its rounding decides which entries of S survive.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "signatures",
    "correlation",
    "recalibrate",
    "recalibrate_grad",
    "effective_affine",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C x C math runs in for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def signatures(weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel signature ``beta / (|gamma| + eps)`` of an affine, detached."""
    dtype = compute_dtype(weight.dtype)
    weight = weight.detach().to(dtype)
    bias = bias.detach().to(dtype)
    return bias / (weight.abs() + eps)


def correlation(
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    eps: float = 1e-5,
    temperature: float = 1.0,
) -> Tensor:
    """The sparse C x C matrix ``S`` that re-calibrates the target affine.

    ``A[i, j] = softmax_j(-|y_t[i] - y_s[j]| / temperature)`` with ``y_s`` and
    ``y_t`` the signatures of the source (``weight``, ``bias``) and target
    affine; ``S`` keeps the entries of each row that are at least the diagonal
    entry (ties kept, so the diagonal always is) and zeroes the rest. ``S`` is
    detached: no gradient flows through it.
    """
    with torch.autocast(weight.device.type, enabled=False):
        y_s = signatures(weight, bias, eps)
        y_t = signatures(weight_target, bias_target, eps)
        affinity = torch.softmax(-(y_t[:, None] - y_s[None, :]).abs() / temperature, dim=1)
        diagonal = affinity.diagonal()[:, None]
        return torch.where(affinity >= diagonal, affinity, torch.zeros_like(affinity))


def recalibrate(s: Tensor, weight_target: Tensor, bias_target: Tensor) -> tuple[Tensor, Tensor]:
    """Effective affine ``W = (I + S) gamma_t``, ``B = (I + S) beta_t`` in ``s.dtype``.

    Differentiable with respect to the target affine (``S`` is constant).
    """
    with torch.autocast(s.device.type, enabled=False):
        gamma = weight_target.to(s.dtype)
        beta = bias_target.to(s.dtype)
        return gamma + s @ gamma, beta + s @ beta


def recalibrate_grad(s: Tensor, grad_weight: Tensor, grad_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the target affine from those of ``W`` and ``B``: ``(I + S)^T``."""
    with torch.autocast(s.device.type, enabled=False):
        grad_weight = grad_weight.to(s.dtype)
        grad_bias = grad_bias.to(s.dtype)
        return grad_weight + s.t() @ grad_weight, grad_bias + s.t() @ grad_bias


def effective_affine(
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    eps: float = 1e-5,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The affine ``(W, B)`` of the single BatchNorm that equals AC-Norm's output.

    ``W = (I + S) gamma_t`` and ``B = (I + S) beta_t`` with ``S`` from
    :func:`correlation`; gradient flows to ``weight_target`` and
    ``bias_target`` only.
    """
    s = correlation(weight, bias, weight_target, bias_target, eps, temperature)
    return recalibrate(s, weight_target, bias_target)
