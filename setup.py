"""Build script for acnorm-fused.

The Python package is pure Python. The CUDA extension ``acnorm_fused._cuda``
(``csrc/``) is optional and controlled by ``ACNORM_BUILD_CUDA``:

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


class NinjaBuild(build_ext):
    """Builds ``acnorm_fused._cuda`` with :func:`toolkit.build_module`."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "acnorm_fused._cuda":
            super().build_extension(ext)
            return
        toolkit.build_module(Path(self.get_ext_fullpath(ext.name)).resolve(),
                             Path(self.build_temp).resolve() / "acnorm_cuda")


ext_modules = []
if _want_cuda_build():
    ext_modules.append(Extension(
        "acnorm_fused._cuda", sources=[str(p.relative_to(ROOT)) for p in toolkit.module_sources()]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaBuild})
