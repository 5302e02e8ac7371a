"""The activations AC-Norm can fuse into its output, and their gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_activation(
    out: Tensor, activation: str | None, negative_slope: float, inplace: bool = False
) -> Tensor:
    """``act(out)`` for ``activation`` in ``None``, ``"relu"``, ``"leaky_relu"``."""
    if not activation:
        return out
    if activation == "relu":
        return F.relu(out, inplace=inplace)
    return F.leaky_relu(out, negative_slope, inplace=inplace)


def activation_grad(
    grad_out: Tensor, pre_activation: Tensor, activation: str | None, negative_slope: float
) -> Tensor:
    """Gradient with respect to the pre-activation, given the output gradient."""
    if not activation:
        return grad_out
    slope = 0.0 if activation == "relu" else negative_slope
    return torch.where(pre_activation > 0, grad_out, grad_out * slope)
