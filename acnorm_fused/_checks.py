"""Input validation shared by the functional op and the modules.

Every message starts with the name of the caller (a module's class name or
``ac_norm``) so that a failure deep in a network says which layer failed.
Nothing here reads tensor values except :func:`check_finite_affines`.
"""

from __future__ import annotations

import math
import numbers
from collections import deque

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "leaky_relu")
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_number(value) -> bool:
    """A real number, Python's or numpy's (``numbers.Real``); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_hyperparameters(
    name: str,
    *,
    eps: float,
    momentum: float | None,
    temperature: float,
    activation: str | None,
    negative_slope: float,
) -> None:
    """Reject hyper-parameters that would make the op meaningless."""
    if not (_is_number(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive finite number, got {eps!r}")
    if momentum is not None and not (
        _is_number(momentum) and 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a positive finite number, got {temperature!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{name}: activation must be None, 'relu' or 'leaky_relu', got {activation!r}"
        )
    if not (_is_number(negative_slope) and math.isfinite(negative_slope)):
        raise ValueError(f"{name}: negative_slope must be a finite number, got {negative_slope!r}")


def check_temperature(name: str, temperature: float, dtype: torch.dtype) -> None:
    """Reject a temperature that is zero or subnormal in ``dtype``, the dtype the
    correlation runs in: ``|d| / T`` would then be infinite and S NaN."""
    tiny = torch.finfo(dtype).tiny
    if temperature < tiny:
        raise ValueError(
            f"{name}: temperature {temperature!r} is below the smallest normal {dtype} ({tiny:.3g}), "
            f"the dtype the correlation runs in; it would divide by zero")


def check_input(
    name: str,
    x: Tensor,
    *,
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    synced: bool = False,
) -> None:
    """Check ranks, shapes, dtypes and devices of the input and the parameters.

    ``synced``: the batch statistics cover the batches of several processes,
    so this one may hold few values, or none.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor input, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"{name}: expected an input of 2 to 5 dimensions (N, C, *spatial), got {x.dim()}D "
            f"with shape {tuple(x.shape)}"
        )
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name}: input dtype must be float32, float16, bfloat16 or float64, got {x.dtype}"
        )
    if weight.dim() != 1:
        raise ValueError(f"{name}: weight must be 1-D (one entry per channel), got {tuple(weight.shape)}")
    channels = weight.shape[0]
    if x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected input with {channels} channels (dim 1), got shape {tuple(x.shape)}"
        )
    affine = {"weight": weight, "bias": bias, "weight_target": weight_target, "bias_target": bias_target}
    stats = {"running_mean": running_mean, "running_var": running_var}
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must be given together")
    for pname, tensor in {**affine, **stats}.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != (channels,):
            raise ValueError(
                f"{name}: {pname} must have shape ({channels},), got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: {pname} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.device:
            raise RuntimeError(
                f"{name}: {pname} is on {tensor.device} but the input is on {x.device}"
            )
    dtypes = {t.dtype for t in affine.values()}
    if len(dtypes) > 1:
        raise TypeError(
            f"{name}: weight, bias, weight_target and bias_target must share one dtype, got "
            + ", ".join(f"{k}={v.dtype}" for k, v in affine.items())
        )
    if (x.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(
            f"{name}: float64 inputs and float64 parameters go together (input {x.dtype}, "
            f"parameters {weight.dtype}); convert the module with .double() or .float()"
        )
    if not training and running_mean is None:
        raise ValueError(f"{name}: running_mean and running_var are required when training=False")
    if training and not synced:
        values_per_channel = x.numel() // max(x.shape[1], 1)
        if values_per_channel <= 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training, got input of "
                f"shape {tuple(x.shape)}"
            )


AFFINE_NAMES = ("weight", "bias", "weight_target", "bias_target")


def check_finite_affines(name: str, affines: Tensor) -> None:
    """Raise if the stacked ``(4, C)`` affine rows (see
    :func:`acnorm_fused.correlation.stack_affines`) hold NaN or infinity.

    On a CPU the check is immediate. On a GPU a host read would make every
    training step wait for the GPU to finish the work queued before it, so
    the rows are copied to pinned host memory with the step and checked by a
    later call on the same GPU, once the copy has landed; that call raises
    naming the layer whose parameters were not finite, and the call that saw
    them returns its (NaN) output. Running statistics do not depend on the
    parameters, so nothing is corrupted meanwhile.
    """
    if affines.is_meta:
        return  # no values to check: shape inference, deferred initialisation
    if affines.is_cuda:
        _queue_finite_check(name, affines)
        return
    _check_host_rows(name, affines)


def check_finite_affines_now(name: str, affines: Tensor) -> None:
    """:func:`check_finite_affines` read at once on any device (for one-off work
    such as folding a model or scoring a checkpoint, where waiting costs nothing)."""
    _check_host_rows(name, affines)


def _check_host_rows(name: str, affines: Tensor, note: str = "") -> None:
    # One reduction and one read on the fast path: a finite sum means finite
    # entries; an overflowing sum of finite entries is not an error.
    if math.isfinite(affines.sum().item()):
        return
    finite_rows = torch.isfinite(affines).all(dim=1).tolist()
    bad = [pname for pname, finite in zip(AFFINE_NAMES, finite_rows) if not finite]
    if bad:
        raise non_finite_error(name, bad, note)


def non_finite_error(name: str, bad: list[str], note: str = "") -> ValueError:
    """The error for affines ``bad`` (names of :data:`AFFINE_NAMES`) holding NaN or infinity."""
    return ValueError(f"{name}: {', '.join(bad)} contain(s) NaN or infinite values{note}")


def raise_for_status(name: str, status: int, bits: tuple[int, ...], late: bool = False) -> None:
    """Raise :func:`non_finite_error` for a kernel's status word (``bits[k]`` set:
    affine ``AFFINE_NAMES[k]`` is not finite); ``late``: found after the call
    that saw the values returned."""
    if status:
        bad = [pname for pname, bit in zip(AFFINE_NAMES, bits) if status & bit]
        raise non_finite_error(name, bad, _LATE_NOTE if late else "")


# Per GPU, the queued checks not read yet: (event after the copy, pinned copy
# of the rows, caller), oldest first.
_PENDING_CHECKS: dict[torch.device, deque[tuple[torch.cuda.Event, Tensor, str]]] = {}
# Past this many unread checks the oldest is waited for: a bound on how late
# an error can come when the host runs far ahead of the GPU.
_MAX_PENDING_CHECKS = 8
_LATE_NOTE = (" (found after that call returned: on a GPU the check is read by a later call so "
              "that no step waits for the GPU)")


def _queue_finite_check(name: str, affines: Tensor) -> None:
    # A host read is impossible while a CUDA graph is being captured; the
    # parameters were checked by the eager calls that precede any capture.
    if torch.cuda.is_current_stream_capturing():
        return
    pending = _PENDING_CHECKS.setdefault(affines.device, deque())
    while pending and (len(pending) >= _MAX_PENDING_CHECKS or pending[0][0].query()):
        event, rows, caller = pending.popleft()
        event.synchronize()
        _check_host_rows(caller, rows, _LATE_NOTE)
    # One asynchronous copy and the check on the host later: fewer launches
    # than reducing on the GPU, and launches are what a small step costs.
    rows = torch.empty(affines.shape, dtype=affines.dtype, pin_memory=True)
    rows.copy_(affines, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(affines.device))
    pending.append((event, rows, name))
