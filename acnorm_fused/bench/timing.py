"""Timing and memory measurement shared by the benchmarks: interleaved wall
clock, CUDA-graph replay, peak step memory, and the machine's description."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

# Lines that the profiler's native library (kineto) writes to the process's
# stderr on every start and stop, whatever its log level.
_PROFILER_CHATTER = ("USDT:", "STAGE:")
# A warning of the memory profiler (printed once per process) about a block freed
# in the profiled step that was allocated before it: nothing the step did wrong.
_PROFILER_WARNINGS = ("profiler results will not include the deallocation event",)


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Hide the profiler's native start/stop lines (and its warning about blocks
    allocated before it started): file descriptor 2 goes to a
    temporary file while the block runs, and every other line written there is
    passed on to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(_PROFILER_CHATTER)
                    and not any(warning in line for warning in _PROFILER_WARNINGS)]
            sys.stderr.write("".join(kept))

def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB for reuse instead of unmapping them.

    With the default settings every step of a CPU benchmark maps its large
    tensors afresh and pays a page fault per 4 KiB page, which on a virtual
    machine costs about as much as the BatchNorm itself and varies run to
    run. A caching allocator (PyTorch's on GPUs, jemalloc or tcmalloc on CPUs)
    avoids that; this does the same for all three layers alike. Returns
    whether the setting took effect (glibc only).
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    largest_cached = 32 * 1024 * 1024  # glibc's upper bound for the mmap threshold
    ok = libc.mallopt(m_mmap_threshold, largest_cached) == 1
    return ok and libc.mallopt(m_trim_threshold, 4 * largest_cached) == 1



def training_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward of ``layer`` on ``x``; gradients are dropped."""
    layer(x).backward(grad)
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def balanced_order(count: int) -> list[int]:
    """A cyclic order of ``count`` steps in which every step comes right after
    each of the others exactly once: ``count * (count - 1)`` positions, an
    Euler circuit of the complete directed graph on the steps (``[0]`` for
    one step). A plain rotation of three steps is not balanced: the second
    follows the first in two rounds of three."""
    if count < 1:
        raise ValueError(f"balanced_order: count must be >= 1, got {count}")
    if count == 1:
        return [0]
    unused = {step: [other for other in range(count) if other != step] for step in range(count)}
    path, circuit = [0], []
    while path:  # Hierholzer's algorithm: every step has as many ways in as out
        step = path[-1]
        if unused[step]:
            path.append(unused[step].pop())
        else:
            circuit.append(path.pop())
    circuit.reverse()
    return circuit[:-1]  # the circuit closes on its first step


def time_interleaved(
    steps: Mapping[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Wall times in ms of each step, the steps run in turn ``repeats`` times
    each, in the cyclic order of :func:`balanced_order` (a step that has its
    samples is passed over in the last, partial cycle).

    Every step follows each of the others equally often: a step right after a
    heavy one (the reference layer's C x C temporaries) starts with cold
    caches, and with a fixed order that cost would fall on the same step every
    round (it moved a (2, 1024, 4, 4, 4) BatchNorm step from 0.42 to 0.58 ms
    on a 2-vCPU machine).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    names = list(steps)
    order = [names[k] for k in balanced_order(len(names))]
    samples: dict[str, list[float]] = {name: [] for name in steps}
    position = 0
    for _ in range(repeats * len(names)):
        while len(samples[order[position % len(order)]]) == repeats:
            position += 1
        name = order[position % len(order)]
        position += 1
        synchronize(device)
        start = time.perf_counter()
        steps[name]()
        synchronize(device)
        samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated at the peak of ``step`` beyond what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak



def capture_graph(step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
    """``step`` captured into a CUDA graph (after one run on a side stream to warm
    it up), or None when it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        graph.replay()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return graph
    except Exception:  # noqa: BLE001 - any capture failure means "time it eagerly"
        torch.cuda.synchronize()
        return None


def captures(step: Callable[[], None]) -> bool:
    """Whether ``step`` can be captured into a CUDA graph (and run from it)."""
    return capture_graph(step) is not None


def graph_replay_ms(step: Callable[[], None], repeats: int) -> float | None:
    """Median GPU time in ms of ``step`` replayed from a CUDA graph, ``repeats``
    replays, or None when it cannot be captured."""
    graph = capture_graph(step)
    if graph is None:
        return None
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)



def machine_description(device: torch.device) -> str:
    """One line naming the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
