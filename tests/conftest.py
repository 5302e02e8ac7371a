"""Fixtures and collection rules; the helpers the tests import live in helpers.py."""

from __future__ import annotations

import importlib.util
import os
import sysconfig

import pytest
import torch

# Without a GPU the Triton kernels run in triton's interpreter, on CPU tensors.
# The switch is read when kernels are defined, so before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import acnorm_fused as acn
from acnorm_fused import backends

from helpers import import_csrc_toolkit, skip_or_fail


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's ACNORM_BACKEND must not leak in."""
    monkeypatch.delenv("ACNORM_BACKEND", raising=False)


@pytest.fixture
def layer_classes():
    return {2: acn.ACNorm1d, 3: acn.ACNorm1d, 4: acn.ACNorm2d, 5: acn.ACNorm3d}


def pytest_collection_modifyitems(config, items):
    """GPU tests need a CUDA device; without one they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulated_cuda_module(tmp_path_factory):
    """``acnorm_fused._cuda`` built from csrc/ for the host emulator: the CUDA
    kernels' own code, run on CPU tensors."""
    toolkit = import_csrc_toolkit()
    directory = tmp_path_factory.mktemp("cuda_emulated")
    target = directory / f"_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    try:
        toolkit.build_module(target, directory / "build", emulate=True)
    except (FileNotFoundError, ImportError) as error:
        skip_or_fail(f"cannot build the emulated CUDA module: {error}")
    spec = importlib.util.spec_from_file_location("_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.emulated
    return module


@pytest.fixture
def cuda_kernels(request, monkeypatch):
    """The module behind backend="cuda": the compiled one on a GPU machine, the
    host emulation of the same sources elsewhere."""
    if torch.cuda.is_available():
        module = backends.cuda_extension()
        if module is None:
            skip_or_fail("acnorm_fused._cuda is not built in this installation")
        return module
    module = request.getfixturevalue("emulated_cuda_module")
    monkeypatch.setattr(backends, "_load_cuda_extension", lambda: (module, ""))
    return module


def _set_up(request, backend: str) -> str:
    """``backend``, set up to run on this machine: the kernel backends on CUDA
    tensors with a GPU, else Triton's interpreter and the host emulation of the
    CUDA kernels; the torch backend as it is."""
    if backend == "triton":
        pytest.importorskip("triton")
    elif backend == "cuda":
        request.getfixturevalue("cuda_kernels")
    return backend


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request):
    """A kernel backend, set up to run on this machine (see _set_up)."""
    return _set_up(request, request.param)


@pytest.fixture(params=["torch", "triton", "cuda"])
def planning_backend(request):
    """A backend that keeps launch plans: torch (on a CPU) and the kernel backends."""
    if request.param == "torch" and torch.cuda.is_available():
        pytest.skip("the torch backend plans on a CPU only, and these tests run on the GPU")
    return _set_up(request, request.param)
