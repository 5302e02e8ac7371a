"""Whole networks: a converted 3D U-Net trains as its authors'-formulation twin does."""

from __future__ import annotations

import pytest
import torch

from acnorm_fused.bench import network
from acnorm_fused.modules import ACNorm

pytest.importorskip("monai")


def test_converted_dynunet_trains_as_the_authors_formulation():
    """Five SGD steps of the quick DynUNet in float64 on the CPU: the fused
    conversion (backend torch) and the reference conversion give the same
    losses, weights and running statistics."""
    spec = network.NETWORKS["dynunet"]
    versions = network.build_versions(spec, quick=True, device=torch.device("cpu"),
                                                layout="contiguous")
    fused, reference = (versions[name].double() for name in ("acnorm", "reference"))
    layers = [m for m in fused.modules() if isinstance(m, ACNorm)]
    assert layers and all(m.backend == "auto" for m in layers)
    assert any(not torch.equal(m.weight, m.weight_target) for m in layers), "targets moved off the sources"
    x, target = network._inputs(spec, True, torch.device("cpu"), "contiguous")
    x = x.double()
    losses = {}
    for name, model in (("acnorm", fused), ("reference", reference)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        losses[name] = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["acnorm"][-1] < losses["acnorm"][0], "the network learns"
    torch.testing.assert_close(torch.tensor(losses["acnorm"]), torch.tensor(losses["reference"]),
                               rtol=1e-10, atol=0)
    for (name, mine), theirs in zip(fused.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-10, msg=name)


def test_rows_cover_the_requested_combinations():
    cpu = torch.device("cpu")
    quick = network.default_rows(cpu, quick=True)
    assert {r.dtype for r in quick} == {"float32"} and {r.mode for r in quick} == {"eager"}
    assert {(r.network, r.layout) for r in quick} == {
        ("dynunet", "contiguous"), ("dynunet", "channels_last"), ("resnet3d", "contiguous"),
        ("resnet3d", "channels_last"), ("resnet50-2d", "contiguous")}, "channels-last for 3D networks only"
    rows = network.default_rows(cpu, quick=False, networks=["dynunet"], dtypes=["bfloat16"],
                                          layouts=["contiguous"], modes=["eager", "compile-reduce-overhead"])
    assert rows == [network.Row("dynunet", "bfloat16", "contiguous", "eager")], "no CUDA graphs on a CPU"
    assert network.default_rows(torch.device("cuda"), quick=False) == list(network.GPU_ROWS)
