"""convert_model and fold_to_batchnorm on a small 3D U-Net."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import acnorm_fused as acn
from acnorm_fused.modules import ACNorm

from helpers import random_input


def _block(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class TinyUNet3d(nn.Module):
    """Two levels, a skip connection, BatchNorm everywhere: a miniature nnU-Net stage."""

    def __init__(self, cin=1, width=4, classes=2):
        super().__init__()
        self.enc1 = _block(cin, width)
        self.enc2 = nn.Sequential(nn.MaxPool3d(2), _block(width, 2 * width))
        self.up = nn.ConvTranspose3d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv3d(width, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return self.head(self.dec1(torch.cat([self.up(e2), e1], 1)))


def _pretrained(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TinyUNet3d().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):  # give the BatchNorms real affines and statistics
        x = random_input((2, 1, 8, 8, 8), step, dtype)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _batchnorms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_convert_copies_everything():
    bn_model = _pretrained()
    bns = _batchnorms(bn_model)
    model = acn.convert_model(copy.deepcopy(bn_model), temperature=0.5, backend="torch")
    assert not _batchnorms(model)
    layers = dict(model.named_modules())
    for name, bn in bns.items():
        layer = layers[name]
        assert type(layer) is acn.ACNorm3d
        assert (layer.temperature, layer.backend, layer.eps, layer.momentum) == (0.5, "torch", bn.eps, bn.momentum)
        for source, target in [("weight", "weight"), ("weight", "weight_target"),
                               ("bias", "bias"), ("bias", "bias_target"),
                               ("running_mean", "running_mean"), ("running_var", "running_var"),
                               ("num_batches_tracked", "num_batches_tracked")]:
            assert torch.equal(getattr(layer, target), getattr(bn, source)), (name, target)
        assert layer.weight.dtype == torch.float64
        assert layer.training
        assert layer.weight_target.requires_grad and not layer.weight.requires_grad


def test_converted_model_loads_the_pretrained_checkpoint_strictly():
    bn_model = _pretrained()
    fresh = acn.convert_model(TinyUNet3d().double())
    fresh.load_state_dict(bn_model.state_dict(), strict=True)
    reference = acn.convert_model(copy.deepcopy(bn_model))
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_convert_keeps_training_flag_and_frozen_layers():
    model = _pretrained()
    model.enc1[1].weight.requires_grad_(False)
    model.enc1[1].bias.requires_grad_(False)
    model.eval()
    converted = acn.convert_model(model)
    assert not converted.enc1[1].training
    assert not converted.enc1[1].weight_target.requires_grad


def test_exclude_by_name():
    model = acn.convert_model(_pretrained(), exclude=["enc1", "dec1.1"])
    assert isinstance(model.enc1[1], nn.BatchNorm3d)
    assert isinstance(model.dec1[1], nn.BatchNorm3d)
    assert isinstance(model.enc2[1][1], acn.ACNorm3d)
    with pytest.raises(ValueError, match="exclude names no module"):
        acn.convert_model(_pretrained(), exclude=["enc9"])


def test_convert_a_bare_layer_and_all_kinds():
    assert type(acn.convert_model(nn.BatchNorm1d(3))) is acn.ACNorm1d
    assert type(acn.convert_model(nn.BatchNorm2d(3))) is acn.ACNorm2d
    sync = acn.convert_model(nn.SyncBatchNorm(3))
    assert type(sync) is ACNorm
    assert sync(random_input((2, 3, 4), 1)).shape == (2, 3, 4)
    assert sync(random_input((2, 3, 2, 2, 2), 1)).shape == (2, 3, 2, 2, 2)


def test_convert_refuses_affine_false_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3, affine=False))
    with pytest.raises(ValueError, match="convert_model: 1 .*affine=False"):
        acn.convert_model(model)
    assert isinstance(acn.convert_model(model, exclude=["1"])[1], nn.BatchNorm2d)


def test_sync_conversion_gives_sync_layers_that_act_alone_as_acnorm():
    group = object()  # stands for a process group; only stored
    model = acn.convert_model(_pretrained(), sync=True, process_group=group)
    plain = acn.convert_model(_pretrained())
    layers = [m for m in model.modules() if isinstance(m, acn.SyncACNorm)]
    assert len(layers) == sum(isinstance(m, ACNorm) for m in plain.modules()) > 0
    assert all(m.process_group is group for m in layers)
    for m in layers:
        m.process_group = None  # no process group is initialised here
    x = random_input((2, 1, 8, 8, 8), 3, torch.float64)
    torch.testing.assert_close(model(x), plain(x))
    assert type(acn.convert_model(nn.SyncBatchNorm(3), sync=True)) is acn.SyncACNorm
    folded = acn.fold_to_batchnorm(acn.convert_model(nn.BatchNorm3d(3), sync=True, process_group=group))
    assert type(folded) is nn.SyncBatchNorm and folded.process_group is group


def test_process_group_without_sync_is_an_error():
    with pytest.raises(ValueError, match="process_group is for sync=True"):
        acn.convert_model(nn.BatchNorm2d(3), process_group=object())


def _finetune(model, steps=3, seed=10):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        x = random_input((2, 1, 8, 8, 8), seed + step, torch.float64)
        loss = (model(x) - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_fold_to_batchnorm_gives_the_same_eval_output():
    model = _finetune(acn.convert_model(_pretrained()))
    first = model.enc1[1]
    assert not torch.equal(first.weight, first.weight_target), "finetuning moved the target"
    model.eval()
    x = random_input((2, 1, 8, 8, 8), 99, torch.float64)
    expected = model(x)
    folded = acn.fold_to_batchnorm(model)
    assert not [m for m in folded.modules() if isinstance(m, ACNorm)]
    assert type(folded.enc1[1]) is nn.BatchNorm3d
    torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)


def test_fold_keeps_activation_and_cumulative_momentum():
    layer = acn.ACNorm2d(3, activation="leaky_relu", negative_slope=0.2, momentum=None)
    with torch.no_grad():
        layer.weight_target.uniform_(0.5, 1.5)
        layer.bias_target.normal_()
    layer(random_input((4, 3, 2, 2), 1))
    layer.eval()
    x = random_input((4, 3, 2, 2), 2)
    expected = layer(x)
    folded = acn.fold_to_batchnorm(layer)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.LeakyReLU)
    assert folded[0].momentum is None and not folded.training
    torch.testing.assert_close(folded(x), expected)


def test_fold_uses_the_equivalent_single_momentum():
    folded = acn.fold_to_batchnorm(acn.ACNorm1d(3, momentum=0.1))
    assert folded.momentum == pytest.approx(0.19)


def test_folded_model_exports_without_custom_ops():
    model = acn.convert_model(_pretrained()).eval()
    folded = acn.fold_to_batchnorm(model).float()
    x = random_input((1, 1, 8, 8, 8), 3)
    exported = torch.export.export(folded, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "acnorm" in t]
    assert any("batch_norm" in t for t in targets)
    torch.testing.assert_close(exported.module()(x), folded(x))


@pytest.mark.slow
def test_folded_model_exports_to_onnx_and_runs():
    onnx_reference = pytest.importorskip("onnx.reference")
    pytest.importorskip("onnxscript")
    model = acn.convert_model(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4)))
    layer = model[1]
    with torch.no_grad():
        layer.weight_target.uniform_(0.5, 1.5)
        layer.bias_target.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = random_input((1, 1, 5, 6, 7), 4)
    expected = model(x)
    program = torch.onnx.export(acn.fold_to_batchnorm(model), (x,), dynamo=True, verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert not [op for op in ops if "acnorm" in op.lower()]
    session = onnx_reference.ReferenceEvaluator(program.model_proto)
    (got,) = session.run(None, {session.input_names[0]: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected.detach(), rtol=1e-4, atol=1e-5)
