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
import math
from types import ModuleType

import torch
from torch import Tensor

from ._checks import AFFINE_NAMES, non_finite_error

# The windowed products compiled (csrc/cpu/windowed.c); the PyTorch ones below stand in without it.
_compiled: ModuleType | None = None
_COMPILED_ERROR = ""
try:
    from . import _cpu

    _compiled = _cpu
except ImportError as _error:
    _COMPILED_ERROR = str(_error)

__all__ = [
    "compute_dtype",
    "as_dtype",
    "stack_affines",
    "signatures",
    "correlation",
    "correlation_from_stack",
    "correlation_sum",
    "recalibration_state",
    "recalibrated_state",
    "recalibrate",
    "recalibrate_grad",
    "WINDOWED_MIN_CHANNELS",
    "COMPILED_WINDOWED_MIN_CHANNELS",
    "uses_windows",
    "state_rows",
    "windowed_state",
    "CompiledWindows",
    "compiled_windows",
    "compiled_windows_status",
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
    stacked = torch.stack((weight, bias, weight_target, bias_target))
    if stacked.requires_grad:  # not under no_grad (an autograd Function's forward): one operator less
        stacked = stacked.detach()
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
    affines = _checked_stack("correlation", weight, bias, weight_target, bias_target)
    return correlation_from_stack(affines, eps, temperature)


def correlation_sum(
    weight: Tensor,
    bias: Tensor,
    weight_target: Tensor,
    bias_target: Tensor,
    eps: float = 1e-5,
    temperature: float = 1.0,
) -> float:
    """The sum of the entries of :func:`correlation`'s ``S`` (AC-Corr's layer
    score), as ``S`` applied to the ones vector: without forming ``S`` for a
    wide layer."""
    affines = _checked_stack("correlation_sum", weight, bias, weight_target, bias_target)
    state = recalibration_state(affines, eps, temperature)
    ones = torch.ones_like(affines[:1])
    return float((recalibrate(state, ones, temperature) - ones).sum())


def _checked_stack(caller: str, weight: Tensor, bias: Tensor, weight_target: Tensor,
                   bias_target: Tensor) -> Tensor:
    """:func:`stack_affines` of the public functions' arguments, checked first."""
    _check_affine_arguments(caller, weight, bias, weight_target, bias_target)
    return stack_affines(weight, bias, weight_target, bias_target)


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


# From this many channels on, the torch backend, effective_affine and AC-Corr
# apply S by windows over the sorted source signatures (O(C log C) time, O(C)
# memory) instead of forming the C x C matrix: the crossovers measured on a
# CPU (the README gives the numbers). The windowed products as PyTorch
# operations win from 1024 channels; compiled (CPU tensors, when installed)
# they won at every width measured, from 32 channels (a step 0.69x the dense
# one there, 0.38x at 512). Narrower layers keep the dense S, which also keeps
# a window state (6, 11 or 16 rows) from ever being square.
WINDOWED_MIN_CHANNELS = 1024
COMPILED_WINDOWED_MIN_CHANNELS = 32


def _compiled_on(device: torch.device) -> bool:
    """Whether the compiled windowed products run tensors on ``device``."""
    return _compiled is not None and device.type == "cpu"


def _compiled_for(t: Tensor) -> ModuleType | None:
    """The compiled windowed products when they take ``t`` (a state or its rows), else None."""
    # _compiled_on's test inline: this runs twice per training step.
    return _compiled if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) else None


def uses_windows(channels: int, device: torch.device) -> bool:
    """Whether a layer of ``channels`` channels with parameters on ``device``
    applies S by windows (:func:`recalibration_state`) rather than densely."""
    return channels >= (COMPILED_WINDOWED_MIN_CHANNELS if _compiled_on(device) else WINDOWED_MIN_CHANNELS)


def compiled_windows_status() -> str:
    """One line on the compiled windowed products: where they load from, or why not."""
    if _compiled is None:
        return f"not built ({_COMPILED_ERROR}); the PyTorch version runs instead"
    return f"built ({_compiled.__file__})"


def recalibration_state(affines: Tensor, eps: float = 1e-5, temperature: float = 1.0) -> Tensor:
    """What :func:`recalibrate` and :func:`recalibrate_grad` need of the ``(4, C)``
    rows made by :func:`stack_affines`: the dense ``S`` (``(C, C)``) below
    the width where the windowed form wins (:func:`uses_windows`), else the
    ``(6, C)`` :func:`windowed_state`, from which the windowed products
    rebuild S's action in O(C log C) without forming it."""
    if not uses_windows(affines.shape[1], affines.device):
        return correlation_from_stack(affines, eps, temperature)
    with _full_precision(affines.device):
        return windowed_state(signatures(affines[0::2], affines[1::2], eps))


def recalibrated_state(affines: Tensor, eps: float = 1e-5, temperature: float = 1.0) -> Tensor:
    """:func:`recalibration_state` of the ``(4, C)`` rows made by
    :func:`stack_affines` with the effective affine ``(I + S) [gamma_t, beta_t]``
    as two more rows (what the torch backend keeps for its backward): in one
    call of the compiled module for a wide layer on the CPU, whose state then
    carries what the backward's product would build again (see
    :func:`state_rows`). That call checks the rows for NaN and infinity
    first and raises a ValueError naming them; the other forms give NaN."""
    _check_rows("recalibrated_state", "affines", affines, 4)
    windows = compiled_windows(affines)
    if windows is not None:
        return windows.recalibrated(affines.contiguous(), eps, temperature, "recalibrated_state")
    state = recalibration_state(affines, eps, temperature)
    return torch.cat((state, recalibrate(state, affines[2:], temperature)))


def _check_rows(caller: str, name: str, rows: Tensor, count: int) -> None:
    """A ``(count, C)`` floating-point tensor, as the compiled products read it."""
    if rows.dim() != 2 or rows.shape[0] != count or not rows.is_floating_point():
        raise ValueError(f"{caller}: {name} must be a floating-point ({count}, C) tensor, got "
                         f"{tuple(rows.shape)} {rows.dtype}")


def _is_windowed(state: Tensor) -> bool:
    # A window state (6 rows, or 11 or 16 with the compiled cache) against a square S:
    # windows start above 16 channels.
    return state.shape[0] != state.shape[1]


def recalibrate(state: Tensor, affine_rows: Tensor, temperature: float = 1.0) -> Tensor:
    """``(I + S) v`` for each row ``v`` of ``affine_rows`` (shape ``(k, C)``), in ``state.dtype``;
    ``state`` is ``S`` or what :func:`recalibration_state` gives (with the same temperature).

    With rows ``[gamma_t, beta_t]`` this gives the effective affine ``[W, B]``.
    Differentiable with respect to ``affine_rows`` (``S`` is a constant).
    """
    with _full_precision(state.device):
        rows = as_dtype(affine_rows, state.dtype)
        if _is_windowed(state):
            if torch.is_grad_enabled() and rows.requires_grad:
                return _WindowedRecalibration.apply(state, rows, temperature)
            return _windowed_product(state, rows, temperature, transposed=False)
        return torch.addmm(rows, rows, state.t())


def recalibrate_grad(state: Tensor, grad_rows: Tensor, temperature: float = 1.0) -> Tensor:
    """``(I + S)^T g`` for each row ``g`` of ``grad_rows``: target-affine gradients
    from the gradients of the effective affine (``state`` as for :func:`recalibrate`)."""
    with _full_precision(state.device):
        rows = as_dtype(grad_rows, state.dtype)
        if _is_windowed(state):
            return _windowed_product(state, rows, temperature, transposed=True)
        return torch.addmm(rows, rows, state)


def _window_edges(u: Tensor, y_t: Tensor, radius: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the window ``[lo, hi)`` of the sorted ``u`` within ``radius`` of
    ``y_t`` by the rule ``|y_t - u| <= radius`` as rounded, from estimates a
    few positions off at most (searches on ``y_t -+ radius``, which round
    differently): each edge is walked until the entry before it is outside
    and the one at it inside (``lo``), or the other way round (``hi``)."""
    count = u.shape[0]
    lo, hi = lo.clamp(0, count), hi.clamp(0, count)
    if u.device.type == "meta":  # shapes only: no values to walk by
        return lo, hi
    while True:
        at = torch.stack((lo - 1, lo, hi - 1, hi)).clamp_(0, count - 1)
        v = u[at]
        kept = (y_t - v).abs() <= radius
        # The left edge: u >= y_t or kept, false then true; the right edge: u > y_t and not kept.
        starts = (v[:2] >= y_t) | kept[:2]
        ends = (v[2:] > y_t) & ~kept[2:]
        lo_step = ((lo < count) & ~starts[1]).long() - ((lo > 0) & starts[0]).long()
        hi_step = ((hi < count) & ~ends[1]).long() - ((hi > 0) & ends[0]).long()
        if not (lo_step.any() or hi_step.any()):
            return lo, hi
        lo, hi = lo + lo_step, hi + hi_step


# The widest range of signatures, in units of T, whose softmax factors are
# taken in linear scale (about the range's middle): exp(+-_LINEAR_SPAN / 2) and
# the row sums of C such products stay far inside float64's range.
_LINEAR_SPAN = 400.0
# Rows of a wide layer's state: y_s, y_t, the sorting order of y_s and each
# row's window edges lo, mid, hi (positions < 2^24, exact in float32).
WINDOW_ROWS = 6
# What the compiled forward adds to the state for the backward: float64 rows
# (the weights at the window edges and the neighbours' steps), bit for bit.
CACHE_DOUBLES = 5
if _compiled is not None and (getattr(_compiled, "WINDOW_ROWS", None), getattr(_compiled, "CACHE_DOUBLES", None)
                              ) != (WINDOW_ROWS, CACHE_DOUBLES):
    # Built from other sources: refused, never misread.
    _compiled, _COMPILED_ERROR = None, "acnorm_fused._cpu numbers the window state's rows differently"


def _cached_state_rows(dtype: torch.dtype) -> int:
    """Rows of a window state with the compiled forward's cache, in ``dtype``."""
    return WINDOW_ROWS + CACHE_DOUBLES * 8 // (8 if dtype == torch.float64 else 4)


def state_rows(channels: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows of what :func:`recalibrated_state` gives before its last two (the
    dense S, or a window state, with the compiled forward's cache on a CPU)."""
    if not uses_windows(channels, device):
        return channels
    return _cached_state_rows(dtype) if _compiled_on(device) else WINDOW_ROWS


class CompiledWindows:
    """The compiled windowed C x C step (``csrc/cpu/windowed.c``) for one width
    and dtype on the CPU, as :func:`recalibrated_state` and
    :func:`recalibrate_grad` run it for a wide layer: what those decide and
    check per call is decided once, for a caller that runs many steps of the
    same layer (the torch backend's launch plans). Rows are given as one
    contiguous ``(k, C)`` tensor or as a tuple of k contiguous ``(C,)`` rows,
    all in this dtype: the separate rows need no stacking."""

    def __init__(self, module: ModuleType, channels: int, dtype: torch.dtype):
        self.module = module
        self.channels = channels
        self.dtype = dtype
        self.double = dtype == torch.float64
        self.state_rows = _cached_state_rows(dtype)

    def recalibrated(self, affines: Tensor | tuple[Tensor, ...], eps: float, temperature: float,
                     caller: str) -> Tensor:
        """:func:`recalibrated_state` of the four affine rows. They are checked for
        NaN and infinity first, by the compiled call: a ValueError naming
        ``caller`` and the parameters, before anything is written."""
        out = torch.empty((self.state_rows + 2, self.channels), dtype=self.dtype)
        non_finite = self.module.window_recalibration(self.channels, self.double, _addresses(affines), eps,
                                                      temperature, out.data_ptr())
        if non_finite:
            raise non_finite_error(caller, [name for row, name in enumerate(AFFINE_NAMES) if non_finite >> row & 1])
        return out

    def product(self, state: Tensor, state_rows: int, rows: Tensor | tuple[Tensor, ...], temperature: float,
                transposed: bool, out: Tensor | tuple[Tensor, ...]) -> None:
        """``(I + S) v`` (or ``(I + S)^T g`` when ``transposed``) of each row into
        ``out`` (which may be ``rows``), S from the contiguous window state whose
        first ``state_rows`` rows ``state`` holds (6, or with the cache)."""
        count = rows.shape[0] if isinstance(rows, Tensor) else len(rows)
        addresses = _addresses(rows)
        self.module.window_product(self.channels, self.double, state.data_ptr(), state_rows, temperature, count,
                                   addresses, addresses if out is rows else _addresses(out), transposed)

    def grad_in_place(self, aux: Tensor, grad_rows: Tensor | tuple[Tensor, ...], temperature: float) -> None:
        """Overwrite ``grad_rows`` with :func:`recalibrate_grad` of the state in
        ``aux`` (what :meth:`recalibrated` gave)."""
        self.product(aux, self.state_rows, grad_rows, temperature, True, grad_rows)


def _addresses(rows: Tensor | tuple[Tensor, ...]) -> int | tuple[int, ...]:
    """What the compiled module takes for rows: one address, or one per row."""
    return rows.data_ptr() if isinstance(rows, Tensor) else tuple([row.data_ptr() for row in rows])


def compiled_windows(affines: Tensor) -> CompiledWindows | None:
    """The :class:`CompiledWindows` for a layer whose affine rows (or any one of
    them) are ``affines``, in the compute dtype, when its C x C step runs
    compiled; else None."""
    module = _compiled_for(affines)
    if module is None or not uses_windows(affines.shape[-1], affines.device):
        return None
    return CompiledWindows(module, affines.shape[-1], affines.dtype)


def windowed_state(signature_rows: Tensor) -> Tensor:
    """The ``(6, C)`` state of the windowed products, from the signature rows
    ``[y_s, y_t]``: those rows, the order that sorts ``y_s`` and per row ``i`` the
    window ``[lo_i, hi_i)`` of sorted positions that S keeps (the kernels'
    rule ``|y_t[i] - y_s[j]| <= |y_t[i] - y_s[i]|``, ties kept) and ``mid_i``,
    the first sorted position with ``y_s >= y_t[i]``."""
    _check_rows("windowed_state", "signature_rows", signature_rows, 2)
    compiled = _compiled_for(signature_rows)
    if compiled is not None:
        rows = signature_rows.contiguous()
        state = rows.new_empty((WINDOW_ROWS, rows.shape[1]))
        compiled.window_state(rows.shape[1], rows.dtype == torch.float64, rows.data_ptr(), state.data_ptr())
        return state
    y_s, y_t = signature_rows[0], signature_rows[1]
    u, order = torch.sort(y_s, stable=True)
    # Decided in the signatures' dtype, as the dense S and the kernels decide it;
    # the searches only estimate the edges, which are then walked to the rule exactly.
    radius = (y_t - y_s).abs()
    mid = torch.searchsorted(u, y_t)
    lo, hi = _window_edges(u, y_t, radius, torch.searchsorted(u, y_t - radius),
                           torch.searchsorted(u, y_t + radius, right=True))
    return torch.cat((signature_rows, torch.stack((order, lo, mid, hi)).to(signature_rows.dtype)))


def _exclusive_cumsum(values: Tensor) -> Tensor:
    """``out[..., m] = sum(values[..., :m])``, ``m`` in ``[0, C]``."""
    out = values.new_zeros((*values.shape[:-1], values.shape[-1] + 1))
    torch.cumsum(values, dim=-1, out=out[..., 1:])
    return out


def _suffix_cumsum(values: Tensor) -> Tensor:
    """``out[..., m] = sum(values[..., m:])``, ``m`` in ``[0, C]``."""
    out = values.new_zeros((*values.shape[:-1], values.shape[-1] + 1))
    out[..., :-1] = values.flip(-1).cumsum(-1).flip(-1)
    return out


def _exclusive_prefix(logs: Tensor) -> Tensor:
    """``out[..., m] = log(sum(exp(logs[..., :m])))``, ``m`` in ``[0, C]``."""
    out = logs.new_full((*logs.shape[:-1], logs.shape[-1] + 1), -math.inf)
    out[..., 1:] = torch.logcumsumexp(logs, dim=-1)
    return out


def _suffix(logs: Tensor) -> Tensor:
    """``out[..., m] = log(sum(exp(logs[..., m:])))``, ``m`` in ``[0, C]``."""
    out = logs.new_full((*logs.shape[:-1], logs.shape[-1] + 1), -math.inf)
    out[..., :-1] = torch.logcumsumexp(logs.flip(-1), dim=-1).flip(-1)
    return out


def _signed_logs(values: Tensor, scale: Tensor) -> Tensor:
    """``(2k, C)``: ``scale + log|v|`` of the positive entries of each row of ``values``,
    then of the negative ones; ``-inf`` elsewhere (zeros add nothing)."""
    logs = values.abs().log() + scale
    minus_inf = torch.tensor(-math.inf, dtype=logs.dtype, device=logs.device)
    return torch.cat((torch.where(values > 0, logs, minus_inf), torch.where(values < 0, logs, minus_inf)))


def _signed_sum(exponents: Tensor, k: int) -> Tensor:
    """Rows ``exp(positive) - exp(negative)`` of the ``(2k, ...)`` stack made from :func:`_signed_logs`."""
    parts = exponents.exp()
    return parts[:k] - parts[k:]


def _windowed_product(state: Tensor, rows: Tensor, temperature: float, transposed: bool) -> Tensor:
    """``(I + S) v`` (or ``(I + S)^T g`` when ``transposed``) for each row of ``rows``,
    S given by a :func:`windowed_state`, in ``state.dtype``: compiled where it
    is installed and takes the state, else by :class:`_Windows`."""
    if rows.dim() != 2 or rows.shape[1] != state.shape[1] or rows.device != state.device:
        raise ValueError(f"recalibrate/recalibrate_grad: rows must be (k, {state.shape[1]}) on {state.device} "
                         "as the state is, "
                         f"got {tuple(rows.shape)} on {rows.device}")
    compiled = _compiled_for(state)
    if compiled is not None:
        rows = rows.contiguous()
        out = torch.empty_like(rows)
        CompiledWindows(compiled, state.shape[1], state.dtype).product(
            state.contiguous(), state.shape[0], rows, temperature, transposed, out)
        return out
    windows = _Windows(state, temperature)
    product = windows.rows_times_s_transposed(rows) if transposed else windows.rows_times_s(rows)
    return rows + product.to(state.dtype)


class _WindowedRecalibration(torch.autograd.Function):
    """``(I + S) v`` per row ``v``, from the window state; differentiable in ``v``
    (its gradient is ``(I + S)^T g``), as ``v @ (I + S).t()`` is with a dense ``S``."""

    @staticmethod
    def forward(ctx, state: Tensor, rows: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(state)
        ctx.temperature = temperature
        return _windowed_product(state, rows, temperature, transposed=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        state, = ctx.saved_tensors
        return None, _windowed_product(state, grad, ctx.temperature, transposed=True), None


class _Windows:
    """S's action from the window state alone (:func:`windowed_state`).

    Row ``i`` of S keeps a window ``[lo_i, hi_i)`` of the sorted source
    signatures ``u`` around ``mid_i``, the first ``u >= y_t[i]``. Left of
    ``mid_i`` the softmax numerator is ``exp((u - y_t[i]) / T)``, right of it
    ``exp((y_t[i] - u) / T)``: each a product of a per-row and a per-column
    factor, so sums over a window are differences of prefix sums (left) and
    suffix sums (right), each dominated by its terms next to ``y_t[i]``, so the
    differences do not cancel; S^T's sums over the rows whose window holds a
    channel are the same differences over the rows ordered by window edge.
    Everything runs in float64: with the factors taken about the middle of the
    signatures' range while that range is at most :data:`_LINEAR_SPAN` times
    T, else in the log domain, sign by sign (the factors alone overflow for
    signatures far beyond T: a near-zero gamma gives signatures in the
    thousands).
    """

    def __init__(self, state: Tensor, temperature: float):
        y_s, y_t = state[0].double(), state[1].double()
        self.order = state[2].long()
        self.lo, self.mid, self.hi = state[3:6].long()
        u = y_s[self.order]
        low = torch.minimum(u[0], y_t.min())
        high = torch.maximum(u[-1], y_t.max())
        # Meta tensors (shape inference) have no range to measure; either way gives the shapes.
        self.linear = y_s.device.type == "meta" or float(high - low) <= _LINEAR_SPAN * temperature
        centre = (high + low) / 2 if self.linear else torch.zeros((), dtype=torch.float64)
        self.scaled_u = (u - centre) / temperature
        self.scaled_t = (y_t - centre) / temperature
        if self.linear:
            self.column_left = self.scaled_u.exp()  # exp((u - centre) / T)
            self.column_right = self.column_left.reciprocal()
            self.row_left = self.scaled_t.neg().exp()  # exp(-(y_t - centre) / T)
            self.row_right = self.row_left.reciprocal()
            z = (self.row_left * _exclusive_cumsum(self.column_left)[self.mid]
                 + self.row_right * _suffix_cumsum(self.column_right)[self.mid])
            self.inverse_z = z.reciprocal()
        else:
            left = _exclusive_prefix(self.scaled_u)[self.mid] - self.scaled_t
            right = _suffix(-self.scaled_u)[self.mid] + self.scaled_t
            self.log_z = torch.logaddexp(left, right)  # the softmax denominators, whole rows

    def rows_times_s(self, rows: Tensor) -> Tensor:
        """``S v`` for each row ``v`` of ``rows`` (``(k, C)``), float64."""
        values = rows.double()[:, self.order]
        if self.linear:
            prefix = _exclusive_cumsum(values * self.column_left)
            suffix = _suffix_cumsum(values * self.column_right)
            kept = (self.row_left * (prefix[:, self.mid] - prefix[:, self.lo])
                    + self.row_right * (suffix[:, self.mid] - suffix[:, self.hi]))
            return kept * self.inverse_z
        k = rows.shape[0]
        prefix = _exclusive_prefix(_signed_logs(values, self.scaled_u))
        suffix = _suffix(_signed_logs(values, -self.scaled_u))
        to_row = -self.scaled_t - self.log_z
        from_row = self.scaled_t - self.log_z
        return (_signed_sum(prefix[:, self.mid] + to_row, k) - _signed_sum(prefix[:, self.lo] + to_row, k)
                + _signed_sum(suffix[:, self.mid] + from_row, k) - _signed_sum(suffix[:, self.hi] + from_row, k))

    def rows_times_s_transposed(self, rows: Tensor) -> Tensor:
        """``S^T g`` for each row ``g`` of ``rows`` (``(k, C)``), float64, in the
        channels' own order: for the channel at sorted position p, the rows
        with ``lo <= p < mid`` hold it on their left, those with ``mid <= p <
        hi`` on their right."""
        g = rows.double()
        if self.linear:
            count = g.shape[1]
            # Per window edge, the rows' factors: + at mid and - at lo on the left
            # (summed over edges after p), + at mid and - at hi on the right (up to p).
            left_rows = g * (self.row_left * self.inverse_z)
            right_rows = g * (self.row_right * self.inverse_z)
            left = g.new_zeros((g.shape[0], count + 1)).index_add_(1, self.mid, left_rows)
            left.index_add_(1, self.lo, left_rows.neg())
            right = g.new_zeros((g.shape[0], count + 1)).index_add_(1, self.mid, right_rows)
            right.index_add_(1, self.hi, right_rows.neg())
            held = (_suffix_cumsum(left[:, 1:])[:, :-1] * self.column_left
                    + right[:, :-1].cumsum(1) * self.column_right)
        else:
            k = g.shape[0]
            positions = torch.arange(g.shape[1], device=g.device)
            to_left = _signed_logs(g, -self.scaled_t - self.log_z)  # rows' factor, left of their centre
            to_right = _signed_logs(g, self.scaled_t - self.log_z)

            def rows_past(edge: Tensor) -> Tensor:
                """Per sorted position p, the signed log-sum of ``to_left`` over rows with ``edge > p``."""
                edges, by_edge = torch.sort(edge, stable=True)
                return _suffix(to_left[:, by_edge])[:, torch.searchsorted(edges, positions, right=True)]

            def rows_up_to(edge: Tensor) -> Tensor:
                """Per sorted position p, the signed log-sum of ``to_right`` over rows with ``edge <= p``."""
                edges, by_edge = torch.sort(edge, stable=True)
                return _exclusive_prefix(to_right[:, by_edge])[:, torch.searchsorted(edges, positions, right=True)]

            held = (_signed_sum(rows_past(self.mid) + self.scaled_u, k)
                    - _signed_sum(rows_past(self.lo) + self.scaled_u, k)
                    + _signed_sum(rows_up_to(self.mid) - self.scaled_u, k)
                    - _signed_sum(rows_up_to(self.hi) - self.scaled_u, k))
        out = torch.empty_like(g)
        out[:, self.order] = held
        return out


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
    affines = _checked_stack("effective_affine", weight, bias, weight_target, bias_target)
    state = recalibration_state(affines, eps, temperature)
    w, b = recalibrate(state, torch.stack((weight_target, bias_target)), temperature)
    return w, b
