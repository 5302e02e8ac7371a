"""The backends, and how a call picks one.

Each backend is a :class:`Backend` in :data:`REGISTRY` that says what it
runs and why it cannot run a given input. ``reference`` is the authors'
formulation, differentiated by autograd. The other backends ("fused"
backends: ``torch``, ``triton``, ``cuda``) implement the functions of
:mod:`acnorm_fused.backends.pytorch` with the same signatures:
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
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from .._checks import INPUT_DTYPES
from .abi import check_module_abi

BACKEND_ENV = "ACNORM_BACKEND"

# What the kernel backends (triton, cuda) run; float64 stays on torch.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@functools.cache
def _import_cuda_extension() -> tuple[ModuleType | None, str]:
    try:
        # A compiled module without a stub: mypy sees no such attribute of the package.
        from .. import _cuda  # type: ignore[attr-defined]
    except ImportError as error:
        return None, str(error)
    try:
        check_module_abi(_cuda)
    except RuntimeError as error:
        return None, str(error)
    return _cuda, ""


# ``(module or None, why not)`` of the compiled module; using_cuda_extension() swaps it.
_load_cuda_extension: Callable[[], tuple[ModuleType | None, str]] = _import_cuda_extension


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


class Backend:
    """One way to run AC-Norm: its name, what it runs, and why it cannot run a
    given input. The instances in :data:`REGISTRY` are the only backends;
    :func:`resolve_backend` and :func:`available_backends` read them."""

    name: str = ""
    summary: str = ""
    devices: str = ""
    dtypes: tuple[torch.dtype, ...] = ()
    # "module:attribute" of the fused-backend contract (see the module docstring); "" for none.
    implementation: str = ""
    # Runs the kernels of backends/multipass.py, so a layer can plan its launches (backends/plan.py).
    runs_kernels: bool = False

    def is_available(self) -> bool:
        """Whether it can run anything on this installation and machine."""
        return True

    def refusal(self, x: torch.Tensor, caller: str) -> Exception | None:
        """The error to raise for an input it cannot run (None when it can)."""
        return None

    def picked_by_auto(self, x: torch.Tensor) -> bool:
        """Whether ``"auto"`` chooses it for ``x`` (asked in :data:`AUTO_ORDER`)."""
        return False

    def plans(self, x: torch.Tensor) -> bool:
        """Whether a layer can keep a launch plan (backends/plan.py) for ``x`` on it."""
        return self.runs_kernels

    def _dtype_refusal(self, x: torch.Tensor, caller: str) -> TypeError:
        # Only the kernel backends refuse dtypes: the torch backend runs them all.
        return TypeError(
            f"{caller}: backend {self.name!r} runs float32, float16 and bfloat16 inputs, got "
            f"{x.dtype}; use backend='torch' for it")

    @functools.cached_property
    def contract(self):
        """The object whose functions implement the fused-backend contract."""
        if not self.implementation:
            raise RuntimeError(f"backend {self.name!r} is not a fused backend")
        module, _, attribute = self.implementation.partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded


class ReferenceBackend(Backend):
    name = "reference"
    summary = "the authors' formulation (two BatchNorms and a sum), differentiated by autograd"
    devices = "any"
    dtypes = INPUT_DTYPES


class TorchBackend(Backend):
    name = "torch"
    summary = "one ATen BatchNorm with the effective affine"
    devices = "any"
    dtypes = INPUT_DTYPES
    implementation = "acnorm_fused.backends.pytorch"

    def picked_by_auto(self, x: torch.Tensor) -> bool:
        return True

    def plans(self, x: torch.Tensor) -> bool:
        # On a CPU, where it is the default: there its eager step is host time
        # alone. (On a GPU the kernel backends run instead.)
        return x.device.type == "cpu"


class TritonBackend(Backend):
    name = "triton"
    summary = "fused Triton kernels"
    devices = "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)"
    dtypes = KERNEL_DTYPES
    implementation = "acnorm_fused.backends.triton:BACKEND"
    runs_kernels = True

    def is_installed(self) -> bool:
        """Whether the triton package is there at all."""
        return _TRITON_INSTALLED

    def is_available(self) -> bool:
        return _TRITON_INSTALLED and (triton_interpreted() or torch.cuda.is_available())

    def refusal(self, x: torch.Tensor, caller: str) -> Exception | None:
        if not _TRITON_INSTALLED:
            return RuntimeError(
                f"{caller}: backend 'triton' needs the triton package (pip install 'acnorm-fused[triton]')")
        if x.dtype not in self.dtypes:
            return self._dtype_refusal(x, caller)
        if x.is_cuda or (x.device.type == "cpu" and triton_interpreted()):
            return None
        return RuntimeError(
            f"{caller}: backend 'triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
            f"set before triton is imported), got a tensor on {x.device}")

    def picked_by_auto(self, x: torch.Tensor) -> bool:
        return _TRITON_INSTALLED and x.is_cuda and x.dtype in self.dtypes


class CudaBackend(Backend):
    name = "cuda"
    summary = "the compiled CUDA kernels of csrc/ (or their host emulation, on CPU tensors)"
    devices = "CUDA tensors"
    dtypes = KERNEL_DTYPES
    implementation = "acnorm_fused.backends.cuda:BACKEND"
    runs_kernels = True

    def is_available(self) -> bool:
        module = cuda_extension()
        return module is not None and (torch.cuda.is_available() or module.emulated)

    def refusal(self, x: torch.Tensor, caller: str) -> Exception | None:
        module = cuda_extension()
        if module is None:
            return RuntimeError(
                f"{caller}: backend 'cuda' needs the compiled extension acnorm_fused._cuda, which this "
                f"installation lacks ({_load_cuda_extension()[1]}); install a wheel built for CUDA, or "
                "build from source with nvcc present: ACNORM_BUILD_CUDA=1 pip install .")
        if x.dtype not in self.dtypes:
            return self._dtype_refusal(x, caller)
        if module.emulated:
            # A build of the kernels for the host emulator (tests without a GPU).
            if x.device.type != "cpu":
                return RuntimeError(f"{caller}: this acnorm_fused._cuda is the host emulation and runs CPU "
                                    f"tensors, got a tensor on {x.device}")
        elif not x.is_cuda:
            return RuntimeError(f"{caller}: backend 'cuda' runs CUDA tensors, got a tensor on {x.device}")
        return None

    def picked_by_auto(self, x: torch.Tensor) -> bool:
        module = cuda_extension()
        return module is not None and not module.emulated and x.is_cuda and x.dtype in self.dtypes


REGISTRY: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), TorchBackend(), TritonBackend(),
                                                     CudaBackend())}
# The backends "auto" asks, fastest first; torch takes whatever the others leave.
AUTO_ORDER = (REGISTRY["cuda"], REGISTRY["triton"], REGISTRY["torch"])
BACKENDS = ("auto", *REGISTRY)


def available_backends() -> list[str]:
    """Names of the backends that can run on this installation and machine."""
    return [name for name, backend in REGISTRY.items() if backend.is_available()]


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
        return next(backend.name for backend in AUTO_ORDER if backend.picked_by_auto(x))
    error = REGISTRY[name].refusal(x, caller)
    if error is not None:
        raise error
    return name


def fused_backend(name: str):
    """The object that implements fused backend ``name`` (imported on first use)."""
    return REGISTRY[name].contract
