"""pytest-benchmark suite: one training step (forward + backward) per layer.

Run with ``pytest benchmarks/``. Each case times the authors' formulation
(``reference``), acnorm_fused with ``backend="auto"`` and ``nn.BatchNorm3d``
on the same input (on a GPU also the kernel backend ``auto`` does not pick,
as ``acnorm-<backend>``) and is its own group, so pytest-benchmark's table
shows them side by side with their ratios. ``acnorm bench`` prints the same
comparison interleaved, with peak memory. On CPUs freed memory is reused
(:func:`acnorm_fused.bench.timing.reuse_freed_memory`), as in ``acnorm bench``.
"""

from __future__ import annotations

import pytest
import torch

from acnorm_fused.bench import layer as layers
from acnorm_fused.bench.cases import default_cases, make_input
from acnorm_fused.bench.timing import reuse_freed_memory, training_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = default_cases(DEVICE)
OTHER_KERNELS: tuple[str, ...] = ()
if DEVICE.type == "cpu":
    reuse_freed_memory()
else:
    OTHER_KERNELS = tuple(layers.other_kernel_backends(torch.empty(0, device=DEVICE)))


@pytest.mark.parametrize("case", CASES, ids=[c.label().replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("layer_name", layers.IMPLEMENTATIONS + tuple(f"acnorm-{b}" for b in OTHER_KERNELS))
def test_training_step(benchmark, case, layer_name):
    x, grad = make_input(case, DEVICE)
    layer = layers.make_layers(case.shape[1], DEVICE, other_kernels=OTHER_KERNELS)[layer_name]
    benchmark.group = case.label()
    if DEVICE.type == "cuda":
        def step():
            training_step(layer, x, grad)
            torch.cuda.synchronize(DEVICE)
    else:
        def step():
            training_step(layer, x, grad)
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
