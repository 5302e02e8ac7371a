"""Backend selection.

``reference`` is the authors' formulation, differentiated by autograd. The
other backends ("fused" backends: ``torch``, ``triton``) implement the
functions of :mod:`acnorm_fused.backends.pytorch` with the same signatures:
``aux_like``, ``forward`` and ``backward``, which run behind the custom ops of
:mod:`acnorm_fused.ops`, and the steps ``local_statistics``,
``forward_with_statistics``, ``grad_sums`` and ``backward_with_sums`` that
:mod:`acnorm_fused.distributed` composes around its collectives.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
BACKEND_ENV = "ACNORM_BACKEND"

# Fused backends, by name -> module.
_FUSED_MODULES = {
    "torch": "acnorm_fused.backends.pytorch",
    "triton": "acnorm_fused.backends.triton",
}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_usable() -> bool:
    return _TRITON_INSTALLED and (triton_interpreted() or torch.cuda.is_available())


def available_backends() -> list[str]:
    """Names of the backends that can run on this installation and machine."""
    names = ["reference", "torch"]
    if _triton_usable():
        names.append("triton")
    return names


def _check_triton_input(x: torch.Tensor, caller: str) -> None:
    """Raise a clear error for an input the triton backend cannot run."""
    if not _TRITON_INSTALLED:
        raise RuntimeError(
            f"{caller}: backend 'triton' needs the triton package (pip install 'acnorm-fused[triton]')"
        )
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{caller}: backend 'triton' runs float32, float16 and bfloat16 inputs, got "
            f"{x.dtype}; use backend='torch' for it"
        )
    if x.is_cuda or (x.device.type == "cpu" and triton_interpreted()):
        return
    raise RuntimeError(
        f"{caller}: backend 'triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
        f"set before triton is imported), got a tensor on {x.device}"
    )


def validate_backend_name(name: str, caller: str) -> None:
    """Raise a clear error for a backend name that does not exist at all."""
    if name not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def resolve_backend(name: str, x: torch.Tensor, caller: str) -> str:
    """The concrete backend that runs ``x`` for a requested backend ``name``.

    ``"auto"`` (or the ``ACNORM_BACKEND`` environment variable, when set)
    picks the fastest backend for ``x``: the Triton kernels for CUDA tensors of
    float32, float16 or bfloat16 when triton is installed, else ``torch``. An
    explicit backend that cannot run ``x`` is an error, never a silent
    fallback.
    """
    validate_backend_name(name, caller)
    if name == "auto":
        override = os.environ.get(BACKEND_ENV, "auto")
        if override != "auto":
            validate_backend_name(override, f"{caller} ({BACKEND_ENV})")
            name = override
    if name == "auto":
        if x.is_cuda and x.dtype in TRITON_DTYPES and _TRITON_INSTALLED:
            return "triton"
        return "torch"
    if name == "triton":
        _check_triton_input(x, caller)
    elif name not in available_backends():
        raise RuntimeError(
            f"{caller}: backend {name!r} is not available in this installation "
            f"(available: {', '.join(available_backends())})"
        )
    return name


def fused_backend(name: str) -> ModuleType:
    """The module that implements fused backend ``name``."""
    return importlib.import_module(_FUSED_MODULES[name])
