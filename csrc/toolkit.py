"""Building ``acnorm_fused._cuda`` from the sources in ``csrc/acnorm``, for
``setup.py`` (nvcc, GPU code) and for the tests (the host emulator, no GPU).

A generated ninja file compiles the kernels with nvcc, or with the host
compiler under ``-DACNORM_EMULATE``, and the pybind11 binding with the host
compiler, then links them with the static CUDA runtime and no torch library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "acnorm"
DEFAULT_ARCHS = "8.0 8.6 8.9 9.0 10.0 12.0+PTX"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` when set, else the ``nvcc`` on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def requested_archs() -> str:
    """``ACNORM_CUDA_ARCHS``, else ``TORCH_CUDA_ARCH_LIST``, else the default list."""
    return os.environ.get("ACNORM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS


def gencode_flags(spec: str) -> list[str]:
    """nvcc ``-gencode`` flags for an architecture list such as ``"8.0;9.0+PTX"``:
    entries separated by spaces, commas or semicolons, each ``X.Y`` for SASS,
    with ``+PTX`` to add that architecture's PTX."""
    entries = [e for e in re.split(r"[\s,;]+", spec.strip()) if e]
    if not entries:
        raise ValueError("the CUDA architecture list is empty: name at least one, e.g. 9.0")
    flags = []
    for entry in entries:
        match = _ARCH.match(entry)
        if match is None:
            raise ValueError(f"CUDA architecture {entry!r} is not of the form X.Y or X.Y+PTX (e.g. 9.0, 12.0+PTX)")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if match.group(4):
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def toolkit_root(nvcc: str | None = None) -> Path:
    """The CUDA toolkit (headers, static runtime) behind ``nvcc``, which may be
    a wrapper script on PATH."""
    nvcc = nvcc or find_nvcc()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        try:  # nvcc names its own installation in a dry run
            dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
            top = re.search(r"^#\$ TOP=(.+)$", dry, re.M)
            if top:
                candidates.append(top.group(1).strip())
        except OSError:
            pass
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return Path(candidate).resolve()
    raise FileNotFoundError("no CUDA toolkit found (cuda_runtime_api.h); set CUDA_HOME")


def static_cudart(root: Path) -> Path:
    for lib in [root / "lib64", root / "lib", *sorted((root / "targets").glob("*/lib"))]:
        if (lib / "libcudart_static.a").is_file():
            return lib / "libcudart_static.a"
    raise FileNotFoundError(f"libcudart_static.a not found under {root}; set CUDA_HOME to a full toolkit")


def ninja_binary() -> str:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        raise FileNotFoundError("building acnorm_fused._cuda needs ninja (pip install ninja)") from None
    return str(Path(ninja.BIN_DIR) / "ninja")


def build_module(target: Path, build_dir: Path, archs: str | None = None, emulate: bool = False) -> Path:
    """Compile and link the module into ``target`` (a ``_cuda`` extension file
    name); ``emulate`` builds the host emulation instead of GPU code."""
    try:
        import pybind11
    except ImportError:
        raise FileNotFoundError("building acnorm_fused._cuda needs pybind11 (pip install pybind11)") from None

    root = toolkit_root()
    cxx = os.environ.get("CXX", "c++")
    includes = f"-I{SOURCES} -I{root / 'include'}"
    cxx_flags = f"-std=c++17 -O2 -fPIC -fvisibility=hidden {includes}"
    if emulate:
        kernel_rule = f"  command = {cxx} {cxx_flags} -DACNORM_EMULATE -x c++ -c $in -o $out"
        cxx_flags += " -DACNORM_EMULATE"
    else:
        nvcc = find_nvcc()
        if nvcc is None:
            raise FileNotFoundError("nvcc not found (set CUDA_HOME or PATH)")
        gencode = " ".join(gencode_flags(archs or requested_archs()))
        kernel_rule = (f"  command = {nvcc} -std=c++17 -O3 --threads 0 -Xcompiler -fPIC "
                       f"-Xcompiler -fvisibility=hidden {gencode} {includes} -c $in -o $out")
    build_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    headers = " ".join(str(p) for p in sorted(SOURCES.glob("*.h*")))
    lines = [
        "ninja_required_version = 1.3",
        "rule kernel",
        kernel_rule,
        "  description = compile $in",
        "rule cxx",
        f"  command = {cxx} {cxx_flags} -I{pybind11.get_include()} -I{sysconfig.get_paths()['include']} "
        "-c $in -o $out",
        "  description = compile $in",
        "rule link",
        f"  command = {cxx} -shared -static-libstdc++ -static-libgcc -o $out $in {static_cudart(root)} "
        "-lpthread -ldl -lrt",
        "  description = link $out",
    ]
    objects = []
    for source in sorted(SOURCES.glob("*.cu")) + sorted(SOURCES.glob("*.cpp")):
        obj = build_dir / (source.name + ".o")
        lines.append(f"build {obj}: {'kernel' if source.suffix == '.cu' else 'cxx'} {source} | {headers}")
        objects.append(str(obj))
    lines.append(f"build {target}: link {' '.join(objects)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    what = "the host emulation" if emulate else f"CUDA archs {archs or requested_archs()}"
    print(f"building {target.name} ({what})", file=sys.stderr)
    subprocess.run([ninja_binary(), "-C", str(build_dir)], check=True)
    return target


def module_sources() -> list[Path]:
    """Every file the module is built from (for rebuild checks and sdists)."""
    return sorted(p for p in SOURCES.iterdir() if p.suffix in {".cu", ".cuh", ".h", ".cpp"})


def needed_libraries(path: Path) -> list[str]:
    """The shared libraries an ELF64 little-endian file names in DT_NEEDED."""
    import struct

    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strings = sections[link][4]
        for position in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, position)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strings + value)
                needed.append(data[strings + value:end].decode())
    return needed
