"""Model conversion: BatchNorm -> AC-Norm for finetuning, AC-Norm -> BatchNorm to deploy."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from ._checks import check_finite_affines_now
from .correlation import effective_affine, stack_affines
from .distributed import SyncACNorm
from .functional import effective_momentum
from .modules import ACNorm, ACNorm1d, ACNorm2d, ACNorm3d

__all__ = ["convert_model", "fold_to_batchnorm"]

# Most specific first: SyncBatchNorm accepts any rank, as ACNorm does.
_TO_ACNORM: tuple[tuple[type[nn.Module], type[ACNorm]], ...] = (
    (nn.SyncBatchNorm, ACNorm),
    (nn.BatchNorm3d, ACNorm3d),
    (nn.BatchNorm2d, ACNorm2d),
    (nn.BatchNorm1d, ACNorm1d),
)
_TO_BATCHNORM: tuple[tuple[type[ACNorm], type[nn.modules.batchnorm._BatchNorm]], ...] = (
    (ACNorm3d, nn.BatchNorm3d),
    (ACNorm2d, nn.BatchNorm2d),
    (ACNorm1d, nn.BatchNorm1d),
    (ACNorm, nn.SyncBatchNorm),
)


_Target = TypeVar("_Target")


def _lookup(table: tuple[tuple[type[nn.Module], _Target], ...], module: nn.Module) -> _Target | None:
    for source_type, target_type in table:
        if isinstance(module, source_type):
            return target_type
    return None


# The AC-Norm class for the input ranks a BatchNorm accepts.
_BY_RANKS: dict[tuple[int, ...], type[ACNorm]] = {(5,): ACNorm3d, (4,): ACNorm2d, (2, 3): ACNorm1d, (2,): ACNorm1d,
                                                  (3,): ACNorm1d}


def _accepted_ranks(layer: nn.modules.batchnorm._BatchNorm) -> tuple[int, ...]:
    """The input ranks (2 to 5) that ``layer._check_input_dim`` lets through."""
    ranks = []
    for rank in range(2, 6):
        try:
            layer._check_input_dim(torch.empty((1,) * rank, device="meta"))
        except (ValueError, RuntimeError, TypeError, AssertionError, NotImplementedError):
            continue
        ranks.append(rank)
    return tuple(ranks)


def _acnorm_type_for(name: str, layer: nn.Module) -> type[ACNorm] | None:
    """The AC-Norm class that replaces ``layer``, or None when it is no BatchNorm.

    ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (and their subclasses) map by
    type; any other ``_BatchNorm`` subclass, as model zoos define them, by the
    input ranks it accepts (any rank: :class:`ACNorm`), with a warning when it
    has a ``forward`` of its own, which AC-Norm's replaces."""
    where = name or "the model itself"
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(f"convert_model: {where} ({type(layer).__name__}) is not initialised yet; run a "
                         "forward first, so that its number of channels is known")
    known = _lookup(_TO_ACNORM, layer)
    if known is not None or not isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return known
    ranks = _accepted_ranks(layer)
    acnorm_type = _BY_RANKS.get(ranks, ACNorm)
    if type(layer).forward is not nn.modules.batchnorm._BatchNorm.forward:
        warnings.warn(
            f"convert_model: {where} is a {type(layer).__qualname__}, a BatchNorm with a forward of its own; "
            f"it becomes {acnorm_type.__name__}, whose forward replaces it (in eval it normalises with the "
            "running statistics; with track_running_stats=False it uses batch statistics always)",
            stacklevel=3)
    return acnorm_type


def _replace_modules(
    module: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None], prefix: str = ""
) -> nn.Module:
    """Replace ``module`` and its descendants, top-down, by ``replace(name, m)`` when not None.

    All or nothing: every replacement is built before the first is made, so a
    ``replace`` that raises leaves the model as it was. A module held in
    several places (``nn.Sequential(bn, act, bn)``) is replaced everywhere by
    one new module, so what was shared stays shared."""
    seen: dict[int, nn.Module] = {}
    edits: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(node: nn.Module, name: str) -> nn.Module:
        if id(node) in seen:
            return seen[id(node)]
        replacement = replace(name, node)
        seen[id(node)] = node if replacement is None else replacement
        if replacement is not None:
            return replacement
        # Every slot, duplicates included (named_children() yields a module once).
        for child_name, child in list(node._modules.items()):
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                edits.append((node, child_name, new_child))
        return node

    root = visit(module, prefix)
    for parent, child_name, new_child in edits:
        setattr(parent, child_name, new_child)
    return root


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == entry or name.startswith(entry + ".") for entry in exclude)


def convert_model(
    module: nn.Module,
    sync: bool = False,
    temperature: float = 1.0,
    backend: str = "auto",
    exclude: Iterable[str] = (),
    *,
    double_update: bool = True,
    process_group: Any = None,
) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and other
    ``torch.nn.modules.batchnorm._BatchNorm`` subclass by AC-Norm.

    Each new layer gets the BatchNorm's affine as both its frozen source
    affine and its trainable target affine, the BatchNorm's running
    statistics, ``eps``, ``momentum``, device, dtype, training flag and
    ``requires_grad``. With ``sync=True`` every new layer is a
    :class:`acnorm_fused.SyncACNorm` over ``process_group`` (the default group
    when ``None``), for DDP training. Layers named in ``exclude`` (as in
    ``module.named_modules()``; a name excludes its whole subtree) stay as
    they are. The module is changed in place and returned (the returned
    object is new when ``module`` itself is a BatchNorm); when any layer
    cannot be converted, nothing is. A BatchNorm held in several places
    becomes one AC-Norm held in the same places.
    """
    if process_group is not None and not sync:
        raise ValueError("convert_model: process_group is for sync=True; got sync=False")
    exclude = tuple([exclude] if isinstance(exclude, str) else exclude)
    names = {name for name, _ in module.named_modules(remove_duplicate=False)}
    unknown = [entry for entry in exclude if entry not in names]
    if unknown:
        raise ValueError(f"convert_model: exclude names no module of the model: {unknown}")

    def to_acnorm(name: str, layer: nn.Module) -> nn.Module | None:
        if _excluded(name, exclude):
            return None
        acnorm_type = _acnorm_type_for(name, layer)
        if acnorm_type is None:
            return None
        # _acnorm_type_for maps BatchNorms alone (every type of _TO_ACNORM is one).
        assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
        where = name or "the model itself"
        if not layer.affine:
            raise ValueError(
                f"convert_model: {where} ({layer}) has affine=False; AC-Norm needs a pretrained "
                f"affine to start from (leave it as BatchNorm with exclude=[{name!r}])"
            )
        options = {"process_group": process_group} if sync else {}
        new = (SyncACNorm if sync else acnorm_type)(
            layer.num_features,
            eps=layer.eps,
            momentum=layer.momentum,
            temperature=temperature,
            track_running_stats=layer.track_running_stats and layer.running_mean is not None,
            backend=backend,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
            double_update=double_update,
            **options,
        )
        with torch.no_grad():
            for source, target in (("weight", "weight"), ("bias", "bias"),
                                   ("weight", "weight_target"), ("bias", "bias_target")):
                getattr(new, target).copy_(getattr(layer, source))
            if new.track_running_stats:
                # Set above as the BatchNorm has running statistics: both have the three buffers.
                assert new.running_mean is not None and new.running_var is not None
                assert new.num_batches_tracked is not None
                assert layer.running_mean is not None and layer.running_var is not None
                assert layer.num_batches_tracked is not None
                new.running_mean.copy_(layer.running_mean)
                new.running_var.copy_(layer.running_var)
                new.num_batches_tracked.copy_(layer.num_batches_tracked)
        new.weight_target.requires_grad_(layer.weight.requires_grad)
        new.bias_target.requires_grad_(layer.bias.requires_grad)
        new.train(layer.training)
        return new

    return _replace_modules(module, to_acnorm)


def fold_to_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every AC-Norm layer by a plain BatchNorm with the same eval output.

    The BatchNorm gets the effective affine ``(I + S) gamma_t``,
    ``(I + S) beta_t`` and the running statistics, so the finetuned model runs
    and exports (TorchScript, ONNX, ``torch.export``) without any custom op.
    ``ACNorm1d/2d/3d`` become ``BatchNorm1d/2d/3d``; the any-rank ``ACNorm``
    and ``SyncACNorm`` become ``SyncBatchNorm`` (which is a plain BatchNorm
    outside distributed training; it keeps a ``SyncACNorm``'s process group).
    A fused activation becomes ``nn.Sequential(bn, activation)``. The momentum
    becomes the one-update equivalent of the layer's update rule. The module is
    changed in place and returned.
    """

    def to_batchnorm(name: str, layer: nn.Module) -> nn.Module | None:
        bn_type = _lookup(_TO_BATCHNORM, layer)
        if bn_type is None:
            return None
        assert isinstance(layer, ACNorm)  # every type of _TO_BATCHNORM is an AC-Norm one
        # A NaN affine would fold into a BatchNorm that gives NaN: refuse it, as the layer does.
        check_finite_affines_now(f"fold_to_batchnorm: {name or 'the model itself'} ({layer._describe()})",
                                 stack_affines(layer.weight, layer.bias, layer.weight_target, layer.bias_target))
        momentum = layer.momentum
        if momentum is not None:
            momentum = effective_momentum(momentum, layer.double_update)
        bn = bn_type(
            layer.num_features,
            eps=layer.eps,
            momentum=momentum,
            affine=True,
            track_running_stats=layer.track_running_stats,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        with torch.no_grad():
            w, b = effective_affine(
                layer.weight, layer.bias, layer.weight_target, layer.bias_target,
                layer.eps, layer.temperature,
            )
            bn.weight.copy_(w)
            bn.bias.copy_(b)
            if layer.track_running_stats:
                # Both track them, so both have the three buffers.
                assert bn.running_mean is not None and bn.running_var is not None
                assert bn.num_batches_tracked is not None
                assert layer.running_mean is not None and layer.running_var is not None
                assert layer.num_batches_tracked is not None
                bn.running_mean.copy_(layer.running_mean)
                bn.running_var.copy_(layer.running_var)
                bn.num_batches_tracked.copy_(layer.num_batches_tracked)
        if isinstance(layer, SyncACNorm):
            bn.process_group = layer.process_group
        bn.train(layer.training)
        if layer.activation is None:
            return bn
        act = nn.ReLU() if layer.activation == "relu" else nn.LeakyReLU(layer.negative_slope)
        return nn.Sequential(bn, act).train(layer.training)

    return _replace_modules(module, to_batchnorm)
