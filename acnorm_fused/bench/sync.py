"""The cost of sharing statistics: SyncACNorm over gloo processes on a CPU.

Each of ``world_size`` processes runs, on its own batch, one training step of
``SyncACNorm`` (statistics over all processes: one all_gather forward, one
all_reduce backward), of ``ACNorm3d`` (its own statistics) and of
``nn.BatchNorm3d``, interleaved as in :func:`acnorm_fused.bench.timing.time_interleaved`;
rank 0 reports its times. ``nn.SyncBatchNorm`` is tried too: PyTorch runs it
on GPUs only, and the table says so when it refuses. This module backs
``acnorm bench sync --processes N``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..distributed import SyncACNorm
from ..modules import ACNorm3d
from .cases import Case, make_input
from .timing import reuse_freed_memory, time_interleaved, training_step

LAYERS = ("syncacnorm", "acnorm", "batchnorm", "syncbatchnorm")


@dataclass
class SyncResult:
    """Rank 0's step times (ms, one sample per round) on one case, per layer;
    ``refused`` holds the error of a layer that would not run."""

    case: Case
    world_size: int
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples_ms[name])

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of the ratio of two layers timed in the same round."""
        pairs = zip(self.samples_ms[numerator], self.samples_ms[denominator])
        return statistics.median(a / b for a, b in pairs)


def _make_layers(channels: int) -> dict[str, nn.Module]:
    return {
        "syncacnorm": SyncACNorm(channels),
        "acnorm": ACNorm3d(channels),
        "batchnorm": nn.BatchNorm3d(channels),
        "syncbatchnorm": nn.SyncBatchNorm(channels),
    }


def _worker(rank: int, world_size: int, init_file: str, cases: list[Case], repeats: int,
            warmup: int, threads: int, reuse_memory: bool, out_file: str) -> None:
    torch.set_num_threads(threads)
    if reuse_memory:
        reuse_freed_memory()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = []
        for case in cases:
            x, grad = make_input(case, torch.device("cpu"), seed=rank)
            result = SyncResult(case, world_size)
            steps = {}
            for name, layer in _make_layers(case.shape[1]).items():
                def step(layer: nn.Module = layer, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
                    training_step(layer, x, grad)

                try:
                    step()
                except (ValueError, RuntimeError) as error:  # every rank refuses alike
                    result.refused[name] = str(error).splitlines()[0]
                    continue
                steps[name] = step
            result.samples_ms = time_interleaved(steps, torch.device("cpu"), repeats, warmup)
            results.append(result)
        if rank == 0:
            Path(out_file).write_text(json.dumps([asdict(r) for r in results]))
    finally:
        dist.destroy_process_group()


def threads_per_process(world_size: int) -> int:
    """Threads each process gets: this machine's share, so processes do not compete."""
    return max(1, torch.get_num_threads() // world_size)


def run_sync(
    cases: Sequence[Case],
    world_size: int,
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    reuse_memory: bool = True,
) -> list[SyncResult]:
    """Time the layers in ``world_size`` gloo processes sharing this machine's
    cores; ``case.shape`` is the batch of each process. ``reuse_memory``: as
    :func:`acnorm_fused.bench.timing.reuse_freed_memory`, in every process."""
    threads = threads_per_process(world_size)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "results.json")
        if progress is not None:
            progress(f"starting {world_size} gloo processes, {threads} thread(s) each")
        mp.spawn(_worker, args=(world_size, str(Path(tmp) / "init"), list(cases), repeats, warmup,
                                threads, reuse_memory, out_file), nprocs=world_size, join=True)
        rows = json.loads(Path(out_file).read_text())
    results = []
    for row in rows:
        case = Case(tuple(row["case"]["shape"]), row["case"]["dtype"], row["case"]["layout"])
        results.append(SyncResult(case, row["world_size"], row["samples_ms"], row["refused"]))
    return results


def to_markdown(results: Sequence[SyncResult], machine: str) -> str:
    """The synced-statistics table, machine named."""
    lines = [
        f"Machine: {machine}",
        "",
        "One training step (forward + backward) per process, times of rank 0 (medians, ms). "
        "`SyncACNorm`: statistics over all processes (gloo); `ACNorm`: each process's own; "
        "`bn`: nn.BatchNorm3d. The shape is each process's batch.",
        "",
        "| shape per process | dtype | layout | processes | SyncACNorm ms | ACNorm ms | bn ms "
        "| SyncACNorm / ACNorm | SyncACNorm / bn | nn.SyncBatchNorm |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        sync_bn = r.refused.get("syncbatchnorm") or f"{r.median('syncbatchnorm'):.3f} ms"
        lines.append(
            f"| {'x'.join(map(str, r.case.shape))} | {r.case.dtype} | {r.case.layout} | {r.world_size} "
            f"| {r.median('syncacnorm'):.3f} | {r.median('acnorm'):.3f} | {r.median('batchnorm'):.3f} "
            f"| {r.ratio('syncacnorm', 'acnorm'):.2f} | {r.ratio('syncacnorm', 'batchnorm'):.2f} "
            f"| {sync_bn} |"
        )
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[SyncResult], machine: str) -> str:
    """The results as JSON, ratios included."""
    rows = []
    for r in results:
        row = asdict(r)
        row["median_ms"] = {name: r.median(name) for name in r.samples_ms}
        row["ratios"] = {
            "syncacnorm_over_acnorm": r.ratio("syncacnorm", "acnorm"),
            "syncacnorm_over_batchnorm": r.ratio("syncacnorm", "batchnorm"),
        }
        rows.append(row)
    return json.dumps({"machine": machine, "results": rows}, indent=2)
