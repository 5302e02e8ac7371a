"""The kernel audit (acnorm_fused.bench.audit): compiled-code facts and byte counts
that fail on a regression, with no GPU.

- Every streaming Triton kernel the dispatcher launches for a set of launches
  covering each kernel family, layout, 16- and 32-bit dtype, and a small tile,
  compiled for sm_90 with the specialisation of a real launch on aligned
  tensors: no spills, and every streamed byte moved in 16-byte accesses.
- The bytes each fused op streams, counted under the interpreter: the
  multi-pass minimum (forward 3, backward 5, eval 2 per element and byte),
  plus only the forward's reads of each channel's first value.
- The compiled CUDA module (when built): no spills, 16-byte loads in every
  16-byte-pack kernel.
"""

from __future__ import annotations

import importlib

import pytest

from acnorm_fused import cli
from acnorm_fused.backends import cuda as cuda_backend
from acnorm_fused.bench import audit

from helpers import skip_or_fail

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled_facts():
    return audit.run_part("static", "(90,)", "True")


@pytest.mark.slow
def test_streaming_kernels_use_16_byte_accesses_and_never_spill(compiled_facts):
    findings = [line for facts in compiled_facts for line in facts["findings"]]
    assert not findings, "\n".join(findings)
    streaming = {(f["name"], f["config"].split("GRAD=")[1][:4]) for f in compiled_facts if f["streams"]}
    for kernel in audit.STREAMING:
        for grad in ("True", "Fals"):
            assert (kernel, grad) in streaming, f"{kernel} GRAD={grad} not compiled"
    dtypes = {f["config"].rsplit("*", 1)[1] for f in compiled_facts if f["streams"]}
    assert dtypes == {"fp32", "fp16", "bf16"}


@pytest.mark.slow
def test_finalise_kernels_compile_without_spills(compiled_facts):
    names = {f["name"] for f in compiled_facts}
    assert {"finalise_forward_kernel", "finalise_backward_kernel", "target_grad_kernel"} <= names
    assert all(f["local"] == 0 and not f["error"] for f in compiled_facts)


def _facts(**overrides):
    facts = audit.KernelFacts("elementwise_planar_kernel", 90, "test", streams=2, stream_bytes=32, writes=True,
                              loads={16: 4, 4: 6}, unaligned_loads={4: 6, 2: 32},
                              stores={16: 2}, unaligned_stores={2: 16})
    for name, value in overrides.items():
        setattr(facts, name, value)
    return facts


def test_the_rule_accepts_a_vectorised_kernel():
    assert _facts().findings() == []


@pytest.mark.parametrize("overrides,message", [
    ({"loads": {4: 6, 2: 32}}, "streaming loads"),  # the hints bought nothing
    ({"loads": {16: 3, 4: 6, 2: 8}}, "streaming loads"),  # one stream partly scalar
    ({"stores": {2: 16}}, "streaming stores"),
    ({"local": 8}, "spills"),
    ({"error": "PassManager::run failed"}, "does not compile"),
])
def test_the_rule_flags_regressions(overrides, message):
    findings = _facts(**overrides).findings()
    assert findings and message in findings[0]


@pytest.mark.slow
@pytest.mark.interpret
def test_fused_ops_stream_the_minimum_bytes():
    if reason := audit.traffic_unsupported():
        pytest.skip(reason)
    traffic = audit.run_part("traffic")
    assert {t["step"] for t in traffic} == {"forward", "backward", "eval"}
    for t in traffic:
        assert not t["findings"], t["findings"]
        assert 0 <= t["excess"] <= t["allowance"], t
        if t["step"] != "forward":
            assert t["excess"] == 0, t
        assert t["side_bytes"] > 0  # partials, aux and affines were counted apart


def test_the_traffic_rule_flags_an_extra_pass():
    t = audit.Traffic("case", "backward", elements=1000, element_size=2, channels=4, splits=3,
                      stream_bytes=6 * 1000 * 2)
    assert t.per_element == 6 and t.findings()
    assert not audit.Traffic("case", "forward", 1000, 2, 4, 3, 3 * 1000 * 2 + 4 * 4 * 2).findings()


def test_compiled_cuda_module_kernels():
    try:
        module = importlib.import_module("acnorm_fused._cuda")
    except ImportError as error:
        skip_or_fail(f"acnorm_fused._cuda is not built: {error}")
    facts = audit.cuda_module_facts(module.__file__)
    assert not audit.cuda_findings(facts), audit.cuda_findings(facts)
    vector = {(f["kernel"], f["grad"]) for f in facts if f["pack"] > 1}
    for kernel in ("reduce_planar", "reduce_interleaved", "elementwise_planar", "elementwise_interleaved"):
        assert (kernel, True) in vector and (kernel, False) in vector
    assert {f["arch"] for f in facts} == {f"sm_{arch}" for arch in module.compiled_archs()}


def test_cli_audit_exit_status_and_files(monkeypatch, tmp_path):
    calls = []

    def fake_run_audit(archs, quick, cuda_module):
        calls.append((archs, quick))
        return "# report\n", {"triton_kernels": []}, findings

    monkeypatch.setattr(audit, "run_audit", fake_run_audit)
    findings = []
    assert cli.main(["audit", "--quick", "--archs", "80,90", "--out", str(tmp_path)]) == 0
    assert calls == [((80, 90), True)]
    assert (tmp_path / "audit.md").read_text() == "# report\n"
    findings = ["a spill"]
    assert cli.main(["audit"]) == 1
    with pytest.raises(SystemExit):
        cli.main(["audit", "--archs", "nine"])


SMALL_STAGES = [(2, 256, 4, 4, 4), (2, 320, 2, 2, 2)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SMALL_STAGES)
def test_cuda_training_step_launches(cuda_kernels, shape, layout):
    """A planned layer the GPU holds: one cooperative launch forward, one backward."""
    if not cuda_kernels.emulated:
        pytest.skip("counts the host emulator's launches")
    assert audit.cuda_step_launches(cuda_kernels, shape, layout=layout) == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SMALL_STAGES)
def test_cuda_single_pass_reads_x_once(cuda_kernels, shape, layout):
    if not cuda_kernels.emulated:
        pytest.skip("counts the host emulator's reads")
    assert audit.cuda_step_reads(cuda_kernels, shape, layout=layout) == {
        "forward_x": 1.0, "backward_x": 1.0, "backward_dy": 1.0}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_multi_pass_where_the_gpu_cannot_hold_the_layer(cuda_kernels, layout, monkeypatch):
    """With no room for the single pass, the multi-pass step (DESIGN section 4):
    forward statistics, finalise, apply; backward sums, finalise, (I + S)^T,
    dx; x read twice each way. (The forward's threads also read their channel's
    first value, which the emulator counts per thread: a GPU broadcasts it.)"""
    if not cuda_kernels.emulated:
        pytest.skip("counts the host emulator's launches")
    monkeypatch.setattr(cuda_backend, "resident_capacity", lambda *args: 0)
    shape = SMALL_STAGES[0]
    assert audit.cuda_step_launches(cuda_kernels, shape, layout=layout) == {"forward": 3, "backward": 4}
    reads = audit.cuda_step_reads(cuda_kernels, shape, layout=layout)
    assert reads["forward_x"] > 2.0
    assert reads["backward_x"] == 2.0 and reads["backward_dy"] == 2.0


def test_launch_count_needs_the_emulator():
    with pytest.raises(ValueError, match="counts what the host emulator runs"):
        audit.cuda_step_launches(object(), (2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="counts what the host emulator runs"):
        audit.cuda_step_reads(object(), (2, 4, 2, 2, 2))
