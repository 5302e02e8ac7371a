"""The C x C part of AC-Norm: channel signatures, the sparse correlation S and
the re-calibrated (effective) affine.

Every backend and the AC-Corr score use these functions, so the method's
definition lives here only. All of it runs in float32, or float64 when the
parameters are float64, whatever the parameter dtype, and with autocast off:
the matrix is tiny and its rounding decides which entries of S survive.

The four affine vectors travel stacked as rows of one ``(4, C)`` tensor
(source weight, source bias, target weight, target bias): on a CPU each
PyTorch call on these tiny tensors costs as much as the arithmetic of a whole
BatchNorm channel, so the fewer calls, the closer AC-Norm gets to BatchNorm.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "as_dtype",
    "stack_affines",
    "signatures",
    "correlation",
    "correlation_from_stack",
    "recalibrate",
    "recalibrate_grad",
    "effective_affine",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C x C math runs in for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; ``t`` itself when it already is (``Tensor.to`` costs
    microseconds even then, and this runs several times per layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _full_precision(device: torch.device):
    """Autocast off for the block, when it is on (entering it costs time otherwise)."""
    if device.type != "meta" and torch.is_autocast_enabled(device.type):  # meta has no autocast
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def stack_affines(weight: Tensor, bias: Tensor, weight_target: Tensor, bias_target: Tensor) -> Tensor:
    """The rows ``[gamma_s, beta_s, gamma_t, beta_t]`` as one detached ``(4, C)`` tensor
    in the compute dtype."""
    stacked = torch.stack((weight, bias, weight_target, bias_target)).detach()
    return as_dtype(stacked, compute_dtype(stacked.dtype))


def signatures(weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel signature ``beta / (|gamma| + eps)`` of an affine (rows of several
    affines work too), in the dtype of the inputs."""
    return bias / (weight.abs() + eps)


def affinity_from_stack(affines: Tensor, eps: float = 1e-5, temperature: float = 1.0) -> Tensor:
    """The dense matrix ``A`` (rows sum to 1) behind :func:`correlation`, of the
    ``(4, C)`` rows made by :func:`stack_affines`."""
    with _full_precision(affines.device):
        y = signatures(affines[0::2], affines[1::2], eps)  # rows: source, target
        # |d| / (-T) is exactly -(|d| / T): the reference's rounding, so its ties.
        return torch.softmax((y[1, :, None] - y[0]).abs_().div_(-temperature), dim=1)


def correlation_from_stack(affines: Tensor, eps: float = 1e-5, temperature: float = 1.0) -> Tensor:
    """:func:`correlation` of the ``(4, C)`` rows made by :func:`stack_affines`."""
    affinity = affinity_from_stack(affines, eps, temperature)
    with _full_precision(affines.device):
        # Keep A[i, j] >= A[i, i]: zero the entries strictly below the diagonal one.
        return affinity.masked_fill_(affinity < affinity.diagonal()[:, None], 0.0)


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
    _check_affine_arguments("correlation", weight, bias, weight_target, bias_target)
    affines = stack_affines(weight, bias, weight_target, bias_target)
    return correlation_from_stack(affines, eps, temperature)


def _check_affine_arguments(caller: str, *tensors) -> None:
    """The four affines of the public functions: tensors of one 1-D shape, one
    floating dtype and one device."""
    names = ("weight", "bias", "weight_target", "bias_target")
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{caller}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape != tensors[0].shape:
            raise ValueError(f"{caller}: weight, bias, weight_target and bias_target must share one 1-D "
                             f"shape, got {', '.join(str(tuple(x.shape)) for x in tensors)}")
        if not t.is_floating_point():
            raise TypeError(f"{caller}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != tensors[0].device:
            raise RuntimeError(f"{caller}: {name} is on {t.device} but weight is on {tensors[0].device}")


def recalibrate(s: Tensor, affine_rows: Tensor) -> Tensor:
    """``(I + S) v`` for each row ``v`` of ``affine_rows`` (shape ``(k, C)``), in ``s.dtype``.

    With rows ``[gamma_t, beta_t]`` this gives the effective affine ``[W, B]``.
    Differentiable with respect to ``affine_rows`` (``S`` is constant).
    """
    with _full_precision(s.device):
        rows = as_dtype(affine_rows, s.dtype)
        return torch.addmm(rows, rows, s.t())


def recalibrate_grad(s: Tensor, grad_rows: Tensor) -> Tensor:
    """``(I + S)^T g`` for each row ``g`` of ``grad_rows``: target-affine gradients
    from the gradients of the effective affine."""
    with _full_precision(s.device):
        rows = as_dtype(grad_rows, s.dtype)
        return torch.addmm(rows, rows, s)


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
    _check_affine_arguments("effective_affine", weight, bias, weight_target, bias_target)
    affines = stack_affines(weight, bias, weight_target, bias_target)
    s = correlation_from_stack(affines, eps, temperature)
    w, b = recalibrate(s, torch.stack((weight_target, bias_target)))
    return w, b
