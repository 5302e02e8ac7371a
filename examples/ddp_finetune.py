"""Finetune a small converted 3D network with DDP and SyncACNorm.

    torchrun --nproc_per_node 2 examples/ddp_finetune.py

gloo on CPUs, NCCL with one GPU per process. Every process builds the same
BatchNorm network, "pretrains" it briefly on a source task (or loads
``--pretrained``), converts it with ``convert_model(sync=True)`` so that the
AC-Norm statistics cover the batches of all processes, and finetunes it on a
target task (segmenting a bright sphere in noisy volumes) with
DistributedDataParallel. Rank 0 prints the progress and, with ``--out``,
saves the model folded back to plain BatchNorm.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import acnorm_fused as acn


def build_network() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())

    return nn.Sequential(block(1, 8), block(8, 16), block(16, 8), nn.Conv3d(8, 1, 1))


def sphere_batch(batch: int, size: int, generator: torch.Generator, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes with a bright sphere at a random place, and its mask."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    centres = torch.rand(batch, 3, 1, 1, 1, generator=generator) * size * 0.5 + size * 0.25
    radius = size * 0.2
    mask = ((grid[None] - centres).square().sum(1, keepdim=True) < radius**2).float()
    noise = torch.randn(batch, 1, size, size, size, generator=generator)
    return mask * 2.0 + shift + 0.5 * noise, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="finetuning steps")
    parser.add_argument("--batch-per-process", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="volume edge in voxels")
    parser.add_argument("--pretrained", help="a BatchNorm state dict for build_network()")
    parser.add_argument("--out", help="where rank 0 saves the finetuned model, folded to BatchNorm")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(0)
    model = build_network()
    if args.pretrained:
        model.load_state_dict(torch.load(args.pretrained, map_location="cpu"))
    else:  # a short "pretraining" on a source domain with another intensity offset
        source = torch.Generator().manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(10):
            x, y = sphere_batch(4, args.size, source, shift=0.0)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    model = acn.convert_model(model, sync=True).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=3e-3)
    data = torch.Generator().manual_seed(100 + rank)  # each process its own slice of the data
    log(f"finetuning on {world} process(es), {args.batch_per_process} volume(s) of {args.size}^3 each, "
        f"{dist.get_backend()} collectives, AC-Norm backends here: {', '.join(acn.available_backends())}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = sphere_batch(args.batch_per_process, args.size, data, shift=1.5)
        loss = nn.functional.binary_cross_entropy_with_logits(ddp(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        log(f"step {step:3d}/{args.steps}  loss {total.item() / world:.4f}  "
            f"{time.perf_counter() - start:6.1f} s")
    if args.out and rank == 0:
        torch.save(acn.fold_to_batchnorm(model.eval()).state_dict(), args.out)
        log(f"saved the model, folded to BatchNorm, to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
