"""Build script for acnorm-fused.

The Python package is pure Python. The CUDA extension ``acnorm_fused._cuda``
(``csrc/``) is optional and controlled by ``ACNORM_BUILD_CUDA``:

* ``auto`` (default): build it when ``nvcc`` is found, otherwise build nothing;
* ``0``: never build it;
* ``1``: build it, and fail loudly when that is impossible.

It is compiled with nvcc through ninja for the architectures in
``ACNORM_CUDA_ARCHS`` (else ``TORCH_CUDA_ARCH_LIST``; default
``8.0 8.6 8.9 9.0 10.0 12.0+PTX``), entries separated by spaces, commas or
semicolons, each ``X.Y`` (SASS) with ``+PTX`` to add that architecture's PTX.
The CUDA runtime is linked statically and no torch library at all, so the
module works with any torch release; ``CUDA_HOME`` picks the toolkit when the
``nvcc`` on PATH is not the one to use.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "acnorm"
DEFAULT_ARCHS = "8.0 8.6 8.9 9.0 10.0 12.0+PTX"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _want_cuda_build() -> bool:
    mode = os.environ.get("ACNORM_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"ACNORM_BUILD_CUDA must be auto, 0 or 1 (got {mode!r})")
    if mode == "0":
        return False
    if _nvcc() is None:
        if mode == "1":
            raise SystemExit("ACNORM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return False
    return True


def gencode_flags(spec: str) -> list[str]:
    """nvcc ``-gencode`` flags for an architecture list such as ``"8.0;9.0+PTX"``."""
    flags = []
    entries = [e for e in re.split(r"[\s,;]+", spec.strip()) if e]
    if not entries:
        raise SystemExit("ACNORM_CUDA_ARCHS is empty: name at least one architecture, e.g. 9.0")
    for entry in entries:
        match = _ARCH.match(entry)
        if match is None:
            raise SystemExit(f"CUDA architecture {entry!r} is not of the form X.Y or X.Y+PTX (e.g. 9.0, 12.0+PTX)")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if match.group(4):
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def _toolkit_root(nvcc: str) -> Path:
    """The CUDA toolkit behind ``nvcc`` (which may be a wrapper script on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    try:  # nvcc names its own installation in a dry run
        dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        top = re.search(r"^#\$ TOP=(.+)$", dry, re.M)
        if top:
            candidates.insert(2, top.group(1).strip())
    except OSError:
        pass
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return Path(candidate).resolve()
    raise SystemExit(f"no CUDA toolkit headers found next to {nvcc}; set CUDA_HOME")


def _static_cudart(root: Path) -> Path:
    for lib in [root / "lib64", root / "lib", *sorted((root / "targets").glob("*/lib"))]:
        if (lib / "libcudart_static.a").is_file():
            return lib / "libcudart_static.a"
    raise SystemExit(f"libcudart_static.a not found under {root}; set CUDA_HOME to a full toolkit")


def _ninja() -> str:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        raise SystemExit("building the CUDA extension needs ninja (pip install ninja)") from None
    return str(Path(ninja.BIN_DIR) / "ninja")


class CudaExtension(Extension):
    """The nvcc-built module; its sources are listed for sdists and rebuild checks."""


class NinjaBuild(build_ext):
    """Compiles :class:`CudaExtension` with nvcc (kernels) and the host compiler
    (pybind11 binding) through a generated ninja file."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CudaExtension):
            super().build_extension(ext)
            return
        import pybind11

        nvcc = _nvcc()
        root = _toolkit_root(nvcc)
        archs = os.environ.get("ACNORM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        gencode = " ".join(gencode_flags(archs))
        cxx = os.environ.get("CXX", "c++")
        includes = f"-I{CSRC} -I{root / 'include'}"
        build_dir = Path(self.build_temp).resolve() / "acnorm_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        headers = " ".join(str(p) for p in sorted(CSRC.glob("*.h*")))
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"cxx = {cxx}",
            f"nvcc_flags = -std=c++17 -O3 --threads 0 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden {gencode} {includes}",
            f"cxx_flags = -std=c++17 -O2 -fPIC -fvisibility=hidden {includes} -I{pybind11.get_include()} "
            f"-I{sysconfig.get_paths()['include']}",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -c $in -o $out",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $cxx $cxx_flags -c $in -o $out",
            "  description = c++ $in",
            "rule link",
            f"  command = $cxx -shared -static-libstdc++ -static-libgcc -o $out $in {_static_cudart(root)} "
            "-lpthread -ldl -lrt",
            "  description = link $out",
        ]
        objects = []
        for source in ext.sources:
            path = ROOT / source
            obj = build_dir / (path.name + ".o")
            rule = "nvcc" if path.suffix == ".cu" else "cxx"
            lines.append(f"build {obj}: {rule} {path} | {headers}")
            objects.append(str(obj))
        lines.append(f"build {target}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        print(f"building {ext.name} for {archs} with {nvcc}", file=sys.stderr)
        subprocess.run([_ninja(), "-C", str(build_dir)], check=True)


ext_modules = []
if _want_cuda_build():
    ext_modules.append(CudaExtension(
        "acnorm_fused._cuda",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))],
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaBuild})
