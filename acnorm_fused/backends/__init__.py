"""Backend selection.

``reference`` is the authors' formulation, differentiated by autograd. The
other backends ("fused" backends) implement one forward and one backward
function with the signatures of :mod:`acnorm_fused.backends.pytorch` and run
behind the custom ops of :mod:`acnorm_fused.ops`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
BACKEND_ENV = "ACNORM_BACKEND"

# Fused backends that this installation ships, by name -> module.
_FUSED_MODULES = {"torch": "acnorm_fused.backends.pytorch"}


def available_backends() -> list[str]:
    """Names of the backends that can run on this installation and machine."""
    return ["reference", *_FUSED_MODULES]


def validate_backend_name(name: str, caller: str) -> None:
    """Raise a clear error for a backend name that does not exist at all."""
    if name not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def resolve_backend(name: str, x: torch.Tensor, caller: str) -> str:
    """The concrete backend that runs ``x`` for a requested backend ``name``.

    ``"auto"`` (or the ``ACNORM_BACKEND`` environment variable, when set)
    picks the fastest backend for ``x``'s device. An explicit backend that
    cannot run ``x`` is an error, never a silent fallback.
    """
    validate_backend_name(name, caller)
    if name == "auto":
        override = os.environ.get(BACKEND_ENV, "auto")
        if override != "auto":
            validate_backend_name(override, f"{caller} ({BACKEND_ENV})")
            name = override
    if name == "auto":
        return "torch"
    if name not in available_backends():
        raise RuntimeError(
            f"{caller}: backend {name!r} is not available in this installation "
            f"(available: {', '.join(available_backends())})"
        )
    return name


def fused_backend(name: str) -> ModuleType:
    """The module that implements fused backend ``name``."""
    return importlib.import_module(_FUSED_MODULES[name])
