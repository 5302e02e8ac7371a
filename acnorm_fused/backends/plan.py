"""Launch plans: a layer's eager path to the kernels, worked out once.

A small layer's eager step costs more on the host than on the GPU, so what
can be decided once is decided once. The first time an AC-Norm layer sees an
input signature (shape, strides, dtype, device, training mode) it runs the
full checks of :func:`acnorm_fused.functional.checked_backend`, so every
error is that of the general path; when a kernel backend (``cuda``,
``triton``) or the ``torch`` backend on a CPU runs the input and the layer's
state is plain (fp32 parameters and buffers, a dense input), it builds a
:class:`LaunchPlan` and keeps it. Later calls with the same signature check
that the parameters and buffers still live where they did, then go straight
to the launches (for ``torch``: to the backend's forward and backward, with
the settings fixed, past the checks and the custom op's layers):

- the launch geometry, the settings and the compiled module's ``StepPlan``
  are fixed in the plan;
- one scratch allocation per pass holds every per-channel array (partials,
  statistics, ``aux``, the dx coefficients, the target gradients), each at a
  fixed offset;
- :class:`PlannedStep` is an autograd Function of the three differentiable
  tensors that saves x alone (the forward's scratch rides on the context);
- on the ``cuda`` backend each pass is the single-pass kernel where the GPU
  holds the layer (:func:`.cuda.single_pass`), else the multi-pass kernels;
- the finalise kernel (or the single pass) moves the running statistics in
  place and checks the four affines for NaN and infinity on its way (a
  status word): on a CPU the call raises at once, before the counter moves,
  and the kernel has left the running statistics alone; on a GPU the word is
  copied to pinned memory and read by the layer's next call, which raises,
  as the general path's deferred check does.

Anything a plan does not cover takes the general path. A layer drops its
plans when any of its attributes is set (settings, parameters) and a plan
is rebuilt when a parameter or buffer has moved (``.to()``, ``.data =``).
The backend an ``"auto"`` layer resolves to, ``ACNORM_BACKEND`` included, is
decided when its plan is built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._checks import check_finite_affines, raise_for_status
from ..correlation import stack_affines
from . import REGISTRY
from .abi import ACTIVATION_CODES, AUX_ROWS, DTYPE_CODES, NON_FINITE_BITS
from .config import StepConfig
from .geometry import geometry, is_dense
from .multipass import on_device

__all__ = ["LaunchPlan", "PlannedStep", "plan_covers"]

_F32 = torch.float32

# A layer's ``(weight, bias, weight_target, bias_target, running_mean, running_var)``.
LayerTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]


def _plain(t: Tensor | None) -> bool:
    return t is None or (t.dtype == _F32 and t.is_contiguous())


def plan_covers(backend: str, x: Tensor, tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether a plan can run ``x`` on ``backend`` with the layer's parameters and
    buffers ``tensors`` (as :meth:`LaunchPlan.tensors_of` orders them), already checked."""
    return (REGISTRY[backend].plans(x) and x.numel() > 0 and is_dense(x)
            and all(_plain(t) for t in tensors))


def _pointers(tensors: LayerTensors) -> tuple[int, ...]:
    w, b, wt, bt, rm, rv = tensors
    return (w.data_ptr(), b.data_ptr(), wt.data_ptr(), bt.data_ptr(),
            0 if rm is None else rm.data_ptr(), 0 if rv is None else rv.data_ptr())


class _ScratchLayout:
    """Where each per-channel fp32 array sits in a pass's scratch buffer, for
    ``fwd_partials`` and ``bwd_partials`` fp32 partial results per channel."""

    def __init__(self, c: int, fwd_partials: int, bwd_partials: int):
        # Forward: statistics partials ((3, C, splits) multi-pass, (4, C, tiles)
        # single-pass), mean, invstd, aux, and the single pass's effective weights W.
        self.fwd_partials, self.fwd_mean = 0, c * fwd_partials
        self.fwd_invstd = self.fwd_mean + c
        self.fwd_aux = self.fwd_invstd + c
        self.fwd_weight = self.fwd_aux + AUX_ROWS * c
        self.fwd_len = self.fwd_weight + c
        # Backward: the target gradients first (returned as views), dW and
        # dB, the dx coefficients, the gradient partials (2, C, splits or tiles).
        self.bwd_grad_target = 0
        self.bwd_grad_affine = 2 * c
        self.bwd_coef = 4 * c
        self.bwd_partials = 6 * c
        self.bwd_len = self.bwd_partials + c * bwd_partials

    def forward_views(self, scratch: Tensor, c: int) -> tuple[Tensor, ...]:
        """``(partials, mean, invstd, aux)`` of a forward scratch, in one operator."""
        partials, mean, invstd, aux, _ = scratch.split_with_sizes((self.fwd_mean, c, c, AUX_ROWS * c, c))
        return partials, mean, invstd, aux.view(AUX_ROWS, c)

    def backward_views(self, scratch: Tensor, c: int) -> tuple[Tensor, ...]:
        """``(grad_weight_target, grad_bias_target, grad_affine, coef, partials)`` of a
        backward scratch, in one operator."""
        return scratch.split_with_sizes((c, c, 2 * c, 2 * c, self.bwd_len - self.bwd_partials))


class _Status:
    """The word the forward finalise writes (non-finite affines), and its host copy."""

    def __init__(self, device: torch.device):
        self.word = torch.zeros(1, dtype=torch.int32, device=device)
        # A GPU's word reaches the host by an asynchronous copy, read by the next call.
        self.host = self.word if device.type == "cpu" else torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.deferred = device.type != "cpu"
        self._value = ctypes.c_int32.from_address(self.host.data_ptr())

    def take(self) -> int:
        """The status the host has, cleared."""
        value = self._value.value
        if value:
            self._value.value = 0
        return value

    def send(self) -> None:
        """Start the copy of a GPU's word to the host, for the next call to take."""
        self.host.copy_(self.word, non_blocking=True)


class LaunchPlan:
    """One layer's kernel launches for one input signature (see the module docstring)."""

    def __init__(self, backend: str, x: Tensor, tensors: LayerTensors, *, caller: str,
                 batch_stats: bool, update_running: bool, counts_batches: bool, momentum: float,
                 eps: float, temperature: float, activation: str, negative_slope: float):
        self.caller = caller
        self.geo = geometry(x)
        self.device = x.device
        self.strides = x.stride()
        self.pointers = _pointers(tensors)
        self.batch_stats = batch_stats
        self.update_running = update_running
        self.counts_batches = counts_batches
        self.momentum, self.eps, self.temperature = momentum, eps, temperature
        self.activation, self.negative_slope = activation, negative_slope
        self.count = float(self.geo.count)
        self.status = _Status(x.device)
        self.launches = _STEPS[backend](self, x)

    @staticmethod
    def key(x: Tensor, training: bool) -> tuple:
        """The input signature a layer keeps one plan for."""
        return (x.shape, x.stride(), x.dtype, x.device, training)

    @staticmethod
    def tensors_of(layer) -> LayerTensors:
        """The layer's ``(weight, bias, weight_target, bias_target, running_mean, running_var)``."""
        params, buffers = layer._parameters, layer._buffers
        return (params["weight"], params["bias"], params["weight_target"], params["bias_target"],
                buffers["running_mean"], buffers["running_var"])

    def run(self, layer, x: Tensor) -> Tensor | None:
        """The layer's output for ``x``, or None when its parameters or buffers have
        moved since the plan was built (the caller then takes the general path)."""
        tensors = self.tensors_of(layer)
        if _pointers(tensors) != self.pointers:
            return None
        out = PlannedStep.apply(self, tensors, x, tensors[2], tensors[3])
        if self.counts_batches:
            layer._buffers["num_batches_tracked"].add_(1)
        return out

    def forward(self, x: Tensor, tensors: LayerTensors) -> tuple[Tensor, Any]:
        """``(out, what the backward needs)``; raises for non-finite affines (see the module docstring)."""
        status = self.status
        if status.deferred:
            raise_for_status(self.caller, status.take(), NON_FINITE_BITS, late=True)
        out, saved = self.launches.forward(x, tensors)
        if status.deferred:
            status.send()
        else:
            raise_for_status(self.caller, status.take(), NON_FINITE_BITS)
        return out, saved

    def backward(self, grad_out: Tensor, x: Tensor, saved) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad_x, grad_weight_target, grad_bias_target)``."""
        return self.launches.backward(grad_out, x, saved)

    def kernel_buffers(self, x: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """A tensor like ``x`` and a scratch of ``length`` fp32 values, for the kernels' passes."""
        return torch.empty_like(x), torch.empty(length, dtype=_F32, device=self.device)

    def in_kernel_layout(self, grad_out: Tensor, x: Tensor) -> Tensor:
        """``grad_out`` with the strides of ``x``: the kernels walk x and dy with the same offsets."""
        return grad_out if grad_out.stride() == self.strides else torch.empty_like(x).copy_(grad_out)


class _CudaLaunches:
    """A plan's passes as two calls of the compiled module (one per pass): the
    single-pass kernels where the GPU holds the layer (see
    :func:`.cuda.single_pass`), else the multi-pass ones."""

    def __init__(self, plan: LaunchPlan, x: Tensor):
        from . import cuda_extension
        from .cuda import module_geometry, module_resident, raw_stream, single_pass

        module = cuda_extension()
        assert module is not None  # the cuda backend runs this plan: the module is installed
        self.plan = plan
        self.module = module
        geo = plan.geo
        self.index = x.device.index if x.is_cuda else -1
        self.resident = fwd, bwd = single_pass(module, geo, x.dtype, self.index)
        self.layout = layout = _ScratchLayout(geo.c, max(3 * geo.splits, 4 * fwd.tiles if fwd else 0),
                                              2 * max(geo.splits, bwd.tiles if bwd else 0))
        self.step = module.StepPlan(
            geometry=module_geometry(module, geo), dtype=DTYPE_CODES[x.dtype],
            activation=ACTIVATION_CODES[plan.activation], slope=plan.negative_slope, count=plan.count,
            momentum=plan.momentum, eps=plan.eps, temperature=plan.temperature,
            batch_stats=plan.batch_stats, update_running=plan.update_running,
            pilot_stride=geo.s if geo.planar else 1, fwd_partials=layout.fwd_partials,
            fwd_mean=layout.fwd_mean, fwd_invstd=layout.fwd_invstd, fwd_aux=layout.fwd_aux,
            fwd_weight=layout.fwd_weight, bwd_partials=layout.bwd_partials,
            bwd_grad_affine=layout.bwd_grad_affine, bwd_coef=layout.bwd_coef,
            bwd_grad_target=layout.bwd_grad_target, fwd_resident=module_resident(module, fwd),
            bwd_resident=module_resident(module, bwd))
        self.raw_stream = raw_stream if x.is_cuda else None
        self.status = plan.status.word.data_ptr()
        self.pointers = plan.pointers
        self.grad_split = (geo.c, geo.c, layout.bwd_len - 2 * geo.c)

    def forward(self, x: Tensor, tensors: LayerTensors) -> tuple[Tensor, Tensor]:
        out, scratch = self.plan.kernel_buffers(x, self.layout.fwd_len)
        # The parameters' and buffers' addresses are the plan's: run() has checked them.
        stream = 0 if self.raw_stream is None else self.raw_stream(self.index)
        self.module.step_forward(self.step, self.index, stream, x.data_ptr(), out.data_ptr(),
                                 scratch.data_ptr(), *self.pointers, self.status)
        return out, scratch

    def backward(self, grad_out: Tensor, x: Tensor, fwd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        grad_out = self.plan.in_kernel_layout(grad_out, x)
        grad_x, bwd = self.plan.kernel_buffers(x, self.layout.bwd_len)
        stream = 0 if self.raw_stream is None else self.raw_stream(self.index)
        self.module.step_backward(self.step, self.index, stream, x.data_ptr(), grad_out.data_ptr(),
                                  grad_x.data_ptr(), fwd.data_ptr(), bwd.data_ptr())
        grad_w, grad_b, _ = bwd.split_with_sizes(self.grad_split)
        return grad_x, grad_w, grad_b


class _TritonLaunches:
    """A plan's passes as launches of the Triton kernels, on views of the scratch.
    Triton launches on the current device: the passes make x's device current."""

    def __init__(self, plan: LaunchPlan, x: Tensor):
        from .triton import TritonKernels

        self.kernels = TritonKernels()
        self.plan = plan
        self.layout = _ScratchLayout(plan.geo.c, 3 * plan.geo.splits, 2 * plan.geo.splits)

    def forward(self, x: Tensor, tensors: LayerTensors) -> tuple[Tensor, Tensor]:
        out, scratch = self.plan.kernel_buffers(x, self.layout.fwd_len)
        with on_device(x):
            self._forward(x, out, scratch, tensors)
        return out, scratch

    def backward(self, grad_out: Tensor, x: Tensor, fwd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        grad_out = self.plan.in_kernel_layout(grad_out, x)
        grad_x, bwd = self.plan.kernel_buffers(x, self.layout.bwd_len)
        with on_device(x):
            return (grad_x, *self._backward(grad_out, x, grad_x, fwd, bwd))

    def _forward(self, x: Tensor, out: Tensor, scratch: Tensor, tensors: LayerTensors) -> None:
        plan, kernels = self.plan, self.kernels
        geo = plan.geo
        partials, mean, invstd, aux = self.layout.forward_views(scratch, geo.c)
        w, b, wt, bt, rm, rv = tensors
        act, slope = plan.activation, plan.negative_slope
        if plan.batch_stats:
            kernels.reduce(geo, x, None, partials, partials, act, slope)
            given = None
        else:
            assert rm is not None and rv is not None  # the running statistics, required then
            given = (rm, None, rv)
        running: tuple[Tensor | None, Tensor | None] = (None, None)
        outputs = (mean, invstd, mean, mean, aux)
        if plan.update_running:
            assert rm is not None and rv is not None  # the plan was built with them
            running, outputs = (rm, rv), (mean, invstd, rm, rv, aux)
        kernels.finalise_forward(
            geo, x, (w, b, wt, bt), partials if plan.batch_stats else None, given, plan.count, *running, outputs,
            plan.momentum, plan.eps, plan.temperature, plan.status.word)
        kernels.elementwise(geo, x, None, out, aux, aux, act, slope)

    def _backward(self, grad_out: Tensor, x: Tensor, grad_x: Tensor, fwd: Tensor,
                  bwd: Tensor) -> tuple[Tensor, Tensor]:
        plan, kernels = self.plan, self.kernels
        geo = plan.geo
        _, _, invstd, aux = self.layout.forward_views(fwd, geo.c)
        grad_w, grad_b, grad_affine, coef, partials = self.layout.backward_views(bwd, geo.c)
        partials = partials.view(2, geo.c, geo.splits)
        act, slope = plan.activation, plan.negative_slope
        kernels.reduce(geo, x, grad_out, partials, aux, act, slope)
        kernels.finalise_backward(partials, None, invstd, aux, grad_affine, coef, plan.count, plan.batch_stats)
        # The kernel writes both rows of the target gradients from grad_w's address on.
        kernels.target_grad(aux, grad_affine, grad_w, plan.temperature)
        kernels.elementwise(geo, x, grad_out, grad_x, aux, coef, act, slope)
        return grad_w, grad_b


class _TorchSteps:
    """A plan's passes as the torch backend's forward and backward
    (:class:`acnorm_fused.backends.pytorch.PreparedStep`), the arithmetic of the
    general path itself: what the plan skips is the checks, the custom op's
    layers and the copies of the running statistics (moved in place, after
    the finite check)."""

    def __init__(self, plan: LaunchPlan, x: Tensor):
        from .pytorch import PreparedStep

        self.plan = plan
        config = StepConfig(plan.batch_stats, plan.momentum, plan.eps, plan.temperature, plan.activation,
                            plan.negative_slope)
        weight = torch.empty(plan.geo.c, dtype=_F32, device=x.device)  # the plan's parameters are fp32
        self.step = PreparedStep(x, weight, config, update_in_place=plan.update_running, caller=plan.caller)

    def forward(self, x: Tensor, tensors: LayerTensors) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        w, b, wt, bt, rm, rv = tensors
        affines: Tensor | tuple[Tensor, ...]
        # Checked for NaN and infinity before anything of the layer's moves: by the compiled call, or here.
        if self.step.windows is not None:
            affines = (w, b, wt, bt)
        else:
            affines = stack_affines(w, b, wt, bt)
            check_finite_affines(self.plan.caller, affines)
        if self.plan.batch_stats and not self.plan.update_running:
            rm = rv = None  # statistics of the batch, and nothing to move
        out, mean, invstd, _, _, aux = self.step.forward(x, affines, rm, rv)
        return out, (mean, invstd, aux)

    def backward(self, grad_out: Tensor, x: Tensor, saved: tuple[Tensor, Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        return self.step.backward(grad_out, x, *saved)


class _Passes(Protocol):
    """A plan's forward and backward on one backend."""

    def forward(self, x: Tensor, tensors: LayerTensors) -> tuple[Tensor, Any]: ...

    def backward(self, grad_out: Tensor, x: Tensor, saved: Any) -> tuple[Tensor, Tensor, Tensor]: ...


# How each backend that plans runs a plan's passes.
_STEPS: dict[str, Callable[[LaunchPlan, Tensor], _Passes]] = {
    "cuda": _CudaLaunches, "triton": _TritonLaunches, "torch": _TorchSteps}


class PlannedStep(torch.autograd.Function):
    """AC-Norm through a :class:`LaunchPlan`: differentiable in ``x``,
    ``weight_target`` and ``bias_target``; saves ``x`` alone."""

    @staticmethod
    def forward(ctx, plan: LaunchPlan, tensors, x: Tensor, weight_target: Tensor, bias_target: Tensor) -> Tensor:
        out, saved = plan.forward(x, tensors)
        ctx.save_for_backward(x)
        ctx.plan = plan
        ctx.saved = saved  # the forward's scratch (kernels) or statistics and aux (torch)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, = ctx.saved_tensors
        grad_x, grad_w, grad_b = ctx.plan.backward(grad_out, x, ctx.saved)
        return None, None, grad_x, grad_w, grad_b
