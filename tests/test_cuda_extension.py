"""The compiled module acnorm_fused._cuda, on a machine with or without a GPU.

CI builds it (for one architecture) and sets ACNORM_EXPECT_CUDA_EXTENSION=1,
so that a CUDA compile error or a broken import fails here rather than being
skipped. Its kernels' results are checked in test_kernel_backends.py (the
host emulation here, the compiled code on a GPU) and test_gpu.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from acnorm_fused import backends

from helpers import import_csrc_toolkit, skip_or_fail


@pytest.fixture(scope="module")
def compiled():
    try:
        return importlib.import_module("acnorm_fused._cuda")
    except ImportError as error:
        skip_or_fail(f"acnorm_fused._cuda is not built: {error}")


def test_imports_and_reports_its_build(compiled):
    assert compiled.emulated is False
    assert compiled.compiled_archs(), "no GPU architecture compiled in"
    assert all(arch >= 80 for arch in compiled.compiled_archs())
    assert compiled.runtime_version() >= 12000
    assert "built for sm_" in backends.cuda_extension_status()


def test_links_no_torch_and_no_shared_cuda_runtime(compiled):
    """One build serves every torch release: nothing of torch, and the CUDA
    runtime linked statically (the driver is loaded at run time)."""
    needed = import_csrc_toolkit().needed_libraries(compiled.__file__)
    assert needed, "no DT_NEEDED entries read"
    for name in needed:
        assert not name.startswith(("libtorch", "libc10", "libcudart", "libcuda", "libpython")), needed


def test_needs_glibc_2_28_at_most(compiled):
    """The module loads wherever torch's own wheels (manylinux_2_28) do,
    whatever glibc the build machine had."""
    toolkit = import_csrc_toolkit()
    needed = toolkit.glibc_needed(compiled.__file__)
    assert needed, "no GLIBC symbol versions read"
    assert needed <= toolkit.GLIBC_TARGET, (
        f"{compiled.__file__} needs glibc {'.'.join(map(str, needed))}, newer than "
        f"{'.'.join(map(str, toolkit.GLIBC_TARGET))}: was it built without ziglang (ACNORM_HOST_TOOLCHAIN)?")


def test_unknown_host_toolchain_is_refused(monkeypatch):
    monkeypatch.setenv("ACNORM_HOST_TOOLCHAIN", "gcc")
    with pytest.raises(ValueError, match="ACNORM_HOST_TOOLCHAIN must be one of auto, zig, system"):
        import_csrc_toolkit().host_toolchain()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_call_without_a_gpu_is_a_clear_error(compiled):
    with pytest.raises(RuntimeError, match=r"acnorm_fused\._cuda: .*no usable CUDA GPU on this machine"):
        compiled.target_grad(device=0, stream=0, aux=0, grad_affine=0, grad_target=0, channels=4,
                             temperature=1.0)


def test_geometry_takes_keywords_only(compiled):
    geometry = compiled.Geometry(planar=True, n=2, c=3, s=8, split_s=2, split_n=1, s_chunk=4, n_chunk=2,
                                 splits=2, r_chunk=0, block_c=1)
    assert geometry.num_splits == 2
    with pytest.raises(TypeError):
        compiled.Geometry(True, 2, 3, 8, 2, 1, 4, 2, 2, 0, 1)


def test_emulation_reports_itself(emulated_cuda_module):
    assert emulated_cuda_module.emulated is True
    assert emulated_cuda_module.compiled_archs() == []


@pytest.mark.parametrize("spec,expected", [
    ("9.0", ["-gencode", "arch=compute_90,code=sm_90"]),
    ("8.0;12.0+PTX", ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_120,code=sm_120",
                      "-gencode", "arch=compute_120,code=compute_120"]),
    ("8.6, 9.0a", ["-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_90a,code=sm_90a"]),
])
def test_architecture_lists(spec, expected):
    assert import_csrc_toolkit().gencode_flags(spec) == expected


@pytest.mark.parametrize("spec", ["", "sm_90", "9", "9.0+ptx"])
def test_bad_architecture_lists_are_refused(spec):
    with pytest.raises(ValueError, match="architecture"):
        import_csrc_toolkit().gencode_flags(spec)
