"""Kernel audit without a GPU: what the compiled Triton kernels look like, and
how many bytes each fused op moves.

Two facts make this possible on a CPU machine:

- Triton compiles ahead of time for a GPU target with no GPU present. The
  audit records the launches the dispatcher really makes (the launch
  heuristics sized for an H100's 132 multiprocessors, on the DESIGN section 6
  shapes, every dtype, layout and activation), binds their arguments with
  triton's own specialisation code, as a launch on 16-byte-aligned tensors
  does, and compiles each distinct kernel for sm_80, sm_90 and sm_100. From
  the PTX it reads the width of every global load and store, from the cubin
  (``cuobjdump -res-usage``) registers, shared memory and local memory
  (spills).
- Under ``TRITON_INTERPRET=1`` every load and store runs through Python, so
  the bytes a fused op moves can be counted exactly, split into the streamed
  tensors (x, dy, the output) and the per-channel side buffers.

The two parts need triton in different modes, chosen when triton is
imported, so :func:`run_audit` runs each in a subprocess.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backends.config import StepConfig
from .cases import AUDIT_QUICK_CASES, AUDIT_TRAFFIC_CASES, GPU_CHANNELS_LAST_SHAPES, GPU_SHAPES

# The GPU the launch heuristics are sized for in the audit: an H100 SXM.
MULTIPROCESSORS = 132
ARCHS = (80, 90, 100)
DTYPES = ("float32", "float16", "bfloat16")
ACTIVATIONS = ("", "relu", "leaky_relu")
# Kernels that stream the large tensors (the others touch per-channel data only).
STREAMING = ("reduce_planar_kernel", "reduce_interleaved_kernel", "elementwise_planar_kernel",
             "elementwise_interleaved_kernel")
# Pointer parameters of the streaming kernels that walk the large tensors.
_STREAMED_POINTERS = ("x_ptr", "dy_ptr", "out_ptr")
# Fewest bytes per element of x (in units of its size) of the multi-pass
# kernels: forward read, read, write; backward (x, dy) read twice, dx written.
MIN_TRAFFIC = {"forward": 3, "backward": 5, "eval": 2}


@dataclass
class Launch:
    """One kernel launch the dispatcher made: the kernel and its arguments."""

    kernel: Any  # a triton JITFunction (triton has no type information)
    args: tuple
    kwargs: dict
    case: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class KernelFacts:
    """What the compiled code of one specialised kernel shows."""

    name: str
    arch: int
    config: str
    cases: list[str] = field(default_factory=list)
    registers: int = 0
    shared: int = 0
    local: int = 0
    loads: dict[int, int] = field(default_factory=dict)  # bytes per instruction -> count
    stores: dict[int, int] = field(default_factory=dict)
    # The same launch with the streamed tensors' pointers not known to be
    # aligned: the difference to it is what the alignment hints buy.
    unaligned_loads: dict[int, int] = field(default_factory=dict)
    unaligned_stores: dict[int, int] = field(default_factory=dict)
    streams: int = 0  # tensors a thread streams through loads
    stream_bytes: int = 0  # bytes per tensor a thread streams per tile
    writes: bool = False  # whether it streams an output
    error: str = ""

    @property
    def per_tile(self) -> int:
        """16-byte accesses one streamed tensor's tile needs per thread."""
        return max(1, self.stream_bytes // 16)

    @property
    def vector_accesses(self) -> tuple[int, int]:
        """16-byte loads and stores per tile that the streamed tensors' alignment buys."""
        return (self.loads.get(16, 0) - self.unaligned_loads.get(16, 0),
                self.stores.get(16, 0) - self.unaligned_stores.get(16, 0))

    def findings(self) -> list[str]:
        """Regressions: spills, and streaming loops on aligned input that do not
        move all their bytes in 16-byte accesses (each streamed tensor's tile
        needs ``stream_bytes / 16`` of them per thread)."""
        where = f"{self.name} sm_{self.arch} ({self.config})"
        if self.error:
            return [f"{where}: does not compile: {self.error}"]
        found = []
        if self.local:
            found.append(f"{where}: {self.local} bytes of local memory (spills)")
        if self.streams:
            per_tile = self.per_tile
            loads, stores = self.vector_accesses
            if loads < self.streams * per_tile:
                found.append(f"{where}: {loads} 16-byte streaming loads per tile, {self.streams * per_tile} "
                             f"needed (aligned {self.loads}, unaligned {self.unaligned_loads})")
            if self.writes and stores < per_tile:
                found.append(f"{where}: {stores} 16-byte streaming stores per tile, {per_tile} needed "
                             f"(aligned {self.stores}, unaligned {self.unaligned_stores})")
        return found


def _kernels() -> list:
    from ..backends.triton import KERNELS

    return list(KERNELS)


@contextlib.contextmanager
def recording(case: str, launches: list[Launch], multiprocessors: int = MULTIPROCESSORS) -> Iterator[None]:
    """Record the Triton launches made inside the block instead of running them,
    with the launch heuristics sized for ``multiprocessors``."""
    from ..backends import geometry

    kernels = _kernels()
    saved_count = geometry._worker_count
    geometry._worker_count = lambda device: multiprocessors
    for kernel in kernels:
        kernel.run = (lambda k: lambda *args, grid, warmup, **kwargs: launches.append(
            Launch(k, args, kwargs, case)))(kernel)
    try:
        yield
    finally:
        geometry._worker_count = saved_count
        for kernel in kernels:
            del kernel.run


def _case_tensors(shape, dtype: str, layout: str, device: str):
    x = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    channels = shape[1]
    generator = torch.Generator().manual_seed(0)
    affines = (0.5 + torch.rand((4, channels), generator=generator)).to(device)
    running = (torch.zeros(channels, device=device), torch.ones(channels, device=device))
    return x, affines, running


def _as_is(step: str, inputs: list[torch.Tensor], fn: Callable):
    return fn()


def run_steps(backend, x, affines, running, activation: str, around: Callable = _as_is) -> None:
    """A training forward and backward, and an eval forward, through ``backend``;
    each step runs as ``around(step name, its large inputs, the call)``."""
    train = StepConfig(True, 0.19, 1e-5, 1.0, activation, 0.01)
    evaluate = StepConfig(False, 0.19, 1e-5, 1.0, activation, 0.01)
    forward = around("forward", [x], lambda: backend.forward(x, affines, *running, train))
    _, mean, invstd, _, _, aux = forward
    grad = torch.randn_like(forward[0])
    around("backward", [x, grad], lambda: backend.backward(grad, x, mean, invstd, aux, train))
    around("eval", [x], lambda: backend.forward(x, affines, *running, evaluate))


def launches_for(shape, dtype: str, layout: str, activation: str) -> list[Launch]:
    """The kernel launches of one training step and one eval forward on ``shape``
    (meta tensors: nothing is allocated or run)."""
    from ..backends import fused_backend

    triton_backend = fused_backend("triton")

    launches: list[Launch] = []
    x, affines, running = _case_tensors(shape, dtype, layout, "meta")
    case = f"{'x'.join(map(str, shape))} {dtype} {layout} {activation or 'none'}"
    with recording(case, launches):
        run_steps(triton_backend, x, affines, running, activation)
        _planned_finalise(triton_backend.kernels, x, affines, running)
    return launches


def _planned_cuda_layer(module, shape, dtype: str, layout: str):
    """An ``ACNorm3d(backend="cuda")`` layer whose launch plan for ``x`` is built,
    ``x`` and a gradient for its output (CPU tensors, for the host emulator)."""
    from ..modules import ACNorm3d

    if not getattr(module, "emulated", False):
        raise ValueError("the step audit counts what the host emulator runs: pass the emulated module")
    x, _, _ = _case_tensors(shape, dtype, layout, "cpu")
    x = x.normal_().requires_grad_()
    grad = torch.randn_like(x)
    layer = ACNorm3d(shape[1], backend="cuda")
    layer(x).backward(grad)  # builds the plan
    return layer, x, grad


def cuda_step_launches(module, shape, dtype: str = "float32", layout: str = "contiguous") -> dict[str, int]:
    """Kernel launches of one eager training step of an ``ACNorm3d(backend="cuda")``
    layer whose launch plan is built, ``{"forward": n, "backward": m}``, as
    ``module`` (the host emulation of the CUDA kernels, whose
    ``emulated_launches`` counts them) runs them on CPU tensors."""
    from ..backends import using_cuda_extension

    counts = {}
    with using_cuda_extension(module):
        layer, x, grad = _planned_cuda_layer(module, shape, dtype, layout)
        start = module.emulated_launches()
        out = layer(x)
        counts["forward"] = module.emulated_launches() - start
        out.backward(grad)
        counts["backward"] = module.emulated_launches() - start - counts["forward"]
    return counts


def cuda_step_reads(module, shape, dtype: str = "float32", layout: str = "contiguous") -> dict[str, float]:
    """Bytes the kernels of one planned eager training step read from x (forward,
    backward) and from the output gradient (backward), in units of x's size,
    as the host emulation of the CUDA kernels counts them: 1.0 where x is
    read from memory once, plus the channels' first values (the centring
    pilot) the forward reads apart."""
    from ..backends import using_cuda_extension

    with using_cuda_extension(module):
        layer, x, grad = _planned_cuda_layer(module, shape, dtype, layout)
        size = x.numel() * x.element_size()
        module.watch_reads(x.data_ptr(), size)
        out = layer(x)
        reads = {"forward_x": module.watched_reads() / size}
        module.watch_reads(x.data_ptr(), size)
        out.backward(grad)
        reads["backward_x"] = module.watched_reads() / size
        out = layer(x)
        module.watch_reads(grad.data_ptr(), size)
        out.backward(grad)
        reads["backward_dy"] = module.watched_reads() / size
        module.watch_reads(0, 0)
    return reads


def _planned_finalise(kernels, x: torch.Tensor, affines: torch.Tensor, running: tuple) -> None:
    """The forward finalise as a launch plan runs it (acnorm_fused.backends.plan):
    the affines checked into a status word, the running statistics moved in place."""
    from ..backends.abi import AUX_ROWS
    from ..backends.geometry import geometry

    geo = geometry(x)
    stats = [x.new_empty((geo.c,), dtype=torch.float32) for _ in range(2)]
    aux = x.new_empty((AUX_ROWS, geo.c), dtype=torch.float32)
    partials = x.new_empty((3, geo.c, geo.splits), dtype=torch.float32)
    kernels.finalise_forward(geo, x, affines.unbind(0), partials, None, float(geo.count), *running,
                             (*stats, *running, aux), 0.19, 1e-5, 1.0,
                             x.new_empty((1,), dtype=torch.int32))


def default_launches(dtypes: Sequence[str] = DTYPES, activations: Sequence[str] = ACTIVATIONS) -> list[Launch]:
    """Every launch of the DESIGN section 6 shapes (both layouts where the
    benchmark table has them), over ``dtypes`` and ``activations``."""
    cases = [(s, "contiguous") for s in GPU_SHAPES]
    cases += [(s, "channels_last") for s in GPU_CHANNELS_LAST_SHAPES]
    return [launch for shape, layout in cases for dtype in dtypes for activation in activations
            for launch in launches_for(shape, dtype, layout, activation)]


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def _access_widths(ptx: str) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes per global load and store instruction in ``ptx``, counted."""
    loads: collections.Counter = collections.Counter()
    stores: collections.Counter = collections.Counter()
    for op, vector, bits in _WIDTH.findall(ptx):
        width = int(vector or 1) * int(bits) // 8
        (loads if op == "ld" else stores)[width] += 1
    return dict(loads), dict(stores)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, shared bytes, local bytes)`` from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", handle.name], capture_output=True,
                              text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:\d+ SHARED:(\d+) LOCAL:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    return int(usage.group(1)), int(usage.group(2)), int(usage.group(3))


def _stand_in(arg):
    """A 16-byte-aligned tensor of the argument's dtype: a launch specialises on
    a pointer's alignment, never on its size."""
    return torch.empty(16, dtype=arg.dtype) if isinstance(arg, torch.Tensor) else arg


def _streaming(launch: Launch) -> tuple[int, int, bool]:
    """``(tensors streamed by loads, bytes per tensor a thread streams per tile,
    whether an output is streamed)`` of a launch; zeros for per-channel kernels."""
    if launch.name not in STREAMING:
        return 0, 0, False
    kwargs = launch.kwargs
    tile = kwargs["BLOCK"] if "BLOCK" in kwargs else kwargs["BLOCK_R"] * kwargs["BLOCK_C"]
    elements = max(1, tile // (32 * kwargs["num_warps"]))
    size = launch.args[0].element_size()
    return (2 if kwargs["GRAD"] else 1), elements * size, launch.name.startswith("elementwise")


def compile_launches(launches: Sequence[Launch], archs: Sequence[int] = ARCHS,
                     progress: Callable[[str], None] | None = None) -> list[KernelFacts]:
    """Compile every distinct specialisation among ``launches`` for ``archs``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    facts: dict[tuple, KernelFacts] = {}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binders = {}
        for launch in launches:
            kernel = launch.kernel
            if kernel not in binders:
                binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binders[kernel](*map(_stand_in, launch.args), **launch.kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound,
                                                                      specialization, options)
            config = ", ".join([f"{k}={v}" for k, v in launch.kwargs.items() if k.isupper() or k == "num_warps"]
                               + [f"{signature[kernel.arg_names[0]]}"])
            key = (launch.name, arch, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), json.dumps(options.__dict__, sort_keys=True, default=str))
            if key in facts:
                facts[key].cases.append(launch.case)
                continue
            entry = KernelFacts(launch.name, arch, config, [launch.case])
            entry.streams, entry.stream_bytes, entry.writes = _streaming(launch)
            facts[key] = entry
            if progress is not None:
                progress(f"sm_{arch} {launch.name} ({config})")
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                entry.loads, entry.stores = _access_widths(compiled.asm["ptx"])
                entry.registers, entry.shared, entry.local = _resource_usage(compiled.asm["cubin"])
                if entry.streams:
                    streamed = {(kernel.arg_names.index(n),) for n in _STREAMED_POINTERS if n in kernel.arg_names}
                    unaligned_attrs = {k: ([] if k in streamed else v) for k, v in attrs.items()}
                    unaligned = triton.compile(ASTSource(kernel, signature, constexprs, unaligned_attrs),
                                               target=target, options=options.__dict__)
                    entry.unaligned_loads, entry.unaligned_stores = _access_widths(unaligned.asm["ptx"])
            except Exception as error:  # noqa: BLE001 - a compile failure is a finding, not a crash
                entry.error = str(error).splitlines()[0] if str(error) else type(error).__name__
    return list(facts.values())


@dataclass
class Traffic:
    """Bytes one fused op moved, counted under the interpreter."""

    case: str
    step: str  # forward, backward or eval
    elements: int
    element_size: int
    channels: int
    splits: int  # partial results per channel of the reduction passes
    stream_bytes: int = 0  # loads and stores of x, dy and the output
    side_bytes: int = 0  # everything else: partials, aux, affines, statistics

    @property
    def per_element(self) -> float:
        """Streamed bytes per element of x, in units of its size."""
        return self.stream_bytes / (self.elements * self.element_size)

    def excess(self) -> int:
        """Streamed bytes beyond the minimum of :data:`MIN_TRAFFIC`."""
        return self.stream_bytes - MIN_TRAFFIC[self.step] * self.elements * self.element_size

    def allowance(self) -> int:
        """Streamed bytes allowed beyond the minimum: the training forward reads
        each channel's first value (the centring pilot) once per statistics
        program and once in the finalise step."""
        return self.channels * (self.splits + 1) * self.element_size if self.step == "forward" else 0

    def findings(self) -> list[str]:
        if self.excess() <= self.allowance():
            return []
        return [f"{self.case} {self.step}: {self.per_element:.3f} bytes per element and byte of x streamed, "
                f"{self.excess()} bytes over the minimum of {MIN_TRAFFIC[self.step]} (allowed {self.allowance()})"]


# The oldest triton whose interpreter the byte count was run with; 3.6's
# interpreter fails on loop bounds computed from program ids.
INTERPRETER_MIN_TRITON = (3, 9)


def traffic_unsupported() -> str | None:
    """Why this triton's interpreter cannot count the bytes, or None when it can."""
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= INTERPRETER_MIN_TRITON:
        return None
    return (f"the byte count runs triton's interpreter, which in triton {triton.__version__} cannot run these "
            "kernels (3.6 fails on loop bounds taken from program ids); it needs triton >= "
            + ".".join(map(str, INTERPRETER_MIN_TRITON)))


@contextlib.contextmanager
def recording_accesses(accesses: list) -> Iterator[None]:
    """Record every global load and store the interpreter makes inside the block,
    as ``(addresses, bytes per element)`` of the elements its mask enables."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def record(ptrs, mask):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.asarray(mask.data, dtype=bool)]
        accesses.append((addresses, ptrs.get_element_ty().primitive_bitwidth // 8))

    # The builder's trailing arguments (cache policy, volatility, ...) vary
    # between triton versions: pass them through.
    def recorded_load(ptrs, mask, *args, **kwargs):
        record(ptrs, mask)
        return load(ptrs, mask, *args, **kwargs)

    def recorded_store(ptrs, value, mask, *args, **kwargs):
        record(ptrs, mask)
        return store(ptrs, value, mask, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = recorded_load, recorded_store
    try:
        yield
    finally:
        del builder.create_masked_load, builder.create_masked_store


def _split_bytes(accesses: list, streamed: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(bytes inside the streamed tensors, bytes elsewhere)`` of recorded accesses."""
    import numpy as np

    ranges = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in streamed]
    stream = side = 0
    for addresses, size in accesses:
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, stop in ranges:
            inside |= (addresses >= start) & (addresses < stop)
        stream += int(inside.sum()) * size
        side += int((~inside).sum()) * size
    return stream, side


def measure_traffic(shape, dtype: str, layout: str, activation: str = "relu") -> list[Traffic]:
    """Bytes of the training forward, the backward and the eval forward on a CPU
    tensor of ``shape``, run by the Triton kernels in the interpreter. The
    streamed tensors are x, dy and the op's output (known once it returns;
    every buffer of the op stays alive until then, so no address is reused)."""
    from ..backends import fused_backend

    triton_backend = fused_backend("triton")
    from ..backends.geometry import geometry

    x, affines, running = _case_tensors(shape, dtype, layout, "cpu")
    x.normal_()
    case = f"{'x'.join(map(str, shape))} {dtype} {layout}"
    results = []
    splits = geometry(x).splits

    def measured(step, inputs, fn):
        accesses: list = []
        with recording_accesses(accesses):
            value = fn()
        output = value[0]
        stream, side = _split_bytes(accesses, [*inputs, output])
        results.append(Traffic(case, step, x.numel(), x.element_size(), shape[1], splits, stream, side))
        return value

    run_steps(triton_backend, x, affines, running, activation, around=measured)
    return results


def cuda_module_facts(path: str | Path) -> list[dict]:
    """Registers, local memory (spills) and the widest global load of every
    kernel in a compiled ``acnorm_fused._cuda``, per architecture, from
    ``cuobjdump -res-usage`` and ``-sass``."""
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    widths: dict[tuple[str, str], str] = {}
    arch = ""
    for block in re.split(r"\n(?=\s*(?:arch = |Function : ))", sass):
        header = re.match(r"\s*arch = (sm_\d+)", block)
        if header:
            arch = header.group(1)
        function = re.match(r"\s+Function : (\S+)", block)
        if function:
            loads = re.findall(r"LDG\.E(?:\.(128|64|U16|S16|U8))?", block)
            widths[(arch, function.group(1))] = "128" if "128" in loads else "64" if "64" in loads else \
                "32" if "" in loads else "16" if loads else "-"
    facts = []
    arch = ""
    for line in usage.splitlines():
        header = re.search(r"arch = (sm_\d+)", line)
        if header:
            arch = header.group(1)
        function = re.match(r"\s*Function (\S+):", line)
        if function:
            name = function.group(1)
        resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if resources:
            demangled = re.search(r"(reduce_planar|reduce_interleaved|elementwise_planar|elementwise_interleaved|"
                                  r"finalise_forward|finalise_backward|target_grad|resident_forward|"
                                  r"resident_backward)_kernel(?:I(\w+?)EE)?", name)
            kernel = demangled.group(1) if demangled else name
            params = demangled.group(2) or "" if demangled else ""
            dtype = "fp32" if params.startswith("f") else "bf16" if "bfloat16" in params else \
                "fp16" if "half" in params else "-"
            if kernel.startswith("resident"):
                # <T, planar, packs per lane, elements per pack>, named by its layout and packs per lane.
                lane_packs, width = (re.findall(r"Li(\d+)E", params) + ["0", "0"])[:2]
                grad, pack = kernel == "resident_backward", int(width)
                kernel += f"_{'planar' if 'Lb1' in params else 'interleaved'}_x{lane_packs}"
            else:
                found = re.search(r"Li(\d+)E?$", params)
                grad, pack = "Lb1" in params, int(found.group(1)) if found else 0
            facts.append({
                "arch": arch, "kernel": kernel, "dtype": dtype, "grad": grad,
                "pack": pack, "registers": int(resources.group(1)),
                "shared": int(resources.group(3)), "local": int(resources.group(4)),
                "widest_load": widths.get((arch, name), "-"),
            })
    return facts


def cuda_findings(facts: Sequence[dict]) -> list[str]:
    """Spills, and 16-byte-pack kernels whose loads are not 16 bytes wide."""
    found = []
    for f in facts:
        where = f"acnorm_fused._cuda {f['arch']} {f['kernel']} {f['dtype']} pack {f['pack']}"
        if f["local"]:
            found.append(f"{where}: {f['local']} bytes of local memory (spills)")
        if f["pack"] > 1 and f["widest_load"] != "128":
            found.append(f"{where}: widest global load {f['widest_load']} bits, not 128")
    return found


def _static_main(archs: Sequence[int], quick: bool) -> None:
    """Subprocess entry (TRITON_INTERPRET unset): the compiled facts as JSON on stdout."""
    if quick:
        launches = [launch for shape, dtype, layout, activation in AUDIT_QUICK_CASES
                    for launch in launches_for(shape, dtype, layout, activation)]
    else:
        launches = default_launches()
    facts = compile_launches(launches, archs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps([f.__dict__ | {"findings": f.findings(), "per_tile": f.per_tile,
                                    "vector_accesses": f.vector_accesses} for f in facts]))


def _traffic_main() -> None:
    """Subprocess entry (TRITON_INTERPRET=1): the byte counts as JSON on stdout."""
    results = [t for case in AUDIT_TRAFFIC_CASES for t in measure_traffic(*case)]
    print(json.dumps([t.__dict__ | {"per_element": t.per_element, "excess": t.excess(),
                                    "allowance": t.allowance(), "findings": t.findings()} for t in results]))


def run_part(part: str, *args: str) -> list[dict]:
    """Run one part of the audit in a subprocess with triton in the mode it needs."""
    if part == "traffic" and (reason := traffic_unsupported()):
        raise RuntimeError(reason)
    env = dict(os.environ, TRITON_INTERPRET="1" if part == "traffic" else "0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton's notice
    call = f"import acnorm_fused.bench.audit as a; a._{part}_main({', '.join(args)})"
    done = subprocess.run([sys.executable, "-c", call], env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {part} part of the audit failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_audit(archs: Sequence[int] = ARCHS, quick: bool = False,
              cuda_module: str | Path | None = None) -> tuple[str, dict, list[str]]:
    """The whole audit: ``(Markdown report, raw results, findings)``."""
    static = run_part("static", repr(tuple(archs)), repr(quick))
    traffic = run_part("traffic")
    cuda = cuda_module_facts(cuda_module) if cuda_module else []
    findings = [line for f in static + traffic for line in f["findings"]] + cuda_findings(cuda)
    raw = {"triton_kernels": static, "traffic": traffic, "cuda_kernels": cuda}
    return to_markdown(raw, archs, findings), raw, findings


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def _widths(counts: dict) -> str:
    return ", ".join(f"{n}x{w}B" for w, n in sorted(((int(w), n) for w, n in counts.items()), reverse=True)) or "-"


def to_markdown(raw: dict, archs: Sequence[int], findings: Sequence[str]) -> str:
    """The audit report."""
    import triton

    lines = [
        "# Kernel audit (no GPU)", "",
        f"triton {triton.__version__}, torch {torch.__version__}; Triton kernels compiled ahead of time for "
        f"{', '.join(f'sm_{a}' for a in archs)} with the arguments the dispatcher passes on 16-byte-aligned "
        f"tensors (launch heuristics sized for {MULTIPROCESSORS} multiprocessors). `16B per tile`: 16-byte "
        "loads and stores that the streamed tensors' alignment buys, per thread and tile, against those "
        "needed to move every streamed byte in 16-byte accesses (one tile of each streamed tensor). "
        "`unaligned`: the same launch with the streamed pointers not known to be aligned.", "",
        "## Findings", "",
        *([f"- {line}" for line in findings] or ["None: no spills, every streaming loop moves its bytes in "
                                                 "16-byte accesses, every fused op at its minimum traffic."]),
        "", "## Triton kernels", "",
    ]
    rows = []
    for f in sorted(raw["triton_kernels"], key=lambda f: (f["name"], f["config"], f["arch"])):
        per_tile = f["per_tile"]
        loads, stores = f["vector_accesses"]
        vector = (f"{loads}/{f['streams'] * per_tile} ld" + (f", {stores}/{per_tile} st" if f["writes"] else "")
                  if f["streams"] else "-")
        rows.append((f["name"], f["config"], f"sm_{f['arch']}", f["registers"], f["shared"], f["local"],
                     _widths(f["loads"]), _widths(f["stores"]), _widths(f["unaligned_loads"]) if f["streams"]
                     else "-", vector, len(f["cases"]), f["error"] or ""))
    lines += _table(("kernel", "specialisation", "arch", "registers", "shared B", "local B (spills)",
                     "loads", "stores", "loads unaligned", "16B per tile", "launches", "error"), rows)
    lines += ["", "## Bytes moved per fused op (interpreter)", "",
              "Streamed bytes (x, dy and the op's output) per element of x and byte of its dtype, "
              "against the multi-pass minimum (forward 3, backward 5, eval 2); the allowance is the "
              "training forward's reads of each channel's first value. Side bytes: partials, aux, "
              "affines and statistics.", ""]
    lines += _table(("case", "step", "channels", "splits", "streamed / (numel x b)", "minimum", "excess B",
                     "allowed B", "side B"),
                    [(t["case"], t["step"], t["channels"], t["splits"], f"{t['per_element']:.4f}",
                      MIN_TRAFFIC[t["step"]], t["excess"], t["allowance"], t["side_bytes"]) for t in raw["traffic"]])
    if raw["cuda_kernels"]:
        lines += ["", "## CUDA kernels (acnorm_fused._cuda)", ""]
        lines += _table(("arch", "kernel", "dtype", "grad", "pack", "registers", "shared B", "local B (spills)",
                         "widest load (bits)"),
                        [(f["arch"], f["kernel"], f["dtype"], "yes" if f["grad"] else "no", f["pack"] or "-",
                          f["registers"], f["shared"], f["local"], f["widest_load"]) for f in raw["cuda_kernels"]])
    return "\n".join(lines) + "\n"
