"""Build script for acnorm-fused.

The Python package runs as pure Python. Two compiled modules are optional.

``acnorm_fused._cpu`` (``csrc/cpu``), the wide layers' C x C step on the CPU
(without it, the same algorithm runs as PyTorch operations, several times
slower), is controlled by ``ACNORM_BUILD_CPU``:

* ``auto`` (default): build it, and go on without it (with a warning) when
  the compile fails;
* ``0``: never build it;
* ``1``: build it, and fail loudly when that is impossible.

It is one C file against the CPython API, compiled by zig's C compiler for
glibc 2.28 (below) or the system one (``CC``, else ``cc``).

The CUDA extension ``acnorm_fused._cuda`` (``csrc/acnorm``) is controlled by
``ACNORM_BUILD_CUDA``:

* ``auto`` (default): build it when ``nvcc`` is found, otherwise build nothing;
* ``0``: never build it;
* ``1``: build it, and fail loudly when that is impossible.

It is compiled with nvcc through ninja for the architectures in
``ACNORM_CUDA_ARCHS`` (else ``TORCH_CUDA_ARCH_LIST``; default
``8.0 8.6 8.9 9.0 10.0 12.0+PTX``), see ``csrc/toolkit.py``. The CUDA runtime
is linked statically and no torch library at all, so the module works with any
torch release; ``CUDA_HOME`` picks the toolkit when the ``nvcc`` on PATH is not
the one to use.

The module needs glibc 2.28 at most, as torch's own wheels do, whatever glibc
the build machine has: its binding is compiled and the module linked by zig's
clang and libc++ (the ``ziglang`` package, a build requirement on Linux
x86_64) for that glibc. ``ACNORM_HOST_TOOLCHAIN`` chooses:

* ``auto`` (default): zig when ziglang is installed, else the system compiler
  (``CXX``, else ``c++``) with a warning;
* ``zig``: zig, and fail when ziglang is missing;
* ``system``: the system compiler; the module then needs this machine's glibc.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
import toolkit  # noqa: E402  (csrc/toolkit.py)


def _want_cuda_build() -> bool:
    mode = os.environ.get("ACNORM_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"ACNORM_BUILD_CUDA must be auto, 0 or 1 (got {mode!r})")
    if mode == "0":
        return False
    if toolkit.find_nvcc() is None:
        if mode == "1":
            raise SystemExit("ACNORM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return False
    try:
        toolkit.gencode_flags(toolkit.requested_archs())
    except ValueError as error:
        raise SystemExit(f"ACNORM_CUDA_ARCHS: {error}") from None
    try:
        toolkit.toolchain_choice()
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return True


def _cpu_build_mode() -> str:
    mode = os.environ.get("ACNORM_BUILD_CPU", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"ACNORM_BUILD_CPU must be auto, 0 or 1 (got {mode!r})")
    try:
        toolkit.toolchain_choice()
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return mode


class ModuleBuild(build_ext):
    """Builds ``acnorm_fused._cuda`` with :func:`toolkit.build_module` and
    ``acnorm_fused._cpu`` with :func:`toolkit.build_cpu_module`."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        if ext.name == "acnorm_fused._cuda":
            toolkit.build_module(target, Path(self.build_temp).resolve() / "acnorm_cuda")
        elif ext.name == "acnorm_fused._cpu":
            try:
                toolkit.build_cpu_module(target)
            except (OSError, subprocess.CalledProcessError, ValueError) as error:
                if _cpu_build_mode() == "1":
                    raise SystemExit(f"ACNORM_BUILD_CPU=1 but acnorm_fused._cpu did not build: {error}") from None
                print(f"warning: acnorm_fused._cpu did not build ({error}); wide layers on the CPU run the "
                      "slower PyTorch version of the windowed C x C step", file=sys.stderr)
        else:
            super().build_extension(ext)


ext_modules = []
if _cpu_build_mode() != "0":
    ext_modules.append(Extension(
        "acnorm_fused._cpu", sources=[str(p.relative_to(ROOT)) for p in toolkit.cpu_module_sources()]))
if _want_cuda_build():
    ext_modules.append(Extension(
        "acnorm_fused._cuda", sources=[str(p.relative_to(ROOT)) for p in toolkit.module_sources()]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": ModuleBuild})
