"""Building the compiled modules from ``csrc/``, for ``setup.py`` and the tests.

``acnorm_fused._cuda`` (``csrc/acnorm``): a generated ninja file compiles the
kernels with nvcc (GPU code), or with the host compiler under
``-DACNORM_EMULATE`` (the host emulator, no GPU), and the pybind11 binding
with the host compiler, then links them with the static CUDA runtime and no
torch library.

``acnorm_fused._cpu`` (``csrc/cpu``): one C file against the CPython API
(the wide layers' C x C step), compiled and linked in one command.

Both are linked by zig (the ``ziglang`` package) targeting glibc
:data:`GLIBC_TARGET`, so that they load on every Linux that torch's own
wheels (manylinux_2_28) load on; ``ACNORM_HOST_TOOLCHAIN`` picks the
compiler (:func:`host_toolchain`, :func:`c_toolchain`). nvcc keeps its
supported host compiler (gcc) for the kernels' host code: its objects only
use the Itanium C++ ABI (``__cxa_*``, the personality routine, the unwinder)
that zig's libc++abi and libunwind provide as well, and nvcc's headers refuse
libc++ on x86.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "acnorm"
CPU_SOURCES = Path(__file__).resolve().parent / "cpu"
DEFAULT_ARCHS = "8.0 8.6 8.9 9.0 10.0 12.0+PTX"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")
# The newest glibc the GPU module may need: that of torch's own Linux wheels.
GLIBC_TARGET = (2, 28)
TOOLCHAIN_CHOICES = ("auto", "zig", "system")


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


@dataclass(frozen=True)
class HostToolchain:
    """A host compiler (C++ for the GPU module's binding and link, C for the
    CPU module), with the flags that differ between compilers."""

    cxx: str  # a command line, possibly with flags
    compile_flags: str
    link_flags: str
    description: str


def zig_binary() -> str | None:
    """The ``zig`` executable of the ``ziglang`` package, if it is installed."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or spec.origin is None:
        return None
    zig = Path(spec.origin).parent / "zig"
    return str(zig) if zig.is_file() else None


def system_toolchain() -> HostToolchain:
    """``$CXX`` (else ``c++``): the module needs this machine's glibc."""
    # Only libc stays shared; the C++ runtime travels inside the module.
    return HostToolchain(os.environ.get("CXX", "c++"), "", "-static-libstdc++ -static-libgcc",
                         "the system C++ compiler, this machine's glibc")


def _zig_target() -> tuple[str, str]:
    """``(zig's -target option for glibc GLIBC_TARGET, that glibc as text)``."""
    glibc = ".".join(map(str, GLIBC_TARGET))
    return f"-target x86_64-linux-gnu.{glibc}", glibc


def zig_toolchain(zig: str) -> HostToolchain:
    """zig's clang and libc++ (linked statically), against glibc GLIBC_TARGET."""
    target, glibc = _zig_target()
    return HostToolchain(
        f"{zig} c++ {target}",
        # zig emits debug information unless told not to; the system build has none.
        "-g0",
        # Without -O the link is a zig debug build, which adds the UBSan runtime;
        # the libc++ zig builds for the target carries debug information.
        "-O2 -Wl,--strip-debug",
        f"zig c++, glibc {glibc}")


def toolchain_choice() -> str:
    """``ACNORM_HOST_TOOLCHAIN``: ``auto`` (the default), ``zig`` or ``system``."""
    choice = os.environ.get("ACNORM_HOST_TOOLCHAIN", "auto").strip().lower()
    if choice not in TOOLCHAIN_CHOICES:
        raise ValueError(f"ACNORM_HOST_TOOLCHAIN must be one of {', '.join(TOOLCHAIN_CHOICES)} (got {choice!r})")
    return choice


def _target_zig(module: str) -> str | None:
    """zig for :data:`GLIBC_TARGET` by :func:`toolchain_choice`, or None for the
    system compiler (with a warning when zig was wanted but is not installed)."""
    choice = toolchain_choice()
    if choice == "system":
        return None
    zig = zig_binary() if sys.platform == "linux" and platform.machine() == "x86_64" else None
    if zig is None and choice == "zig":
        raise FileNotFoundError("ACNORM_HOST_TOOLCHAIN=zig needs the ziglang package on Linux x86_64 "
                                "(pip install ziglang)")
    if zig is None:
        print(f"warning: ziglang is not installed (pip install ziglang): {module} is linked against this "
              "machine's glibc and will not load on older Linux distributions", file=sys.stderr)
    return zig


def host_toolchain() -> HostToolchain:
    """The binding's and link's compiler for the GPU module, by
    :func:`toolchain_choice`: ``zig`` (needs the ziglang package), ``system``,
    or ``auto`` (zig where it is installed on Linux x86_64, else the system
    compiler, with a warning)."""
    zig = _target_zig("the CUDA module")
    return system_toolchain() if zig is None else zig_toolchain(zig)


def c_toolchain() -> HostToolchain:
    """The C compiler of the CPU module, chosen as :func:`host_toolchain`: zig's
    ``cc`` for glibc :data:`GLIBC_TARGET` (no C++ runtime, so nothing to build
    first), else ``$CC`` (else ``cc``)."""
    zig = _target_zig("the CPU module")
    if zig is None:
        return HostToolchain(os.environ.get("CC", "cc"), "", "", "the system C compiler, this machine's glibc")
    target, glibc = _zig_target()
    # LLVM turns the window searches' conditional moves back into branches for
    # generic x86-64 (its cmov converter), which mispredict on every other step:
    # the window state took 1.0 ms instead of 0.26 ms at 4096 channels.
    return HostToolchain(f"{zig} cc {target}", "-g0 -mllvm -x86-cmov-converter=false",
                         "-Wl,--strip-debug", f"zig cc, glibc {glibc}")


def build_cpu_module(target: Path, toolchain: HostToolchain | None = None) -> Path:
    """Compile and link ``acnorm_fused._cpu`` into ``target`` (an extension file
    name), with :func:`c_toolchain` unless ``toolchain`` is given."""
    toolchain = toolchain or c_toolchain()
    target.parent.mkdir(parents=True, exist_ok=True)
    # No -ffast-math, ever: the window rule must round as the PyTorch comparison does.
    command = (f"{toolchain.cxx} -std=c11 -O2 -fPIC -shared -fvisibility=hidden -Wall -Werror "
               f"{toolchain.compile_flags} {toolchain.link_flags} -I{sysconfig.get_paths()['include']} "
               f"-o {target} {' '.join(str(p) for p in cpu_module_sources() if p.suffix == '.c')} -lm")
    print(f"building {target.name} ({toolchain.description})", file=sys.stderr)
    subprocess.run(shlex.split(command), check=True)
    return target


def cpu_module_sources() -> list[Path]:
    """Every file the CPU module is built from."""
    return sorted(p for p in CPU_SOURCES.iterdir() if p.suffix in {".c", ".h"})


def build_module(target: Path, build_dir: Path, archs: str | None = None, emulate: bool = False) -> Path:
    """Compile and link the module into ``target`` (a ``_cuda`` extension file
    name); ``emulate`` builds the host emulation instead of GPU code."""
    try:
        import pybind11
    except ImportError:
        raise FileNotFoundError("building acnorm_fused._cuda needs pybind11 (pip install pybind11)") from None

    root = toolkit_root()
    # The emulation is for tests on this machine: no glibc target to meet.
    toolchain = system_toolchain() if emulate else host_toolchain()
    cxx = toolchain.cxx
    includes = f"-I{SOURCES} -I{root / 'include'}"
    cxx_flags = f"-std=c++17 -O2 -fPIC -fvisibility=hidden {toolchain.compile_flags} {includes}"
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
        f"  command = {cxx} -shared {toolchain.link_flags} -o $out $in {static_cudart(root)} -lpthread -ldl -lrt",
        "  description = link $out",
    ]
    objects = []
    for source in sorted(SOURCES.glob("*.cu")) + sorted(SOURCES.glob("*.cpp")):
        obj = build_dir / (source.name + ".o")
        lines.append(f"build {obj}: {'kernel' if source.suffix == '.cu' else 'cxx'} {source} | {headers}")
        objects.append(str(obj))
    lines.append(f"build {target}: link {' '.join(objects)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    what = "the host emulation" if emulate else f"CUDA archs {archs or requested_archs()}; {toolchain.description}"
    print(f"building {target.name} ({what})", file=sys.stderr)
    subprocess.run([ninja_binary(), "-C", str(build_dir)], check=True)
    return target


def module_sources() -> list[Path]:
    """Every file the module is built from (for rebuild checks and sdists)."""
    return sorted(p for p in SOURCES.iterdir() if p.suffix in {".cu", ".cuh", ".h", ".cpp"})


def _elf_sections(path: Path) -> tuple[bytes, list[tuple]]:
    """An ELF64 little-endian file's bytes and its section headers (each
    ``(name, type, flags, addr, offset, size, link, info, align, entsize)``)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    return data, [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]


def _string(data: bytes, table: int, offset: int) -> str:
    """The NUL-terminated string at ``offset`` in the string table at ``table``."""
    start = table + offset
    return data[start:data.index(b"\0", start)].decode()


def needed_libraries(path: Path) -> list[str]:
    """The shared libraries an ELF64 little-endian file names in DT_NEEDED."""
    data, sections = _elf_sections(path)
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
                needed.append(_string(data, strings, value))
    return needed


def needed_versions(path: Path) -> dict[str, list[str]]:
    """The symbol versions an ELF64 little-endian file needs, per library, as
    its version-needed section lists them (``objdump -T`` shows them beside
    each symbol, e.g. ``GLIBC_2.34``)."""
    data, sections = _elf_sections(path)
    versions: dict[str, list[str]] = {}
    for _name, kind, _flags, _addr, offset, _size, link, count, _align, _entsize in sections:
        if kind != 0x6FFFFFFE:  # SHT_GNU_verneed; sh_info holds its entry count
            continue
        strings = sections[link][4]
        entry = offset
        for _ in range(count):  # Elf64_Verneed, each followed by its Elf64_Vernaux list
            _version, aux_count, file, aux, next_entry = struct.unpack_from("<HHIII", data, entry)
            names = versions.setdefault(_string(data, strings, file), [])
            position = entry + aux
            for _ in range(aux_count):
                _hash, _flags, _other, name, next_aux = struct.unpack_from("<IHHII", data, position)
                names.append(_string(data, strings, name))
                position += next_aux
            entry += next_entry
    return versions


def glibc_needed(path: Path) -> tuple[int, ...]:
    """The newest glibc version an ELF64 file needs (its highest ``GLIBC_x.y``
    symbol version), ``()`` if it needs none."""
    found = [tuple(int(part) for part in name[len("GLIBC_"):].split("."))
             for names in needed_versions(path).values() for name in names
             if re.fullmatch(r"GLIBC_\d+(\.\d+)*", name)]
    return max(found, default=())
