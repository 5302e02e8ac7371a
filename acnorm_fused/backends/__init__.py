"""Backend selection.

``reference`` is the authors' formulation, differentiated by autograd. The
other backends ("fused" backends: ``torch``, ``triton``, ``cuda``) implement the
functions of :mod:`acnorm_fused.backends.pytorch` with the same signatures:
``aux_like``, ``forward`` and ``backward``, which run behind the custom ops of
:mod:`acnorm_fused.ops`, and the steps ``local_statistics``,
``forward_with_statistics``, ``grad_sums`` and ``backward_with_sums`` that
:mod:`acnorm_fused.distributed` composes around its collectives.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from .abi import check_module_abi

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
BACKEND_ENV = "ACNORM_BACKEND"

# Fused backends, by name -> module.
_FUSED_MODULES = {
    "torch": "acnorm_fused.backends.pytorch",
    "triton": "acnorm_fused.backends.triton",
    "cuda": "acnorm_fused.backends.cuda",
}
# What the kernel backends (triton, cuda) run; float64 stays on torch.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_usable() -> bool:
    return _TRITON_INSTALLED and (triton_interpreted() or torch.cuda.is_available())


@functools.cache
def _load_cuda_extension() -> tuple[ModuleType | None, str]:
    try:
        from .. import _cuda
    except ImportError as error:
        return None, str(error)
    try:
        check_module_abi(_cuda)
    except RuntimeError as error:
        return None, str(error)
    return _cuda, ""


def cuda_extension() -> ModuleType | None:
    """The compiled module ``acnorm_fused._cuda``, or None when this
    installation was built without it (or it cannot load)."""
    return _load_cuda_extension()[0]


@contextlib.contextmanager
def using_cuda_extension(module) -> Iterator[None]:
    """Within the block, ``backend="cuda"`` runs ``module`` instead of the
    installed ``acnorm_fused._cuda``: the host emulation of the same sources,
    or a stand-in (tests, the host-cost benchmark)."""
    global _load_cuda_extension
    installed = _load_cuda_extension
    _load_cuda_extension = lambda: (module, "")  # noqa: E731
    try:
        yield
    finally:
        _load_cuda_extension = installed


def cuda_extension_status() -> str:
    """One line on the compiled module: its architectures, or why it is absent."""
    module, error = _load_cuda_extension()
    if module is None:
        return f"not built ({error})"
    archs = ", ".join(f"sm_{arch}" for arch in module.compiled_archs())
    return f"built for {archs} ({module.__file__})"


def available_backends() -> list[str]:
    """Names of the backends that can run on this installation and machine."""
    names = ["reference", "torch"]
    if _triton_usable():
        names.append("triton")
    module = cuda_extension()
    if module is not None and (torch.cuda.is_available() or module.emulated):
        names.append("cuda")
    return names


def _check_triton_input(x: torch.Tensor, caller: str) -> None:
    """Raise a clear error for an input the triton backend cannot run."""
    if not _TRITON_INSTALLED:
        raise RuntimeError(
            f"{caller}: backend 'triton' needs the triton package (pip install 'acnorm-fused[triton]')"
        )
    if x.dtype not in KERNEL_DTYPES:
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


def _check_cuda_input(x: torch.Tensor, caller: str) -> None:
    """Raise a clear error for an input the cuda backend cannot run."""
    if cuda_extension() is None:
        raise RuntimeError(
            f"{caller}: backend 'cuda' needs the compiled extension acnorm_fused._cuda, which this "
            f"installation lacks ({_load_cuda_extension()[1]}); install a wheel built for CUDA, or "
            "build from source with nvcc present: ACNORM_BUILD_CUDA=1 pip install ."
        )
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{caller}: backend 'cuda' runs float32, float16 and bfloat16 inputs, got "
            f"{x.dtype}; use backend='torch' for it"
        )
    if cuda_extension().emulated:
        # A build of the kernels for the host emulator (tests without a GPU).
        if x.device.type != "cpu":
            raise RuntimeError(f"{caller}: this acnorm_fused._cuda is the host emulation and runs CPU "
                               f"tensors, got a tensor on {x.device}")
    elif not x.is_cuda:
        raise RuntimeError(f"{caller}: backend 'cuda' runs CUDA tensors, got a tensor on {x.device}")


def validate_backend_name(name: str, caller: str) -> None:
    """Raise a clear error for a backend name that does not exist at all."""
    if name not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def resolve_backend(name: str, x: torch.Tensor, caller: str) -> str:
    """The concrete backend that runs ``x`` for a requested backend ``name``.

    ``"auto"`` (or the ``ACNORM_BACKEND`` environment variable, when set)
    picks the fastest backend for ``x``: for CUDA tensors of float32, float16
    or bfloat16 the compiled CUDA kernels when this installation has them,
    else the Triton kernels when triton is installed; else ``torch``. An
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
        if x.is_cuda and x.dtype in KERNEL_DTYPES:
            if cuda_extension() is not None and not cuda_extension().emulated:
                return "cuda"
            if _TRITON_INSTALLED:
                return "triton"
        return "torch"
    if name == "triton":
        _check_triton_input(x, caller)
    elif name == "cuda":
        _check_cuda_input(x, caller)
    elif name not in available_backends():
        raise RuntimeError(
            f"{caller}: backend {name!r} is not available in this installation "
            f"(available: {', '.join(available_backends())})"
        )
    return name


@functools.cache
def fused_backend(name: str) -> ModuleType:
    """The module that implements fused backend ``name`` (imported on first use;
    every eager call asks for it twice, so the answer is kept)."""
    return importlib.import_module(_FUSED_MODULES[name])
