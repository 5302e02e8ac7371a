"""The authors' formulation of AC-Norm, written from the method's definition.

Two BatchNorms over the same input, one with the target affine and one with
the re-calibrated affine ``(S gamma_t, S beta_t)``, summed. Both calls share
the running buffers, so in training they move twice per step, as in the
original code. Autograd differentiates it directly; this backend is the
oracle that every other backend is tested against, and it is deliberately
not fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..correlation import compute_dtype, correlation
from .activation import apply_activation


def ac_norm_reference(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    training: bool,
    momentum: float,
    eps: float,
    temperature: float,
    activation: str | None,
    negative_slope: float,
    double_update: bool = True,
) -> Tensor:
    """AC-Norm as two summed BatchNorms; updates the running buffers in place.

    With ``double_update=False`` only the first BatchNorm moves the running
    statistics (the second normalises with batch statistics all the same).
    """
    s = correlation(weight, bias, weight_target, bias_target, eps, temperature)
    # BatchNorm wants its affine and buffers in float32 beside half inputs
    # (float64 beside float64); the authors' float32 models are unchanged by this.
    bn_dtype = compute_dtype(x.dtype)
    gamma_t = weight_target.to(bn_dtype)
    beta_t = bias_target.to(bn_dtype)
    gamma_tr = s.to(bn_dtype) @ gamma_t
    beta_tr = s.to(bn_dtype) @ beta_t

    buffers = (running_mean, running_var)
    if running_mean is not None and running_mean.dtype != bn_dtype:
        assert running_var is not None  # given together with running_mean (checked)
        buffers = (running_mean.to(bn_dtype), running_var.to(bn_dtype))
    second_buffers = buffers if (double_update or not training) else (None, None)

    out = F.batch_norm(x, *buffers, gamma_t, beta_t, training, momentum, eps)
    out = out + F.batch_norm(x, *second_buffers, gamma_tr, beta_tr, training, momentum, eps)

    if buffers[0] is not running_mean:
        # Converted above: the running statistics and their copies are tensors.
        assert running_mean is not None and running_var is not None
        assert buffers[0] is not None and buffers[1] is not None
        with torch.no_grad():
            running_mean.copy_(buffers[0])
            running_var.copy_(buffers[1])
    return apply_activation(out, activation, negative_slope)
