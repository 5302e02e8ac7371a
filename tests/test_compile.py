"""The custom ops: opcheck, and torch.compile over AC-Norm layers with no graph break."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import acnorm_fused as acn

from helpers import make_affines, make_layer, random_input


def _op_args(x, training=True, stats=True, activation="", dtype=torch.float32):
    channels = x.shape[1]
    w, b, wt, bt = make_affines(channels, 0, dtype)
    wt.requires_grad_(True)
    bt.requires_grad_(True)
    rm = torch.randn(channels, dtype=dtype) if stats else None
    rv = (0.5 + torch.rand(channels, dtype=dtype)) if stats else None
    return (x, w, b, wt, bt, rm, rv, training, 0.19, 1e-5, 0.7, activation, 0.1, "torch", "test")


@pytest.mark.parametrize("training,stats", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("activation", ["", "relu", "leaky_relu"])
def test_opcheck(training, stats, activation):
    x = random_input((2, 3, 4, 5), 1).requires_grad_()
    torch.library.opcheck(torch.ops.acnorm_fused.ac_norm_fwd.default,
                          _op_args(x, training, stats, activation))


@pytest.mark.parametrize("shape,memory_format,dtype", [
    ((2, 3, 4, 5), torch.channels_last, torch.float32),
    ((2, 3, 2, 3, 4), torch.channels_last_3d, torch.bfloat16),
    ((4, 3), torch.contiguous_format, torch.float64),
])
def test_opcheck_layouts_and_dtypes(shape, memory_format, dtype):
    x = random_input(shape, 2, dtype).contiguous(memory_format=memory_format).requires_grad_()
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    torch.library.opcheck(torch.ops.acnorm_fused.ac_norm_fwd.default,
                          _op_args(x, dtype=param_dtype))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.norm1 = make_layer(acn.ACNorm3d, 4, seed=3, activation="relu")
        self.conv2 = nn.Conv3d(4, 3, 3, padding=1)
        self.norm2 = make_layer(acn.ACNorm3d, 3, seed=4)

    def forward(self, x):
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_backward(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Net()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for step in range(2):
        x = random_input((2, 2, 4, 4, 4), 10 + step)
        out_e = eager(x)
        out_c = compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        if p_e.grad is None:
            assert p_c.grad is None, name
        else:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-4)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-5, atol=1e-6, msg=name)
    assert int(compiled_model.norm1.num_batches_tracked) == 2
    compiled_model.eval()
    eager.eval()
    x = random_input((2, 2, 4, 4, 4), 20)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_compile_sees_the_custom_op():
    torch._dynamo.reset()
    layer = make_layer(acn.ACNorm2d, 3, seed=5)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(layer, fullgraph=True, backend=capture)(random_input((2, 3, 4, 4), 6))
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("ac_norm_fwd" in t for t in targets), targets
