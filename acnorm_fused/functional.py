"""``ac_norm``: input checks, backend dispatch and the running statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_finite_affines, check_hyperparameters, check_input, check_temperature
from .backends import resolve_backend
from .backends.geometry import is_dense
from .backends.reference import ac_norm_reference
from .correlation import compute_dtype, stack_affines
from .ops import ac_norm_forward

__all__ = ["ac_norm", "checked_backend", "effective_momentum", "run_checked"]


def effective_momentum(momentum: float, double_update: bool = True) -> float:
    """Factor of the one running-statistics update equal to AC-Norm's per-step update.

    The authors' code moves the running statistics twice per training step
    with the same batch statistics, which is one update with
    ``1 - (1 - momentum) ** 2``; ``double_update=False`` gives BatchNorm's
    single update.
    """
    return 1.0 - (1.0 - momentum) ** 2 if double_update else momentum


def _dense_layout(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels-last; a contiguous copy otherwise."""
    return x if is_dense(x) else x.contiguous()


def ac_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    temperature: float = 1.0,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
    *,
    double_update: bool = True,
    caller: str = "ac_norm",
) -> Tensor:
    """Affine Collaborative Normalization of ``x`` of shape ``(N, C, *spatial)``.

    Normalises ``x`` per channel with its batch statistics (``training=True``)
    or the running statistics, and applies the effective affine
    ``W = (I + S) weight_target``, ``B = (I + S) bias_target`` where ``S`` is
    the sparse correlation between the target and the frozen source affine
    (``weight``, ``bias``); see :func:`acnorm_fused.correlation`. An optional
    ``activation`` (``"relu"`` or ``"leaky_relu"`` with ``negative_slope``) is
    fused into the output.

    In training, ``running_mean`` and ``running_var`` (when given) are updated
    in place as the authors' code does: twice per call with ``momentum``,
    i.e. once with :func:`effective_momentum`; ``double_update=False`` gives
    BatchNorm's single update. Gradients flow to ``x``, ``weight_target`` and
    ``bias_target`` only.

    ``backend`` is ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or
    ``"cuda"``; the ``ACNORM_BACKEND`` environment variable overrides
    ``"auto"``. ``caller`` names the module in error messages.
    """
    backend = checked_backend(
        x, running_mean, running_var, weight, bias, weight_target, bias_target, training, momentum,
        eps, temperature, activation, negative_slope, backend, caller)
    return run_checked(
        backend, x, running_mean, running_var, weight, bias, weight_target, bias_target, training,
        momentum, eps, temperature, activation, negative_slope, double_update, caller)


def checked_backend(
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
    backend: str,
    caller: str,
    synced: bool = False,
) -> str:
    """Every check of :func:`ac_norm` but the finite affines: the concrete backend
    that runs the call, or a clear error naming ``caller``. ``synced``: as for
    :func:`acnorm_fused._checks.check_input`, this call's batch may hold few
    values per channel, or none."""
    if momentum is None:
        raise ValueError(
            f"{caller}: momentum must be a number; the cumulative average of momentum=None "
            "is a module option (ACNorm*d(momentum=None))"
        )
    check_hyperparameters(
        caller, eps=eps, momentum=momentum, temperature=temperature,
        activation=activation, negative_slope=negative_slope,
    )
    check_input(
        caller, x, weight=weight, bias=bias, weight_target=weight_target,
        bias_target=bias_target, running_mean=running_mean, running_var=running_var,
        training=training, synced=synced,
    )
    check_temperature(caller, temperature, compute_dtype(weight.dtype))
    return resolve_backend(backend, x, caller)


def run_checked(
    backend: str,
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
    double_update: bool,
    caller: str,
) -> Tensor:
    """:func:`ac_norm` after :func:`checked_backend` gave ``backend``: the general
    path (the custom op when traced, its eager twin otherwise)."""
    if backend == "reference":
        check_finite_affines(caller, stack_affines(weight, bias, weight_target, bias_target))
        return ac_norm_reference(
            x, running_mean, running_var, weight, bias, weight_target, bias_target,
            training, momentum, eps, temperature, activation, negative_slope, double_update,
        )

    out, _mean, _invstd, new_mean, new_var, _aux = ac_norm_forward(
        _dense_layout(x), weight, bias, weight_target, bias_target, running_mean, running_var,
        training, effective_momentum(momentum, double_update), eps, temperature,
        activation or "", negative_slope, backend, caller,
    )
    if training and running_mean is not None:
        assert running_var is not None  # given together (checked_backend)
        with torch.no_grad():
            torch._foreach_copy_([running_mean, running_var], [new_mean, new_var])
    return out
