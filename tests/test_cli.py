"""The acnorm command and the benchmark table it prints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from acnorm_fused.bench import layer
from acnorm_fused.bench.cases import Case, default_cases
from acnorm_fused.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "acnorm_fused" in out and "backends     reference, torch" in out
    assert "auto picks   torch" in out


def test_bench_writes_markdown_and_json(tmp_path, capfd):
    args = ["bench", "--shapes", "2x4x3x3x3", "1x3x2x4x4", "--dtypes", "float32",
            "--layouts", "contiguous", "channels_last", "--repeats", "3", "--warmup", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0
    captured = capfd.readouterr()  # file descriptors: the profiler's native library writes to fd 2
    assert "| 2x4x3x3x3 | float32 | contiguous | torch |" in captured.out
    assert "[4/4]" in captured.err, "progress is reported per case"
    assert "USDT" not in captured.err and "profiler_start" not in captured.err, "no profiler chatter"
    assert len(captured.err.splitlines()) == 1 + 4 + 2, "the header, a line per case, the files written"
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| float32 |") == 4 and table.startswith("Machine: ")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 4
    for row in data["results"]:
        assert set(row["samples_ms"]) == set(layer.IMPLEMENTATIONS)
        assert all(len(v) == 3 and min(v) > 0 for v in row["samples_ms"].values())
        ratios = row["ratios"]
        assert ratios["reference_over_acnorm"] > 0 and ratios["acnorm_over_batchnorm"] > 0
        assert ratios["peak_memory_acnorm_over_batchnorm"] > 0


@pytest.mark.parametrize("args", [["--shapes", "2x4x3"], ["--repeats", "0"], ["--warmup", "-1"]])
def test_bench_rejects_bad_arguments(args, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert "argument" in capsys.readouterr().err


def test_default_cases_cover_both_dtypes_and_layouts():
    import torch

    cases = default_cases(torch.device("cpu"))
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    assert {c.layout for c in cases} == {"contiguous", "channels_last"}
    assert Case((2, 32, 32, 32, 32)) in cases, "the CPU bar's shape"
    assert Case((2, 4096, 4, 4, 4)) in cases, "a wide layer"
    gpu = default_cases(torch.device("cuda"))
    assert Case((2, 32, 128, 128, 128), "bfloat16", "channels_last") in gpu


def test_gpu_table_reports_the_bars_from_paired_samples():
    """The GPU table's ratios, from hand-made samples of two rounds."""
    result = layer.Result(Case((2, 32, 8, 8, 8), "bfloat16"), backend="triton",
                              timer="do_bench, L2 flushed")
    result.samples_ms = {"reference": [3.0, 6.0], "compiled": [1.5, 3.0], "acnorm": [1.0, 2.0],
                         "batchnorm": [2.0, 4.0]}
    result.forward_samples_ms = {"reference": [1.0, 1.0], "acnorm": [0.25, 0.25], "batchnorm": [1.0, 1.0]}
    result.copy_ms = 0.375  # 2 bytes per element in 0.375 ms; a minimal step moves 8 in 1.5 ms
    result.peak_bytes = {"acnorm": 100, "batchnorm": 100}
    # The CUDA backend's single pass moves 5 bytes per element and byte, not 8.
    single = copy.deepcopy(result)
    single.case = Case((2, 32, 4, 4, 4), "bfloat16")
    single.passes, single.min_traffic, single.copy_ms = "single", 5, 0.6
    table = layer.to_markdown([result, single], "a GPU")
    row = next(line for line in table.splitlines() if line.startswith("| 2x32x8x8x8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:6] == ["multi", "do_bench, L2 flushed"]
    assert cells[7] == "-", "a layer that was not timed shows a dash"
    assert cells[14:20] == ["3.00", "1.50", "0.50", "0.25", "100", "1.000"]
    assert cells[20:] == ["-", "-", "nan", "nan"], "no graph timing given"
    row = next(line for line in table.splitlines() if line.startswith("| 2x32x4x4x4"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "single" and cells[18] == "100"
    data = json.loads(layer.to_json([result], "a GPU"))["results"][0]["ratios"]
    assert data["compiled_over_acnorm"] == pytest.approx(1.5)
    assert data["copy_bandwidth_fraction"] == pytest.approx(1.0)


@pytest.mark.slow
def test_bench_sync_processes_writes_its_table(tmp_path, capsys):
    args = ["bench", "sync", "--processes", "2", "--shapes", "2x3x2x2x2",
            "--dtypes", "float32", "--layouts", "contiguous", "--repeats", "2", "--warmup", "0",
            "--out", str(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "bench-sync.md").read_text()
    assert "| 2x3x2x2x2 | float32 | contiguous | 2 |" in table
    data = json.loads((tmp_path / "bench-sync.json").read_text())["results"][0]
    assert set(data["samples_ms"]) == {"syncacnorm", "acnorm", "batchnorm"}
    assert all(len(v) == 2 for v in data["samples_ms"].values())
    # PyTorch runs SyncBatchNorm on GPUs only; the table says why it is missing.
    assert "syncbatchnorm" in data["refused"] and "SyncBatchNorm" in table


def test_bench_host_profile_writes_its_report(tmp_path, capsys):
    args = ["bench", "host", "--device", "cpu", "--shapes", "2x4x3x3x3", "--dtypes", "float32",
            "--layouts", "contiguous", "--repeats", "10", "--out", str(tmp_path)]
    assert main(args) == 0
    report = (tmp_path / "host-profile.md").read_text()
    assert report.startswith("Machine: ") and "### 2x4x3x3x3 float32 contiguous" in report
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")}
    assert set(rows) == set(layer.IMPLEMENTATIONS)
    for step, host, graph, share in rows.values():
        assert 0 < float(host) <= float(step), "issuing a step cannot take longer than the step"
        assert graph.strip() == "-", "no CUDA graph on a CPU"
        assert 0 < float(share) <= 1
    # The profiles name the fused layer's own functions (its launch plan, on a CPU
    # the torch backend's) and the operators it runs.
    assert "plan.py" in report and "PlannedStep" in report
    assert "[1/1]" in capsys.readouterr().err


def test_bench_sync_processes_needs_two(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sync", "--processes", "1"])
    assert "must be at least 2" in capsys.readouterr().err


def test_cuda_benchmark_path_runs_with_stand_in_timers(monkeypatch):
    """``run_case_cuda`` end to end on the CPU, with do_bench replaced by a stand-in
    that runs the step and reports a fixed time per layer: the rounds, ratios,
    copy time and memory come out as the GPU table expects them. Under the
    interpreter triton can run CPU tensors, so it is timed beside ``auto``'s pick."""
    testing = pytest.importorskip("triton.testing")
    fixed_ms = iter([3.0, 1.5, 1.0, 0.5, 2.0, 1.0, 4.0, 2.0] * 2 + [0.25])

    def stand_in(fn, **kwargs):
        fn()
        return next(fixed_ms)

    monkeypatch.setattr(testing, "do_bench", stand_in)
    monkeypatch.setattr(layer, "captures", lambda step: False)
    monkeypatch.setattr(layer, "graph_replay_ms", lambda step, repeats: None)
    case = Case((2, 4, 3, 3, 3))
    result = layer.run_case_cuda(case, torch.device("cpu"), rounds=2, rep_ms=10, compile_reference=False)
    assert result.timer == "do_bench, L2 flushed"
    assert result.samples_ms == {"reference": [3.0, 3.0], "acnorm": [1.0, 1.0], "batchnorm": [2.0, 2.0],
                                 "acnorm-triton": [4.0, 4.0]}
    assert result.forward_samples_ms == {"reference": [1.5, 1.5], "acnorm": [0.5, 0.5], "batchnorm": [1.0, 1.0],
                                         "acnorm-triton": [2.0, 2.0]}
    assert result.reference_over_acnorm == 3.0 and result.acnorm_over_batchnorm == 0.5
    assert result.copy_ms == 0.25 and result.copy_bandwidth_fraction == 1.0
    assert result.other_kernels == ["acnorm-triton"]
    assert result.bandwidth_fraction("acnorm-triton") == 0.25
    assert set(result.peak_bytes) == set(layer.IMPLEMENTATIONS)
    header, _, row = layer._gpu_table([result])[2:5]
    assert "| step acnorm-triton | acnorm-triton / bn |" in header
    assert header.count("|") == row.count("|")
    assert row.rstrip().endswith("| 4.000 | 2.00 | nan | 25 |")


def test_cuda_benchmark_times_the_bar_pair_from_graphs_too(monkeypatch):
    """On an eagerly timed row the fused and BatchNorm steps are timed again from a
    CUDA graph, and the table gives their ratio and bandwidth beside the eager ones."""
    testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(testing, "do_bench", lambda fn, **kwargs: (fn(), 2.0)[1])
    graphed = []

    def graph_stand_in(fn, repeats):
        fn()
        graphed.append(fn)
        return 0.5 if len(graphed) == 1 else 1.0  # acnorm, then batchnorm

    monkeypatch.setattr(layer, "graph_replay_ms", graph_stand_in)
    monkeypatch.setattr(layer, "captures", lambda step: True)
    monkeypatch.setattr(layer, "GRAPH_MAX_NUMEL", 0)  # time this small case eagerly
    case = Case((2, 4, 3, 3, 3))
    result = layer.run_case_cuda(case, torch.device("cpu"), rounds=1, rep_ms=10, compile_reference=False)
    assert result.timer == "do_bench, L2 flushed" and len(graphed) == 2
    assert result.graph_step_ms == {"acnorm": 0.5, "batchnorm": 1.0}
    assert result.graph_ratio("acnorm", "batchnorm") == 0.5
    assert result.graph_bandwidth_fraction == pytest.approx(layer.MIN_STEP_TRAFFIC / 2 * 2.0 / 0.5)
    header, _, row = layer._gpu_table([result])[2:5]
    assert "| graph acnorm | graph bn | graph acnorm / bn | graph % copy bw |" in header
    assert header.count("|") == row.count("|")
    assert "| 0.500 | 1.000 | 0.50 | 1600 |" in row
    ratios = json.loads(layer.to_json([result], "a GPU"))["results"][0]["ratios"]
    assert ratios["graph_acnorm_over_batchnorm"] == 0.5


@pytest.mark.slow
def test_bench_network_quick_writes_its_tables(tmp_path, capsys):
    """The CPU smoke test of `acnorm bench network`: every quick row, the three
    versions of each, with their ratios to the BatchNorm original."""
    pytest.importorskip("monai")
    assert main(["bench", "network", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench-network.json").read_text())
    assert data["quick"] is True
    dynunet = [row for row in data["rows"] if row["network"] == "dynunet"]
    assert {row["layout"] for row in dynunet} == {"contiguous", "channels_last"}
    for row in data["rows"]:
        assert set(row["median_ms"]) == {"batchnorm", "acnorm", "reference"}, row["refused"]
        assert all(value > 0 for value in row["median_ms"].values())
        assert row["ratio_to_batchnorm"]["batchnorm"] == 1.0
    table = (tmp_path / "bench-network.md").read_text()
    assert "| dynunet | float32 | contiguous | eager | acnorm |" in table and "smoke test" in table
    assert "[5/5]" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["bench", "network", "--shapes", "2x4x3x3x3"], "unrecognized arguments: --shapes"),
    (["bench", "--networks", "dynunet"], "unrecognized arguments: --networks"),
    (["bench", "sync", "--device", "cuda"], "unrecognized arguments: --device"),
    (["bench", "--audit"], "unrecognized arguments: --audit"),
])
def test_each_bench_mode_refuses_the_others_options(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--device", "foo"], "'foo' is not a device"),
    (["--device", "cuda:x"], "'cuda:x' is not a device"),
    (["--device", "mps"], "the benchmarks run on cpu or cuda devices"),
    (["--shapes", "1x4x1x1x1"], "needs more than one value per channel"),
    (["--shapes", "2x4x3"], "a shape is NxCxDxHxW"),
])
def test_bench_refuses_bad_arguments_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_refuses_an_out_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", "--shapes", "2x4x3x3x3", "--out", str(existing)])
    assert exit_info.value.code == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
