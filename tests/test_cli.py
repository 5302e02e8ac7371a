"""The acnorm command and the benchmark table it prints."""

from __future__ import annotations

import json

import pytest

from acnorm_fused import benchmark
from acnorm_fused.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "acnorm_fused" in out and "backends     reference, torch" in out
    assert "auto picks   torch" in out


def test_bench_writes_markdown_and_json(tmp_path, capsys):
    args = ["bench", "--shapes", "2x4x3x3x3", "1x3x2x4x4", "--dtypes", "float32",
            "--layouts", "contiguous", "channels_last", "--repeats", "3", "--warmup", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "| 2x4x3x3x3 | float32 | contiguous | torch |" in captured.out
    assert "[4/4]" in captured.err, "progress is reported per case"
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| float32 |") == 4 and table.startswith("Machine: ")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["results"]) == 4
    for row in data["results"]:
        assert set(row["samples_ms"]) == set(benchmark.IMPLEMENTATIONS)
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

    cases = benchmark.default_cases(torch.device("cpu"))
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    assert {c.layout for c in cases} == {"contiguous", "channels_last"}
    assert benchmark.Case((2, 32, 32, 32, 32)) in cases, "the CPU bar's shape"
    gpu = benchmark.default_cases(torch.device("cuda"))
    assert benchmark.Case((2, 32, 128, 128, 128), "bfloat16", "channels_last") in gpu
