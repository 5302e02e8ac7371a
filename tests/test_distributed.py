"""SyncACNorm over gloo processes on the CPU against single-process AC-Norm on
the whole batch.

Each test spawns its processes once and runs several cases in them (starting
a process costs seconds here); every process writes its results to a file
that the test then compares with the float64 reference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import acnorm_fused as acn
from acnorm_fused.modules import ACNorm

from helpers import assert_close, make_layer, random_input

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# name -> (layer class, channels, full batch shape, per-process batch sizes, layer options, memory format)
CASES = {
    "3d-relu-2proc": (acn.SyncACNorm, 3, (5, 3, 3, 4, 5), [2, 3], {"activation": "relu"}, None),
    "2d-input-3proc": (acn.SyncACNorm, 4, (7, 4), [3, 1, 3], {}, None),
    "empty-rank-3proc": (acn.SyncACNorm, 3, (4, 3, 5, 6), [1, 0, 3], {"activation": "leaky_relu"}, None),
    "channels-last-3proc": (acn.SyncACNorm, 3, (5, 3, 2, 3, 4), [2, 2, 1], {}, torch.channels_last_3d),
    "cma-single-update-2proc": (acn.SyncACNorm, 2, (3, 2, 4, 4), [1, 2],
                                {"momentum": None, "double_update": False}, None),
    "no-running-stats-2proc": (acn.SyncACNorm, 2, (3, 2, 9), [2, 1], {"track_running_stats": False}, None),
}
STEPS = 2


def _case_layer(name: str, backend: str, dtype=torch.float32):
    cls, channels, _, _, options, _ = CASES[name]
    return make_layer(cls, channels, seed=len(name), dtype=dtype, backend=backend, **options)


def _case_data(name: str, step: int):
    _, _, shape, _, _, _ = CASES[name]
    return random_input(shape, 100 + step, mean=float(step)), random_input(shape, 200 + step)


def _run_cases(rank: int, world: int, init_file: str, out_dir: str, names: list[str], backend: str,
               cuda_module: str | None) -> None:
    """One process: run every case on its slice of each batch, save the results;
    ``cuda_module`` is the file of a CUDA module to run backend "cuda" with."""
    if cuda_module is not None:
        import importlib.util

        from acnorm_fused import backends

        spec = importlib.util.spec_from_file_location("_cuda", cuda_module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        backends._load_cuda_extension = lambda: (module, "")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            sizes, memory_format = CASES[name][3], CASES[name][5]
            start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
            layer = _case_layer(name, backend)
            steps = []
            for step in range(STEPS):
                x, g = _case_data(name, step)
                xi = x[start:stop].clone()
                gi = g[start:stop].clone()
                if memory_format is not None:
                    xi, gi = xi.contiguous(memory_format=memory_format), gi.contiguous(memory_format=memory_format)
                xi.requires_grad_()
                out = layer(xi)
                out.backward(gi)
                steps.append((out.detach(), xi.grad, layer.weight_target.grad.clone(),
                              layer.bias_target.grad.clone()))
                layer.zero_grad()
            running = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
            results[name] = (steps, running if layer.track_running_stats else None)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, names: list[str], backend: str, tmp_path: Path, cuda_module: str | None = None) -> list[dict]:
    init_file = tmp_path / "init"
    mp.spawn(_run_cases, args=(world, str(init_file), str(tmp_path), names, backend, cuda_module), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(name: str):
    # No process group in this process: the same layer is plain AC-Norm, the oracle.
    layer = _case_layer(name, "reference", torch.float64)
    steps = []
    for step in range(STEPS):
        x, g = _case_data(name, step)
        x = x.double().requires_grad_()
        out = layer(x)
        out.backward(g.double())
        steps.append((out.detach(), x.grad, layer.weight_target.grad.clone(), layer.bias_target.grad.clone()))
        layer.zero_grad()
    running = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    return steps, running if layer.track_running_stats else None


def _check(names: list[str], per_rank: list[dict]) -> None:
    for name in names:
        expected_steps, expected_running = _reference(name)
        for step, expected in enumerate(expected_steps):
            got = [r[name][0][step] for r in per_rank]
            assert_close(torch.cat([g[0] for g in got]), expected[0], torch.float32)
            assert_close(torch.cat([g[1] for g in got]), expected[1], torch.float32, 10)
            # DDP sums (and averages) parameter gradients over the processes.
            assert_close(sum(g[2] for g in got), expected[2], torch.float32, 10)
            assert_close(sum(g[3] for g in got), expected[3], torch.float32, 10)
        for r in per_rank:
            if expected_running is None:
                assert r[name][1] is None
                continue
            mean, var, batches = r[name][1]
            assert_close(mean, expected_running[0], torch.float32)
            assert_close(var, expected_running[1], torch.float32)
            assert int(batches) == int(expected_running[2]) == STEPS, name


@pytest.mark.slow
def test_two_processes(tmp_path):
    names = ["3d-relu-2proc", "cma-single-update-2proc", "no-running-stats-2proc"]
    _check(names, _spawn(2, names, "torch", tmp_path))


@pytest.mark.slow
def test_three_processes_uneven_and_empty_batches(tmp_path):
    names = ["2d-input-3proc", "empty-rank-3proc", "channels-last-3proc"]
    _check(names, _spawn(3, names, "torch", tmp_path))


@pytest.mark.slow
@pytest.mark.interpret
def test_two_processes_triton_kernels(tmp_path):
    """The same through the Triton kernels (interpreted on the CPU without a GPU)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the processes hold CPU tensors; on a GPU machine they would need the interpreter")
    names = ["3d-relu-2proc"]
    _check(names, _spawn(2, names, "triton", tmp_path))


@pytest.mark.slow
@pytest.mark.interpret
def test_two_processes_cuda_kernels(tmp_path, emulated_cuda_module):
    """The same through the CUDA kernels (their host emulation, on the CPU)."""
    if torch.cuda.is_available():
        pytest.skip("the processes hold CPU tensors, which only the host emulation runs")
    names = ["3d-relu-2proc", "cma-single-update-2proc"]
    _check(names, _spawn(2, names, "cuda", tmp_path, emulated_cuda_module.__file__))


def test_without_process_group_it_is_plain_acnorm():
    assert not acn.distributed.shares_statistics()
    layer = make_layer(acn.SyncACNorm, 3, seed=1)
    plain = make_layer(ACNorm, 3, seed=1)
    x = random_input((2, 3, 4, 5), 2)
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(layer.running_var, plain.running_var)


def test_reference_backend_is_refused_when_sharing(monkeypatch):
    monkeypatch.setattr(acn.distributed, "shares_statistics", lambda group=None: True)
    layer = make_layer(acn.SyncACNorm, 3, seed=1, backend="reference")
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match=r"SyncACNorm\(3\): the reference backend cannot share statistics"):
        layer(random_input((2, 3, 4), 3))
    assert torch.equal(layer.running_mean, before) and int(layer.num_batches_tracked) == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 2, 3, padding=1)
        self.bn2 = nn.BatchNorm3d(2)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _pretrained_net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net().double()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return net


BATCH_SIZES = [3, 1]  # uneven on purpose
DDP_STEPS = 3


def _ddp_batch(step: int):
    return random_input((sum(BATCH_SIZES), 1, 6, 6, 6), 300 + step, torch.float64), \
        random_input((sum(BATCH_SIZES), 2, 6, 6, 6), 400 + step, torch.float64)


def _ddp_train(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = acn.convert_model(_pretrained_net(), sync=True, backend="torch")
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        start, stop = sum(BATCH_SIZES[:rank]), sum(BATCH_SIZES[: rank + 1])
        total = sum(BATCH_SIZES)
        for step in range(DDP_STEPS):
            x, y = _ddp_batch(step)
            # Sum over this slice, scaled so that DDP's average over processes is
            # the gradient of the mean loss over the whole batch.
            loss = (ddp(x[start:stop]) - y[start:stop]).square().sum() * (world / (total * y[0].numel()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_equals_single_process_training(tmp_path):
    world = len(BATCH_SIZES)
    mp.spawn(_ddp_train, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    model = acn.convert_model(_pretrained_net(), backend="reference")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(DDP_STEPS):
        x, y = _ddp_batch(step)
        loss = (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = model.state_dict()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-10, msg=f"rank {rank}: {key}")



@pytest.mark.slow
def test_example_runs_with_torchrun_on_two_processes(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_finetune.py"
    out = tmp_path / "folded.pt"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(example),
         "--steps", "2", "--size", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finetuning on 2 process(es)" in run.stdout and "step   2/2" in run.stdout
    state = torch.load(out)
    assert "0.1.running_mean" in state and not any("target" in key for key in state), "folded to BatchNorm"
