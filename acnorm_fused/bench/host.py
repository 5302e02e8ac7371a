"""Where an eager training step spends its time on the host.

A small layer on a GPU is done long before Python has finished launching its
next step, so its eager step time is host time. For each case and layer this
measures, side by side in one run:

- ``step``: the step's wall time, synchronised before and after;
- ``host``: the time the host spends issuing the step (no synchronisation at
  its end, so GPU work still running does not count);
- ``graph``: on a GPU, the step replayed from a CUDA graph, i.e. the GPU's
  own time without any host cost (``-`` when the step cannot be captured).

It then lists the Python functions and the torch operators the fused layer's
step spends its host time in (``cProfile`` and ``torch.profiler``), and on a
GPU the operators that wait for the device (``torch.cuda.set_sync_debug_mode``).

On a CPU it also measures what an eager step costs the host whatever the
machine (:func:`step_costs`): the Python calls, aten operators and new
storages of one step, and its wall time, for ``nn.BatchNorm3d`` and the
fused layer of each backend in the same run; the kernel backends' launches
do nothing (:func:`noop_cuda_launches`, :func:`noop_triton_launches`), so
that the host's share is all that is timed.
This module backs ``acnorm bench host``.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import backends
from ..backends.cuda import LAUNCHES
from ..modules import ACNorm3d
from .cases import COST_CASE, Case, make_input
from .layer import make_layers, other_kernel_backends
from .timing import graph_replay_ms, quiet_profiler, synchronize, time_interleaved, training_step

# Functions listed from cProfile, by own time: enough to reach the op's own
# thin layers (functional.py, ops.py), which each take little.
PROFILE_ROWS = 60


def _medians(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall time and median host-issue time of ``step``, in ms."""
    walls, hosts = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        hosts.append((issued - start) * 1e3)
        walls.append((done - start) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def _python_profile(step: Callable[[], None], steps: int, rows: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(rows)
    return text.getvalue().strip()


def _operator_profile(step: Callable[[], None], device: torch.device, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_profiler(), profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _synchronising_calls(step: Callable[[], None]) -> list[str]:
    """The warnings torch gives for each operator of ``step`` that waits for the GPU."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sorted({str(w.message).splitlines()[0] for w in caught})


@dataclass(frozen=True)
class StepCost:
    """What one eager training step (forward and backward) costs the host."""

    python_calls: int  # function calls, Python and builtin, as cProfile counts them
    aten_ops: int  # operators dispatched to ATen
    new_storages: int  # operator outputs on memory none of the operator's inputs had
    wall_us: float  # median wall time


class _OperatorCounter(TorchDispatchMode):
    """Counts the aten operators run under it and the new storages they return."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.storages = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {t.untyped_storage().data_ptr()
                  for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        self.storages += sum(1 for t in tree_leaves(out)
                             if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


class NoOpLaunches:
    """A compiled kernel module whose launches return at once: everything else
    (its types, constants) is the module's own. It reports itself as the host
    emulation, so that the ``cuda`` backend runs CPU tensors through it, and a
    GPU that holds every layer in one pass (:data:`STAND_IN_CAPACITY`)."""

    emulated = True

    def __init__(self, module) -> None:
        self._module = module
        for name in LAUNCHES:
            setattr(self, name, _no_launch)

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    @staticmethod
    def resident_capacity(*_args) -> int:
        return STAND_IN_CAPACITY


# Blocks of the single-pass kernels the stand-in's GPU holds: as many as any
# measured layer needs, so its plans take the single pass (one module call
# per pass either way; the host's path is the same).
STAND_IN_CAPACITY = 1 << 20


def _no_launch(*_args) -> None:
    return None


@contextlib.contextmanager
def noop_cuda_launches(module=None) -> Iterator[None]:
    """Within the block, ``backend="cuda"`` runs on CPU tensors and launches
    nothing: the host's path to the kernels with none of their work.
    ``module`` is the compiled module to stand in for (the installed one by default)."""
    module = module if module is not None else backends.cuda_extension()
    if module is None:
        raise RuntimeError("no compiled acnorm_fused._cuda to stand in for")
    with backends.using_cuda_extension(NoOpLaunches(module)):
        yield


@contextlib.contextmanager
def noop_triton_launches() -> Iterator[None]:
    """Within the block, ``backend="triton"`` runs on CPU tensors and its kernel
    launches return at once, before Triton's own launcher binds their
    arguments: the host's path up to the launches, without Triton's share."""
    from ..backends.triton import KERNELS

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read per call: the triton backend then takes CPU tensors
    for kernel in KERNELS:
        kernel.run = _no_launch_kw
    try:
        yield
    finally:
        for kernel in KERNELS:
            del kernel.run
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _no_launch_kw(*_args, **_kwargs) -> None:
    return None


def _per_step_counts(step: Callable[[], None], steps: int) -> tuple[int, int, int]:
    """``(python calls, aten ops, new storages)`` per step, over ``steps`` steps."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]  # set by Stats, not in typeshed
    counter = _OperatorCounter()
    with counter:
        for _ in range(steps):
            step()
    # The profiler's own disable() is one call of the block.
    return round((calls - 1) / steps), round(counter.ops / steps), round(counter.storages / steps)


def step_costs(steps: Mapping[str, Callable[[], None]], rounds: int = 30, per_round: int = 20,
               count_steps: int = 20) -> dict[str, StepCost]:
    """:class:`StepCost` of each step; the wall times are the median over
    ``rounds`` of the mean of ``per_round`` steps, the steps run in turn in
    every round (by :func:`~acnorm_fused.bench.timing.time_interleaved`).
    Each step is run a few times first (plans, caches)."""
    for step in steps.values():
        for _ in range(3):
            step()

    def batch(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(per_round):
                step()
        return run

    samples = time_interleaved({name: batch(step) for name, step in steps.items()}, torch.device("cpu"),
                               rounds, warmup=0)
    return {name: StepCost(*_per_step_counts(step, count_steps), statistics.median(samples[name]) * 1e3 / per_round)
            for name, step in steps.items()}


def cost_layers(channels: int, cuda: bool, triton: bool = False) -> dict[str, nn.Module]:
    """``nn.BatchNorm3d`` and the fused layer of the ``torch`` backend, and of
    the ``cuda`` and ``triton`` backends when asked, in the state of :func:`make_layers`."""
    base = make_layers(channels, torch.device("cpu"))
    layers = {"batchnorm": base["batchnorm"], "acnorm-torch": base["acnorm"]}
    for name in [n for n, wanted in (("cuda", cuda), ("triton", triton)) if wanted]:
        layer = ACNorm3d(channels, backend=name)
        layer.load_state_dict(base["acnorm"].state_dict())
        layers[f"acnorm-{name}"] = layer
    return layers


def cost_table(case: Case = COST_CASE, module=None) -> list[str]:
    """The Markdown section of the host cost of one eager training step on a
    CPU, each layer against ``nn.BatchNorm3d`` in the same run. The kernel
    backends' launches do nothing (their work is not the host's): the ``cuda``
    row stands in for ``module`` (the installed compiled module by default)
    and is left out when there is none; the ``triton`` row needs triton."""
    module = module if module is not None else backends.cuda_extension()
    x, grad = make_input(case, torch.device("cpu"))
    context: contextlib.AbstractContextManager[None]
    if module is None:
        context, note = contextlib.nullcontext(), "no compiled acnorm_fused._cuda: no `acnorm-cuda` row"
    else:
        context, note = noop_cuda_launches(module), "`acnorm-cuda`: launches that do nothing"
    triton = cast(backends.TritonBackend, backends.REGISTRY["triton"]).is_installed()
    if triton:
        note += "; `acnorm-triton`: launches that return before Triton's launcher"
    with context, (noop_triton_launches() if triton else contextlib.nullcontext()):
        layers = cost_layers(case.shape[1], cuda=module is not None, triton=triton)
        # Built apart from the call: mypy infers these lambdas' types only without a context.
        steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
        costs = step_costs(steps)
    base = costs["batchnorm"]
    lines = [f"### Host cost of one eager step, {case.label()} (CPU; {note})", "",
             "| layer | Python calls | aten ops | new storages | wall us | calls / BN | ops / BN "
             "| storages / BN | wall / BN |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, cost in costs.items():
        lines.append(
            f"| {name} | {cost.python_calls} | {cost.aten_ops} | {cost.new_storages} | {cost.wall_us:.1f} "
            f"| {cost.python_calls / base.python_calls:.2f} | {cost.aten_ops / base.aten_ops:.2f} "
            f"| {cost.new_storages / base.new_storages:.2f} | {cost.wall_us / base.wall_us:.2f} |")
    return lines + [""]


def cost_report(machine: str, case: Case = COST_CASE) -> str:
    """The Markdown report of :func:`cost_table`, with the machine named."""
    return "\n".join([f"Machine: {machine}", "", *cost_table(case)]) + "\n"


def profile_case(case: Case, device: torch.device, repeats: int = 50,
                 profile_steps: int = 100) -> list[str]:
    """The Markdown section of one case: the time table, then the fused layer's profiles."""
    x, grad = make_input(case, device)
    other = other_kernel_backends(x) if device.type == "cuda" else []
    layers = make_layers(case.shape[1], device, other_kernels=other)
    steps = {name: (lambda layer=layer: training_step(layer, x, grad)) for name, layer in layers.items()}
    for step in steps.values():
        for _ in range(5):
            step()  # compile, warm caches and the allocator
    lines = [f"### {case.label()}", "",
             "| layer | step ms | host ms | graph ms | host / step | host / BatchNorm's host |",
             "|---|---:|---:|---:|---:|---:|"]
    timed = {name: (*_medians(step, device, repeats),
                    graph_replay_ms(step, repeats) if device.type == "cuda" else None)
             for name, step in steps.items()}
    batchnorm_host = timed["batchnorm"][1]
    for name, (wall, host, graph) in timed.items():
        graph_text = "-" if graph is None else f"{graph:.3f}"
        lines.append(f"| {name} | {wall:.3f} | {host:.3f} | {graph_text} | {host / wall:.2f} "
                     f"| {host / batchnorm_host:.2f} |")
    fused = steps["acnorm"]
    lines += ["", f"cProfile of {profile_steps} steps of `acnorm`, by own time:", "", "```",
              _python_profile(fused, profile_steps, PROFILE_ROWS), "```", "",
              f"torch.profiler of {profile_steps // 5} steps of `acnorm`, by self CPU time:", "", "```",
              _operator_profile(fused, device, profile_steps // 5, 25), "```", ""]
    if device.type == "cuda":
        calls = _synchronising_calls(fused)
        lines += ["Operators of one `acnorm` step that wait for the GPU: "
                  + ("none." if not calls else ""), *[f"- {call}" for call in calls], ""]
    return lines


def run(cases: Sequence[Case], device: torch.device, machine: str, repeats: int = 50,
        progress: Callable[[str], None] | None = None) -> str:
    """The whole report, as Markdown."""
    lines = [f"Machine: {machine}", "",
             "Eager training step (forward + backward): wall time (`step`), time the host spends "
             "issuing it (`host`) and, on a GPU, its replay from a CUDA graph (`graph`, GPU time "
             "alone). Medians in ms.", ""]
    for index, case in enumerate(cases, 1):
        lines += profile_case(case, device, repeats)
        if progress is not None:
            progress(f"[{index}/{len(cases)}] {case.label()}: profiled")
    return "\n".join(lines) + "\n"
