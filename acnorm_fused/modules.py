"""AC-Norm layers: ``ACNorm1d/2d/3d`` and the authors' ``AffineCoNorm2d/3d``.

The layers deliberately do not subclass ``torch.nn.modules.batchnorm._BatchNorm``:
helpers that look for that class (``SyncBatchNorm.convert_sync_batchnorm``
among them) would turn them back into BatchNorm and drop the target affine.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_hyperparameters
from .backends import validate_backend_name
from .backends.plan import LaunchPlan, plan_covers
from .functional import checked_backend, effective_momentum, run_checked

__all__ = ["ACNorm", "ACNorm1d", "ACNorm2d", "ACNorm3d", "AffineCoNorm2d", "AffineCoNorm3d"]


class ACNorm(nn.Module):
    """Affine Collaborative Normalization over an input of any rank from 2 to 5.

    A BatchNorm whose pretrained ("source") affine ``weight``, ``bias`` is
    frozen and whose trainable ("target") affine ``weight_target``,
    ``bias_target`` is re-calibrated on every call with the source channels
    it correlates with: the output is ``x_hat * (I + S) weight_target +
    (I + S) bias_target`` where ``S`` is :func:`acnorm_fused.correlation`.
    The state dict has BatchNorm's keys plus ``weight_target`` and
    ``bias_target``; loading a plain BatchNorm checkpoint fills both affines
    from its ``weight`` and ``bias``.

    Args:
        num_features: number of channels ``C`` of the input ``(N, C, ...)``.
        eps: added to the variance, and to ``|gamma|`` in the channel signatures.
        momentum: running-statistics factor of each of the two updates per
            training step (the authors' behaviour; see ``double_update``), or
            ``None`` for a cumulative moving average (one update per step).
        temperature: softmax temperature of the correlation (``tem`` in the
            authors' code).
        track_running_stats: keep running statistics and use them in eval mode.
        activation: ``None``, ``"relu"`` or ``"leaky_relu"``, fused into the output.
        negative_slope: slope of ``"leaky_relu"`` for negative inputs.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        double_update: move the running statistics twice per step as the
            authors' code does (default), or once as BatchNorm when ``False``.
        affine: must be ``True``; AC-Norm is defined by its affine parameters.
    """

    _version = 2
    _accepted_dims: tuple[int, ...] = (2, 3, 4, 5)
    _dims_text = "2D to 5D input (N, C, *spatial)"

    # Set in __init__; declared here because nn.Module's __getattr__ would type
    # them as ``Tensor | Module``. The three buffers are None without
    # ``track_running_stats`` (registered as None, as BatchNorm's).
    num_features: int
    eps: float
    momentum: float | None
    temperature: float
    track_running_stats: bool
    activation: str | None
    negative_slope: float
    backend: str
    double_update: bool
    weight: nn.Parameter
    bias: nn.Parameter
    weight_target: nn.Parameter
    bias_target: nn.Parameter
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        temperature: float = 1.0,
        track_running_stats: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        backend: str = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        double_update: bool = True,
        affine: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not affine:
            raise ValueError(
                f"{name}: affine=False is not supported; AC-Norm re-calibrates the affine "
                "parameters and cannot exist without them (use nn.BatchNorm for affine=False)"
            )
        if (isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)
                or num_features < 1):
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        check_hyperparameters(
            name, eps=eps, momentum=momentum, temperature=temperature,
            activation=activation, negative_slope=negative_slope,
        )
        validate_backend_name(backend, name)
        # Python numbers from here on (numpy scalars are welcome, as BatchNorm takes them).
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.temperature = float(temperature)
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.backend = backend
        self.double_update = double_update

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_features, **factory), requires_grad=False)
        self.weight_target = nn.Parameter(torch.empty(num_features, **factory))
        self.bias_target = nn.Parameter(torch.empty(num_features, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def tem(self) -> float:
        """The authors' name for :attr:`temperature`."""
        return self.temperature

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches tracked."""
        if self.track_running_stats:
            # track_running_stats=True registers the three buffers (see __init__).
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Identity affines (source and target) and fresh running statistics."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.weight_target.fill_(1.0)
            self.bias_target.zero_()

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._describe()}: expected a Tensor input, got {type(x).__name__}")
        if x.dim() not in self._accepted_dims:
            raise ValueError(
                f"{self._describe()}: expected {self._dims_text}, got {x.dim()}D input "
                f"of shape {tuple(x.shape)}"
            )

    def _update_rule(self) -> tuple[float, bool]:
        """``(momentum, double_update)`` of this call's running-statistics update."""
        momentum, double_update = self.momentum, self.double_update
        if self.training and self.track_running_stats and momentum is None:
            # Cumulative moving average, as BatchNorm: one update by 1/count.
            assert self.num_batches_tracked is not None  # registered with track_running_stats
            momentum, double_update = 1.0 / float(self.num_batches_tracked + 1), False
        return (0.0 if momentum is None else momentum), double_update

    def _op_options(self) -> dict[str, Any]:
        """Keyword arguments of the functional op that come from the layer's settings."""
        return {
            "eps": self.eps,
            "temperature": self.temperature,
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "backend": self.backend,
            "caller": self._describe(),
        }

    def forward(self, x: Tensor) -> Tensor:
        # A launch plan for this input's signature skips the checks and the
        # general path (see acnorm_fused.backends.plan); traced code never takes it.
        if not torch.compiler.is_compiling():
            plans = self.__dict__.get("_plans")
            if plans and isinstance(x, Tensor):
                plan = plans.get(LaunchPlan.key(x, self.training))
                if plan is not None:
                    out = plan.run(self, x)
                    if out is not None:
                        return out
        return self._forward_checked(x)

    def _forward_checked(self, x: Tensor) -> Tensor:
        """The forward with every check, building a launch plan where one applies."""
        self._check_input_dim(x)
        updates_stats = self.training and self.track_running_stats
        momentum, double_update = self._update_rule()
        use_batch_stats = self.training or self.running_mean is None
        tracks = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracks else None
        running_var = self.running_var if tracks else None
        params = (self.weight, self.bias, self.weight_target, self.bias_target)
        options = self._op_options()
        caller = options["caller"]
        # As BatchNorm: an empty batch (N = 0) gives an empty output and moves no
        # statistic; the checks but the one of values per channel still run.
        empty_batch = use_batch_stats and x.shape[0] == 0
        backend = checked_backend(
            x, running_mean, running_var, *params, use_batch_stats, momentum, options["eps"],
            options["temperature"], options["activation"], options["negative_slope"], options["backend"],
            caller, synced=empty_batch)
        if empty_batch:
            return x.clone()
        tensors = (*params, running_mean, running_var)
        # momentum=None moves with the counter: no fixed plan for that. A plan runs
        # with the layer's own parameters and buffers (its run() checks their
        # addresses): none when this call leaves buffers out (training with
        # track_running_stats=False on a layer that has them).
        if (not torch.compiler.is_compiling() and plan_covers(backend, x, tensors)
                and not (updates_stats and self.momentum is None)
                and all(t is own for t, own in zip(tensors, LaunchPlan.tensors_of(self)))):
            plan = LaunchPlan(
                backend, x, tensors, caller=caller, batch_stats=use_batch_stats,
                update_running=use_batch_stats and running_mean is not None,
                counts_batches=updates_stats, momentum=effective_momentum(momentum, double_update),
                eps=self.eps, temperature=self.temperature, activation=self.activation or "",
                negative_slope=self.negative_slope)
            self.__dict__.setdefault("_plans", {})[LaunchPlan.key(x, self.training)] = plan
            planned = plan.run(self, x)
            assert planned is not None  # built from the layer's own tensors just now
            return planned
        out = run_checked(
            backend, x, running_mean, running_var, *params, use_batch_stats, momentum, options["eps"],
            options["temperature"], options["activation"], options["negative_slope"], double_update, caller)
        if updates_stats:
            assert self.num_batches_tracked is not None  # registered with track_running_stats
            self.num_batches_tracked.add_(1)
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        # Plans fix the settings, parameters and buffers they were built with;
        # train() and eval() pick another plan rather than change one.
        if name != "training":
            self.__dict__.pop("_plans", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_plans", None)  # rebuilt on the next call; they hold compiled-module objects
        return state

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"temperature={self.temperature}, track_running_stats={self.track_running_stats}"
        )
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if not self.double_update:
            text += ", double_update=False"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A plain BatchNorm checkpoint has no target affine: finetuning starts
        # from the pretrained affine on both sides. Decided per layer.
        has_target = any(prefix + key in state_dict for key in ("weight_target", "bias_target"))
        has_source = all(prefix + key in state_dict for key in ("weight", "bias"))
        if has_source and not has_target:
            # Copies: with load_state_dict(assign=True) the target must not become
            # the frozen source's own tensor, or training it would move the source.
            state_dict[prefix + "weight_target"] = state_dict[prefix + "weight"].detach().clone()
            state_dict[prefix + "bias_target"] = state_dict[prefix + "bias"].detach().clone()
        version = local_metadata.get("version", None)
        counter_key = prefix + "num_batches_tracked"
        if self.track_running_stats and (version is None or version < 2) and counter_key not in state_dict:
            # Checkpoints older than the counter, as BatchNorm accepts them: the
            # layer keeps its own count (it weighs the next update when momentum=None).
            counter = self.num_batches_tracked
            state_dict[counter_key] = (counter if counter is not None and counter.device.type != "meta"
                                       else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class ACNorm1d(ACNorm):
    """AC-Norm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; see :class:`ACNorm`."""

    _accepted_dims = (2, 3)
    _dims_text = "2D (N, C) or 3D (N, C, L) input"


class ACNorm2d(ACNorm):
    """AC-Norm over a 4D ``(N, C, H, W)`` input; see :class:`ACNorm`."""

    _accepted_dims = (4,)
    _dims_text = "4D input (N, C, H, W)"


class ACNorm3d(ACNorm):
    """AC-Norm over a 5D ``(N, C, D, H, W)`` input; see :class:`ACNorm`."""

    _accepted_dims = (5,)
    _dims_text = "5D input (N, C, D, H, W)"


class _AuthorsConstructor:
    """The constructor of the authors' ``AffineCoNorm*d``, mapped onto :class:`ACNorm`."""

    def __init__(
        self,
        num_features: int,
        tem: float = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            num_features, eps=eps, momentum=momentum, temperature=float(tem),
            track_running_stats=track_running_stats, affine=affine,
        )


class AffineCoNorm2d(_AuthorsConstructor, ACNorm2d):
    """Drop-in for the authors' ``AffineCoNorm2d(num_features, tem, eps, momentum, affine,
    track_running_stats)``: same state dict, same results."""


class AffineCoNorm3d(_AuthorsConstructor, ACNorm3d):
    """Drop-in for the authors' ``AffineCoNorm3d(num_features, tem, eps, momentum, affine,
    track_running_stats)``: same state dict, same results."""
